"""The saved-tensor engine: every tensor autograd saves inside a model's forward is packed here.

While the model's forward runs with grad enabled, two things are installed:

* ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``, so every tensor saved for backward
  passes through :meth:`SavedTensorEngine._pack`;
* a ``TorchFunctionMode`` that sees every torch function call (``nn`` modules, timm, HF
  transformers, bare ``F.gelu`` in user code alike) and records which operator is running,
  so ``_pack`` knows who is saving the tensor and picks the quantizer from the table in
  :mod:`.quantizers`. The outermost call is the one recognised: tensors that ``F.layer_norm``
  saves through its internals belong to "norm".

Forward pre-hooks on every module push these when the outermost module call of the model
starts (the model's own forward, or any submodule's when the model is driven through its
parts, as ``forward_features`` does), and forward hooks registered with ``always_call=True``
pop them, so an exception inside forward never leaves them installed. The engine knows nothing of
Lightning.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from .accounting import ForwardAccount
from .codebook import Codebook, DeviceCodebook
from .compile_guard import check_not_compiling, check_not_traced
from .deferred import DeferredChecks
from .ops import ELEMENTWISE, OP_KINDS, canonical_name, is_bias
from .packed import in_backward
from .packing import PackingMixin
from .recognition import (
    Call,
    OperatorMode,
    classify,
    foreign_autograd_context,
    functorch_transform,
    redirected_call,
)

if TYPE_CHECKING:
    from ..config import S2AConfig


#: Config fields that change a saved tensor's code or whether it is coded: a calibration
#: measured under other values is stale.
CODING_FIELDS = (
    "bits",
    "op_bits",
    "trainable_input_bits",
    "group_size",
    "stochastic_rounding",
    "backend",
    "bnb_quant_type",
    "min_numel",
    "surgery",
)


class SavedTensorEngine(PackingMixin):
    """Compresses a model's saved activations with per-operator quantizers, and counts bytes."""

    def __init__(
        self,
        model: nn.Module,
        config: S2AConfig,
        rewrites: Mapping[str, Callable[[Any, tuple, dict], Any]] | None = None,
        parts: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``rewrites`` replace calls by function name (returning ``NotImplemented`` declines);
        ``parts`` label saved bytes by module-name prefix for ``stats()["by_part"]``."""
        self.model = model
        self.config = config
        self.rewrites = dict(rewrites or {})
        self.parts = list(parts)
        self.step = 0
        self.codebooks: dict[tuple, Codebook] = {}
        self._device_codebooks: dict[tuple, DeviceCodebook] = {}
        self._last: dict | None = None
        self._account: ForwardAccount | None = None
        self._handles: list[RemovableHandle] = []
        self._depth = 0
        self._redirects: list[int] = []  # depths of redirected root calls (redirected_call)
        self._active = False
        self._busy = False
        self._call: Call | None = None
        self._frames: list[list[Any]] = []  # [module name, elementwise counts, occurrence]
        self._entries: dict[str, int] = {}  # calls of each module in this forward so far
        self._param_storages: set[int] = set()
        self._param_ids: set[int] = set()
        # Parameters seen in calls, not the model's, held weakly: a freed one's address may
        # be a new parameter of the model's (a replaced head) that must not be passed over.
        self._outside_ids: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._warned_out = False  # said that a forward ran without the engine
        #: True where something else calibrates on the first training batch (S2ACallback).
        self.calibrates_elsewhere = False
        self._weight_ids: set[int] = set()
        self._weight_numels: set[int] = set()
        self._trained_storages: set[int] = set()
        self._trained_numels: set[int] = set()
        #: Element counts of weights that are no parameters (4-bit weights), for the rule
        #: that keeps weights computed in forward exact; set by whoever holds them.
        self.extra_weight_numels: Callable[[], Iterable[int]] = tuple
        #: Called at the start of each account (each training step), set by what applied S2A:
        #: notes and warnings where the model changed under it (a backbone unfrozen around
        #: 4-bit or cast weights).
        self.step_checks: list[Callable[[], None]] = []
        self._contexts: list[Any] = []
        #: The frame of torch's outermost module call while one runs: held (a frame's id
        #: is reused at once), so an interrupted forward is told apart (see ``_running``).
        self._entry_frame: Any = None
        self._funcs: dict[Any, tuple] = {}
        self._modules: list[nn.Module] = []
        self._unpacked = False
        self._per_step = False  # set by begin_step: accounts per training step
        self._step_peak: dict | None = None  # the step's largest account (several backwards)
        self._largest = 0  # most elements of a tensor saved in this account (see ``reduced``)
        self._shapes: set[torch.Size] = set()  # shapes saved in this account (``reduced``)
        self._fresh = False  # the next forward starts a new account (a step began)
        #: Forwards that ran with autograd and so engaged the engine (for "did it engage?").
        self.forwards = 0
        #: Device types whose "does the code hold it" answers are read without a sync.
        self.defer_on: tuple[str, ...] = ("cuda",)
        self._deferred = DeferredChecks()
        #: Module name -> code width for what it saves, raised by calibration
        #: (:mod:`.calibration`); a module absent here uses the config's widths.
        self.module_bits: dict[str, int] = {}
        #: Local gradient error per module from the last calibration (empty before one).
        self.calibration: dict[str, float] = {}
        #: True once calibration ran (or a checkpoint of a calibrated run was loaded).
        self.calibrated = False
        #: The code settings calibration measured under (see :meth:`calibration_key`).
        self.calibrated_for: dict[str, Any] | None = None
        self._exact = False  # calibration's exact forward: every saved tensor kept as is
        self._saving: set[str] | None = None  # calibration: modules that saved something

    def __deepcopy__(self, memo: dict) -> SavedTensorEngine:
        """A deep copy of the model (an EMA or SWA copy) gets an engine of its own.

        Its hooks are bound methods (and partials of them), so they are copied with the model
        and reach the copy's engine, which then sees the copy's parameters and counts the
        copy's bytes. Caches and the open account start anew: the operator cache holds
        torch's own descriptors and the account weak references to storages, and neither
        can be copied (a copied storage reference is released twice). The copy's hooks stay
        as long as the copy lives.

        A copy of a part of the model (``copy.deepcopy(model.head)``, a teacher copied from
        a backbone the model holds) reaches the engine through that part's hooks, not
        through the model: it gets an inert engine, not a copy of the whole model (a ViT-B
        head's copy took ~330 MB), and computes as the part does without S2A.
        """
        fresh = {**self._new_caches(), "_outside_ids": WeakIdKeyDictionary()}
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        if id(self.model) not in memo:
            clone.__dict__.update(fresh, model=None, _inert_root=type(self.model).__name__)
            return clone
        for key, value in self.__dict__.items():
            setattr(clone, key, fresh[key] if key in fresh else copy.deepcopy(value, memo))
        return clone

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with its model (``torch.save(model)``): without the caches a deep copy
        starts anew (torch's descriptors in the operator cache cannot be pickled), and
        without the step checks (they hold weak references; a loaded copy has no handle)."""
        state = {**self.__dict__, **self._new_caches(), "step_checks": []}
        state.pop("_outside_ids", None)  # weak references: made anew on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._outside_ids = WeakIdKeyDictionary()

    @staticmethod
    def _new_caches() -> dict[str, Any]:
        """What a copy of the engine starts anew: caches and the open account."""
        return {
            "_account": None,
            "_funcs": {},
            "_device_codebooks": {},
            "_handles": [],
            "_contexts": [],
            "_deferred": DeferredChecks(),
            "_entry_frame": None,
            # a copy made inside a forward (an EMA copy in a hook, torch.save) starts outside
            "_depth": 0,
            "_active": False,
            "_frames": [],
            "_redirects": [],
        }

    # -- installation --------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """True while the engine's hooks are on the model."""
        return bool(self._handles)

    def attach(self) -> None:
        """Register a pre-hook and an always-called forward hook on every module (no-op if
        attached).

        Every module can open the engine, not just the root: a user who calls
        ``model.forward_features(x)``, or a LightningModule that calls its ``encoder`` and
        ``classifier`` in turn, drives the model through its submodules without the root's
        forward ever running, and those forwards must be compressed too.
        """
        if self.attached:
            return
        self._modules = list(self.model.modules())
        for name, module in self.model.named_modules():
            is_root = module is self.model
            pre = module.register_forward_pre_hook(
                partial(self._enter, name, is_root), prepend=True
            )
            self._handles.append(pre)
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def detach(self) -> None:
        """Remove every hook this engine registered (and end per-step accounting), and end a
        forward left open (see :meth:`_end_interrupted`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._per_step = self._fresh = False
        self._end_interrupted()

    def _end_interrupted(self) -> None:
        """Uninstall what a forward that never returned left installed: a
        ``KeyboardInterrupt`` (or ``SystemExit``) skips the always-called forward hooks
        (torch runs them for ``Exception`` only), which left the saved-tensor hooks and the
        operator mode on the thread, coding every later forward of any module."""
        if self._active:
            self._deactivate()
        self._depth = 0
        self._redirects.clear()
        self._frames = []
        self._entry_frame = None

    def state_dict(self) -> dict[str, Any]:
        """Forward counter and fitted codebooks, so a resumed run quantizes like the original."""
        return {
            "step": self.step,
            "module_bits": dict(self.module_bits),
            "calibrated": self.calibrated,
            "calibrated_for": self.calibrated_for,
            "calibration": dict(self.calibration),
            "codebooks": [
                {
                    "site": list(site),
                    "boundaries": cb.boundaries,
                    "points": cb.points,
                    "values": cb.values,
                    "bits": cb.bits,
                    "fitted_at": cb.fitted_at,
                    "first_fit": cb.first_fit,
                }
                for site, cb in self.codebooks.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.step = int(state["step"])
        self.module_bits = {str(k): int(v) for k, v in state.get("module_bits", {}).items()}
        self.calibrated = bool(state.get("calibrated", False))
        self.calibrated_for = state.get("calibrated_for")
        if self.calibrated_for not in (None, self.calibration_key()):
            # Measured under other codes (a resumed run at other bits): to be measured again
            # where the config calibrates; its widths stay until then.
            self.calibrated = False
        self.calibration = {str(k): float(v) for k, v in state.get("calibration", {}).items()}
        self.codebooks = {
            tuple(c["site"]): Codebook(
                boundaries=c["boundaries"],
                points=c["points"],
                values=c["values"],
                bits=int(c["bits"]),
                fitted_at=int(c["fitted_at"]),
                # Saved before 2026-12-06 (no first fit): the refresh interval at once.
                first_fit=int(c.get("first_fit", int(c["fitted_at"]) - (1 << 30))),
            )
            for c in state["codebooks"]
        }
        self._device_codebooks.clear()

    def calibration_key(self, tol: float | None = None) -> dict[str, Any]:
        """The settings a calibration's result depends on: every field that changes the codes
        or what is coded, and the tolerance (the config's unless given)."""
        cfg = self.config
        key: dict[str, Any] = {name: getattr(cfg, name) for name in CODING_FIELDS}
        key["op_bits"] = dict(sorted(cfg.op_bits.items()))
        key["tol"] = cfg.calibration_tol() if tol is None else float(tol)
        return key

    def calibrate(
        self,
        loss_fn: Callable[[], torch.Tensor],
        tol: float,
        scope: nn.Module | None = None,
        remeasure: bool = False,
    ) -> dict[str, float]:
        """Widen the modules whose codes bend their local gradient by more than ``tol``
        (see :mod:`.calibration`); returns every saving module's local error."""
        from .calibration import calibrate

        return calibrate(self, loss_fn, tol, scope=scope, remeasure=remeasure)

    def stats(self) -> dict:
        """Accounting of the most recent forward that recorded autograd (zeros before one).

        A forward of the model itself is one account. When the model is driven through its
        submodules instead (``forward_features``, or a LightningModule calling its parts),
        the account covers every such forward since the last backward; within a training
        step marked by :meth:`begin_step` (the Lightning callback marks each), every forward
        of the step until a backward, two views through the model included.
        """
        if self._last is None:
            return ForwardAccount().summary()
        return self._last

    def step_stats(self) -> dict:
        """The largest account since :meth:`begin_step`: what the step keeps at most. A step
        that runs several backwards (manual optimization: a GAN's two updates) frees each
        account's tensors in turn; :meth:`stats` is its last account only."""
        return self._step_peak if self._step_peak is not None else self.stats()

    # -- forward boundaries ------------------------------------------------------------
    def _enter(self, name: str, is_root: bool, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of module ``name`` (bound with ``functools.partial``)."""
        if self.model is None:  # the inert engine of a copied part (see __deepcopy__)
            if is_root:
                raise RuntimeError(
                    f"This copy of the S2A model ({self._inert_root}) was made through one "
                    "of its parts: copy.deepcopy reached a submodule registered under a "
                    "second name before the model itself, and the copy's engine knows no "
                    "model, so its saved tensors would be neither compressed nor counted. "
                    "Copy the model S2A was applied to (or the object that registers it "
                    "first), or apply_s2a to a copy made before."
                )
            return
        if is_root and redirected_call(module):
            # Lightning's DDP step through the model's call: no forward (the loss, the
            # metrics); the real one runs inside it. Its post-hook finds this depth again.
            self._redirects.append(self._depth)
            return
        if self._depth and not _running(self._entry_frame):  # the open forward was interrupted
            self._end_interrupted()
            warnings.warn(
                f"S2A: an earlier forward of {type(self.model).__name__} never returned (a "
                "KeyboardInterrupt or SystemExit inside it skips PyTorch's forward hooks); "
                "what it left installed is removed now. Until this forward, everything run "
                "with autograd had its saved tensors coded by S2A.",
                stacklevel=3,
            )
        if not self._depth:
            self._entry_frame = sys._getframe(1)
        # Depth first: if activating raises, the always-called forward hook still pops
        # this level, so the count never goes negative.
        self._depth += 1
        check_not_traced(self.config.compress)
        if self._depth == 1 and torch.is_grad_enabled():
            check_not_compiling(self.model, self.config.compress)  # before any change
            stay_out = foreign_autograd_context() or functorch_transform()
            if stay_out and not in_backward():
                self._warn_staying_out()
            if not stay_out:
                self._activate(is_root)
                # The model's input is what a statistic is smaller than before anything is
                # saved (a gate saved ahead of its feature map: see ``reduced``).
                for a in args:
                    if isinstance(a, torch.Tensor):
                        self._remember(a)
        if self._active:
            # A module called more than once in a forward (one nn.GELU shared by every
            # block) sees other inputs each time: each call has codebooks of its own.
            occurrence = self._entries.get(name, 0)
            self._entries[name] = occurrence + 1
            self._frames.append([name, {}, occurrence])

    def _warn_staying_out(self) -> None:
        """Say once that a forward ran with autograd but uncompressed, uncounted."""
        if self._warned_out:
            return
        self._warned_out = True
        warnings.warn(
            f"S2A stays out of this forward of {type(self.model).__name__}: other saved-"
            "tensor hooks are installed (torch.autograd.graph.save_on_cpu, or the whole "
            "model inside torch.utils.checkpoint) or a torch.func transform (grad, vmap) "
            "runs it, so its saved tensors are neither compressed nor counted, and stats() "
            "still shows an earlier forward (said once).",
            stacklevel=3,
        )

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.model is None:  # the inert engine of a copied part
            return
        if self._redirects and self._redirects[-1] == self._depth and module is self.model:
            self._redirects.pop()  # the redirected call's own end
            return
        if self._active and self._frames:
            self._frames.pop()
        self._depth -= 1
        if self._depth == 0:
            self._entry_frame = None  # it holds the forward's locals
            if self._active:
                self._deactivate()

    def begin_step(self) -> None:
        """Mark a training step's start: from now on every forward until the next step adds
        to one account (two views of a batch through the model are alive together), not only
        forwards of submodules. The Lightning callback calls it before each batch."""
        self._per_step = True
        self._fresh = True
        self._step_peak = None

    def _activate(self, is_root: bool) -> None:
        # A forward of the whole model starts a new account (outside steps marked by
        # begin_step). Forwards of submodules (the model driven through its parts) add up
        # until a backward has run, because all of their saved tensors are alive together.
        fresh, self._fresh = self._fresh, False
        if fresh or self._account is None or self._unpacked or (is_root and not self._per_step):
            self._refresh_parameters()
            for check in self.step_checks:
                check()
            self.step += 1
            self._account = ForwardAccount()
            self._largest = 0
            self._shapes = set()
            self._unpacked = False
        self.forwards += 1
        self._frames = []
        self._entries = {}
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        mode = OperatorMode(self)
        hooks.__enter__()
        mode.__enter__()
        self._contexts = [hooks, mode]
        self._active = True

    def _deactivate(self) -> None:
        self._active = False
        for ctx in reversed(self._contexts):
            ctx.__exit__(None, None, None)
        self._contexts = []
        self._call = None
        self._deferred.flush()  # every saved tensor is counted before the forward's summary
        assert self._account is not None
        self._last = self._account.summary()
        peak = self._step_peak
        if self._per_step and (peak is None or self._last["stored_bytes"] >= peak["stored_bytes"]):
            self._step_peak = self._last

    def _refresh_parameters(self) -> None:
        # Parameters may have moved device since apply_s2a (Lightning moves the model after
        # setup), so their storages are collected per forward. Views of a parameter (W.t())
        # share its storage; that is how they are recognised. The module dicts are read
        # directly: named_parameters() builds every name, several times slower.
        storages, ids, weights = set(), set(), set()
        trained_storages, trained_numels = set(), set()
        numels = set(self.extra_weight_numels())
        for module in self._modules:
            for leaf, p in module._parameters.items():
                if p is None:
                    continue
                storage = p.untyped_storage().data_ptr()
                storages.add(storage)
                ids.add(id(p))
                numels.add(p.numel())
                if p.requires_grad and not is_bias(leaf):
                    weights.add(id(p))
                    trained_storages.add(storage)
                    trained_numels.add(p.numel())
            for b in module._buffers.values():
                if b is not None:
                    storages.add(b.untyped_storage().data_ptr())
        # Parameters from outside the model that its forward takes (frozen class embeddings
        # passed in, a teacher's weights): no activations either, kept as they are. (Fake
        # tensors noted while torch.compile traced the model have no storage.)
        for p in list(self._outside_ids.keys()):
            with contextlib.suppress(RuntimeError):
                storages.add(p.untyped_storage().data_ptr())
        self._param_storages, self._param_ids, self._weight_ids = storages, ids, weights
        self._weight_numels = numels
        self._trained_storages, self._trained_numels = trained_storages, trained_numels

    # -- operator recognition --------------------------------------------------------------
    def _func_info(self, func: Any) -> tuple:
        """``(raw name, elementwise factory, op kind, rewrite)`` of a torch function, cached:
        the tables are looked up once per function, not once per call."""
        info = self._funcs.get(func)
        if info is None:
            name = canonical_name(func)
            raw = getattr(func, "__name__", "")
            info = (raw, ELEMENTWISE.get(name), OP_KINDS.get(name), self.rewrites.get(name))
            self._funcs[func] = info
        return info

    def _classify(self, info: tuple, args: tuple, kwargs: dict) -> Call | None:
        """The :class:`Call` a torch call is recognised as, or None (see :func:`.classify`)."""
        return classify(self, info, args, kwargs)


def _running(entry: Any) -> bool:
    """True if frame ``entry`` is still executing, in any thread (a DataParallel replica's
    forward is no interrupted one), in one step: CPython refuses to clear an executing
    frame, and clearing a finished one only drops the locals it kept alive."""
    if entry is None:
        return False
    try:
        entry.clear()
    except RuntimeError:
        return True
    return False
