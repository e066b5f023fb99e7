"""What a calibration forward may change and must put back (see :mod:`.calibration`): the
random generators, the scope's buffers, frozen parameters outside the S2A'd model (run on
copies), trained parameters changed in place (counted; an error past one change), and the
engine's counters and accounts."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .hooks import SavedTensorEngine


class Watch:
    """The parameters of ``scope`` that calibration's forwards may change in place (an EMA
    teacher updated in ``training_step``, a clamped temperature), sorted by what can be done.

    Frozen parameters outside the S2A'd model run each forward on a copy (one per parameter
    object, so tied ones stay tied). Trained ones cannot (their gradients are measured): their
    values are compared, and one changed by more than one forward is an error (a clamp or a
    renormalisation repeats harmlessly; an update would be applied once per forward). Frozen
    ones inside the S2A'd model must not change at all, nor the originals of the copied ones
    (reached through a reference kept from before)."""

    def __init__(self, engine: SavedTensorEngine, scope: nn.Module) -> None:
        inside = {id(p) for p in engine.model.parameters()}
        self.names = {id(p): n for n, p in scope.named_parameters(remove_duplicate=False)}
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        trained: dict[int, nn.Parameter] = {}
        frozen: dict[int, nn.Parameter] = {}
        for module in scope.modules():
            for leaf, p in module._parameters.items():
                if p is None:
                    continue
                if p.requires_grad:
                    trained[id(p)] = p
                elif id(p) in inside:
                    frozen[id(p)] = p
                else:
                    self.slots.append((module, leaf, p))
        self.trained, self.frozen = list(trained.values()), list(frozen.values())
        self.scope = scope
        self.changes: dict[int, int] = {}

    @contextmanager
    def forward(self) -> Iterator[None]:
        """One calibration forward: copies swapped in, changes counted, errors raised."""
        copies: dict[int, nn.Parameter] = {}
        for module, leaf, p in self.slots:
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
            module._parameters[leaf] = copies[id(p)]
        values = [(p, p.detach().clone()) for p in self.trained]
        # Frozen ones must not change; a copied one only through its copy (a list of the
        # teacher's parameters kept from before reaches the original). Compared by version
        # and by a fingerprint (``.data`` changes leave no version), not by a copy.
        originals = {id(p): p for _, _, p in self.slots}
        fixed = [*self.frozen, *originals.values()]
        versions = [(p, p._version) for p in fixed]
        prints = _fingerprints(fixed)
        try:
            yield
        finally:
            for module, leaf, p in self.slots:
                module._parameters[leaf] = p
        for p, before in values:  # by value: ``.data`` changes leave no version behind
            if (p.detach() - before).norm() > 1e-6 * before.norm():
                self.changes[id(p)] = self.changes.get(id(p), 0) + 1
        bad = [p for p, version in versions if p._version != version]
        after = _fingerprints(fixed)
        bad += [p for i, p in enumerate(fixed) if not torch.equal(prints[i], after[i])]
        bad += [p for p in self.trained if self.changes.get(id(p), 0) > 1]
        if bad:
            changed = sorted({self.names.get(id(p), "?") for p in bad})
            raise RuntimeError(
                f"calibrate: the step's forward changed parameters in place "
                f"({', '.join(changed[:4])}{' and more' if len(changed) > 4 else ''}) on every "
                "call, and calibration runs it two or three times on one batch, so they would "
                "change that many times. Calibrate with a loss_fn free of such updates, "
                "handle.calibrate(loss_fn), before training, and set calibrate=False."
            )


def _fingerprints(params: list[nn.Parameter]) -> torch.Tensor:
    """One row per parameter, (sum, sum of squares) in float64, on the CPU: a change of its
    values in place, even through ``.data``, moves it (for all practical purposes)."""
    if not params:
        return torch.zeros(0, 2, dtype=torch.float64)
    rows = [
        torch.stack([p.detach().sum(dtype=torch.float64), p.detach().double().square().sum()])
        for p in params
    ]
    return torch.stack([r.cpu() for r in rows])


#: The engine's counters and accounts that a calibration forward changes and puts back.
#: ``_fresh`` and ``_per_step`` too: each calibration forward starts the step's account as
#: the real step will (see ``begin_step``).
_ENGINE_STATE = (
    "step",
    "forwards",
    "_last",
    "_account",
    "_unpacked",
    "_step_peak",
    "_fresh",
    "_per_step",
    "_outside_added",
)


def _generators(scope: nn.Module) -> list[tuple[Any, Any]]:
    """``(generator, state)`` for what a forward may draw from besides torch's global
    generators: Python's and NumPy's global ones, and ``torch.Generator`` attributes of the
    scope's modules (a mixup drawn with ``self.gen``)."""
    found: list[tuple[Any, Any]] = [(random, random.getstate())]
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        found.append((numpy.random, numpy.random.get_state()))
    for module in scope.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Generator):
                found.append((value, value.get_state()))
    return found


@contextmanager
def same_state(engine: SavedTensorEngine, watch: Watch):
    """Run a calibration forward and put back what it changes: the random generators (so
    both forwards draw the same dropout and the same mixup; see :func:`_generators`), the
    scope's buffers (BatchNorm running statistics), its frozen parameters outside the S2A'd
    model (see :class:`Watch`), and the engine's step, forward count and last account.

    Each forward runs on copies of the buffers, swapped in, and the originals are swapped
    back untouched: copying old values into the buffers instead would change tensors that
    the forward's graph saved (a training BatchNorm saves its running statistics), and the
    measurement's backward would refuse them."""
    scope = watch.scope
    swapped = [
        (module, name, buffer)
        for module in scope.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    for module, name, buffer in swapped:
        module._buffers[name] = buffer.clone()
    cuda = torch.cuda.is_initialized()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    others = _generators(scope)
    saved = {name: getattr(engine, name) for name in _ENGINE_STATE}
    try:
        with watch.forward():
            yield
    finally:
        for module, name, buffer in swapped:
            module._buffers[name] = buffer
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for generator, state in others:
            if generator is random:
                random.setstate(state)
            else:
                generator.set_state(state)
        for name, value in saved.items():
            setattr(engine, name, value)
