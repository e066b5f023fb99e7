"""``S2AConfig(calibrate=True)`` under Lightning: measure on the first training batch through
the user's own ``training_step``, with its logging muted and its metrics' states put back."""

from __future__ import annotations

import collections
import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning_utilities.core.apply_func import apply_to_collection

from ..api import S2AHandle
from ..summary import calibration_line


def calibrate_on_batch(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    handle: S2AHandle,
    batch: Any,
    batch_idx: int,
) -> None:
    """``config.calibrate``: measure on the first training batch, through the user's own
    ``training_step`` (its logging muted, its module's buffers and torchmetrics states put
    back), under the run's precision. In a distributed run each rank measures its own share
    of the batch and every rank decides on the largest error of each module over the ranks,
    so all of them widen the same modules, for the whole batch (deciding on rank 0's share
    alone missed a module that only another rank's share pushed above the tolerance). A
    batch that ``training_step`` skips (returns None) defers it."""
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            "S2AConfig(calibrate=True) runs training_step twice to measure, which manual "
            "optimization would step; call lightning_s2a.get_handle(module).calibrate("
            "loss_fn) yourself before training, and set calibrate=False."
        )
    with_index = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def loss_fn() -> torch.Tensor:
        # Each call on its own copy: a step that normalises its batch in place (x.sub_(m),
        # batch["x"] = ...) would otherwise hand the real step a batch transformed once per
        # calibration forward (a reviewer's parameters moved 28% after two steps).
        fresh = _copy_batch(batch)
        step_args = (fresh, batch_idx) if with_index else (fresh,)
        with trainer.precision_plugin.train_step_context():
            out = pl_module.training_step(*step_args)
        if out is None:
            raise _Skipped
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise TypeError(
                    "S2AConfig(calibrate=True): training_step returned a dict without "
                    f"'loss' (keys {sorted(out)}); calibration needs the step's loss."
                )
            out = out["loss"]
        return out

    try:
        with _muted(pl_module), _metrics_kept(pl_module), _attributes_kept(pl_module):
            handle.calibrate(
                loss_fn,
                scope=pl_module,
                remeasure=trainer.world_size > 1,
                combine=_largest_over_ranks(trainer),
            )
    except _Skipped:
        rank_zero_info("S2A calibration: training_step skipped this batch; trying the next.")
        return
    engine = handle.engine
    engine.module_bits = trainer.strategy.broadcast(engine.module_bits, src=0)
    rank_zero_info(calibration_line(engine))


def _largest_over_ranks(trainer: pl.Trainer) -> Any:
    """The ``combine`` of a distributed calibration: each module's largest error over the
    ranks (a module one rank's forward did not reach counts with the others' errors); None
    on one process. Without an initialised process group the ranks keep their own errors,
    and rank 0's widths are broadcast after (see :func:`calibrate_on_batch`)."""
    dist = torch.distributed
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return None

    def combine(errors: dict[str, float]) -> dict[str, float]:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, errors)
        largest: dict[str, float] = {}
        for part in gathered:
            for name, err in part.items():
                largest[name] = max(largest.get(name, err), err)
        return largest

    return combine


def _copy_batch(batch: Any) -> Any:
    """A copy of ``batch`` that ``training_step`` may change in place without touching the
    batch the real step gets: a deep copy, or, for a batch that cannot be deep-copied, its
    tensors cloned inside copies of its collections (Lightning's own traversal)."""
    try:
        return copy.deepcopy(batch)
    except Exception:
        return apply_to_collection(batch, torch.Tensor, torch.Tensor.clone)


class _Skipped(Exception):
    """training_step returned None on the calibration batch (Lightning skips such a batch)."""


@contextmanager
def _metrics_kept(pl_module: pl.LightningModule) -> Iterator[None]:
    """torchmetrics states inside: what calibration's extra training_step calls add to
    them is taken back out."""
    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = [
        (m, copy.deepcopy({k: getattr(m, k) for k in m._defaults}), m._update_count)
        for m in metrics
    ]
    try:
        yield
    finally:
        for m, states, count in saved:
            for k, v in states.items():
                setattr(m, k, v)
            m._update_count = count
            m._computed = None


#: Tensors :func:`_attributes_kept` copies before calibration, at most this many elements
#: in all (a list of the model's parameters is not copied: parameters and buffers are
#: skipped); one changed in place that was not copied is said instead.
_COPIED_NUMEL = 1 << 24
#: Longer sequences and dicts are put back as they were, one level deep only.
_FOLLOWED_LEN = 10_000


@contextmanager
def _attributes_kept(pl_module: pl.LightningModule) -> Iterator[None]:
    """The module's own plain attributes as before: what calibration's extra training_step
    calls appended to a list (Lightning's ``self.training_step_outputs`` pattern), counted
    (``self.seen += len(x)``, ``self.running["n"] += len(y)``) or set is taken back out (a
    reviewer's epoch mean averaged the first batch three times; counters read 48 samples of
    32). Lists, dicts, sets and deques are restored in place, at any depth (references to
    them stay valid); tuples are followed; numbers and strings reassigned; attributes the
    step added removed; tensors copied back where they changed. Other objects are not
    followed."""
    state = vars(pl_module)
    names = [n for n in state if not n.startswith("_")]  # Lightning's and torch's own stay
    weights = {id(t) for t in (*pl_module.parameters(), *pl_module.buffers())}
    snap = _Snapshot(weights)
    saved = {n: snap.take(state[n], 0) for n in names}
    before = set(state)
    try:
        yield
    finally:
        for name in set(state) - before:
            if not name.startswith("_"):
                delattr(pl_module, name)
        restored: dict[int, Any] = {}
        for name, taken in saved.items():
            setattr(pl_module, name, _restore(taken, name, restored))


class _Snapshot:
    """What :func:`_restore` needs to put attributes back; each object taken once (a
    structure that holds itself, a tensor in two lists)."""

    def __init__(self, weights: set[int]) -> None:
        self.weights, self.seen, self.copied = weights, set(), 0

    def take(self, value: Any, depth: int) -> tuple:
        if id(value) in self.seen or depth > 8 or id(value) in self.weights:
            return ("same", value)  # taken already, too deep, or the model's own tensors
        if isinstance(value, torch.Tensor):
            self.seen.add(id(value))
            try:
                version = value._version
            except RuntimeError:  # an inference tensor: cannot change outside inference mode
                return ("same", value)
            copied = None
            if self.copied + value.numel() <= _COPIED_NUMEL:
                self.copied += value.numel()
                copied = value.detach().clone()
            return ("tensor", value, version, copied)
        if isinstance(value, (list, collections.deque, tuple, dict, set)):
            self.seen.add(id(value))
            if isinstance(value, tuple) and len(value) > _FOLLOWED_LEN:
                return ("same", value)  # its items cannot be put back into it
            if len(value) > _FOLLOWED_LEN or isinstance(value, set):
                items = dict(value) if isinstance(value, dict) else list(value)
                return ("shallow", value, items)
            if isinstance(value, dict):
                return ("dict", value, {k: self.take(v, depth + 1) for k, v in value.items()})
            kind = "tuple" if isinstance(value, tuple) else "sequence"
            return (kind, value, [self.take(v, depth + 1) for v in value])
        return ("same", value)  # numbers, strings, None and objects not followed


def _restore(taken: tuple, name: str, restored: dict[int, Any]) -> Any:
    """Put a :class:`_Snapshot` entry back; returns the object to bind (the same one where
    it can be restored in place). ``restored``: objects put back already, by ``id``."""
    kind, obj = taken[0], taken[1]
    if kind == "same":
        return obj
    if id(obj) in restored:
        return restored[id(obj)]
    restored[id(obj)] = obj  # before the items: a structure that holds itself ends here
    if kind == "tensor":
        result = _restore_tensor(obj, taken[2], taken[3], name)
    elif kind == "shallow":
        result = _refill(obj, taken[2])
    elif kind == "dict":
        result = _refill(obj, {k: _restore(t, name, restored) for k, t in taken[2].items()})
    else:
        items = [_restore(t, name, restored) for t in taken[2]]
        result = _refill(obj, items) if kind == "sequence" else _tuple(obj, items)
    restored[id(obj)] = result
    return result


def _restore_tensor(obj: torch.Tensor, version: int, copied: Any, name: str) -> torch.Tensor:
    # Changed in place: its version moved, or its values (``.data.add_`` moves no version).
    if copied is None:
        if obj._version != version:
            rank_zero_warn(
                f"S2A calibration: training_step changed {name} in place; it was too large to "
                "copy first, so it keeps what the extra calibration steps did to it."
            )
        return obj
    if obj._version == version and torch.equal(obj, copied):
        return obj
    try:
        with torch.no_grad():
            obj.copy_(copied)
    except RuntimeError:  # an expanded view cannot be written to: rebound to the copy
        return copied
    return obj


def _refill(obj: Any, items: Any) -> Any:
    obj.clear()
    if isinstance(obj, (dict, set)):
        obj.update(items)
    else:
        obj.extend(items)
    return obj


def _tuple(obj: tuple, items: list) -> tuple:
    if all(a is b for a, b in zip(items, obj, strict=True)):
        return obj
    return obj._make(items) if hasattr(obj, "_make") else type(obj)(items)  # namedtuple


@contextmanager
def _muted(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: calibration's forwards are no steps."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
