"""The saved-tensor engine: every tensor autograd saves inside a model's forward is packed here.

While the model's forward runs with grad enabled, two things are installed:

* ``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``, so every tensor saved for backward
  passes through :meth:`SavedTensorEngine._pack`;
* a ``TorchFunctionMode`` that sees every torch function call (``nn`` modules, timm, HF
  transformers, bare ``F.gelu`` in user code alike) and records which operator is running,
  so ``_pack`` knows who is saving the tensor and picks the quantizer from the table in
  :mod:`.quantizers`. The outermost call is the one recognised: tensors that ``F.layer_norm``
  saves through its internals belong to "norm".

Forward pre-hooks on every module (but those that hand their input back untouched:
``boundaries.passes_through``) push these when the outermost module call of the model
starts (the model's own forward, or any submodule's when the model is driven through its
parts, as ``forward_features`` does), and forward hooks registered with ``always_call=True``
pop them, so an exception inside forward never leaves them installed (an interrupt is ended
at the next call; :mod:`.boundaries`). The engine knows nothing of Lightning.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from .accounting import ForwardAccount
from .batching import BATCH_NUMEL, PackBatches
from .boundaries import BoundariesMixin, passes_through
from .codebook import Codebook, DeviceCodebook
from .deferred import DeferredChecks
from .entry_methods import entry_methods, remove_entry_methods
from .ops import ELEMENTWISE, OP_KINDS, canonical_name
from .packing import PackingMixin
from .recognition import Call, classify, row_widths
from .state import StateMixin

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


class SavedTensorEngine(BoundariesMixin, PackingMixin, StateMixin):
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
        #: Per call site, the pending answer of its last drift check (see ``_drift_answer``).
        self._drift_checks: dict[tuple, tuple] = {}
        self._drift_positions: dict[tuple, torch.Tensor] = {}  # (numel, device) -> positions
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
        self._warned_grad_inside = False  # said that autograd began inside a forward
        self._began_without_grad = False  # the open forward began under no_grad
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
        self._entry_exception: BaseException | None = None  # see BoundariesMixin._enter
        self._peak_before: dict | None = None  # the step's peak before the open forward
        self._input_ptrs: set[int] = set()  # storages of the open forward's tensor inputs
        self._funcs: dict[Any, tuple] = {}
        self._modules: list[nn.Module] = []
        self._unpacked = False
        self._per_step = False  # set by begin_step: accounts per training step
        self._step_peak: dict | None = None  # the step's largest account (several backwards)
        self._largest = 0  # most elements of a tensor saved in this account (see ``reduced``)
        self._shapes: set[torch.Size] = set()  # shapes saved in this account (``reduced``)
        self._fresh = False  # the next forward starts a new account (a step began)
        self._outside_added = False  # other modules added to the open account (outside.py)
        #: Forwards that ran with autograd and so engaged the engine (for "did it engage?").
        self.forwards = 0
        #: Forwards with autograd it stayed out of (inside torch.utils.checkpoint, save_on_cpu
        #: or a torch.func transform: see ``_warn_staying_out``).
        self.forwards_out = 0
        #: Forwards that raised (their bytes are not counted): a training step whose every
        #: forward raised (a batch skipped after an out-of-memory error) measured nothing.
        self.forwards_failed = 0
        #: Feature widths whose rows min-max groups keep apart (see ``row_widths``).
        self._row_widths: frozenset[int] = frozenset()
        #: Device types whose "does the code hold it" answers are read without a sync.
        self.defer_on: tuple[str, ...] = ("cuda",)
        self._deferred = DeferredChecks()
        #: Saved tensors of at most this many elements are coded in batches (0: each alone).
        self.batch_numel = BATCH_NUMEL
        self._batches = PackBatches()
        #: Module name -> code width for what it saves, raised by calibration
        #: (:mod:`.calibration`); a module absent here uses the config's widths.
        self.module_bits: dict[str, int] = {}
        #: Local gradient error per module from the last calibration (empty before one).
        self.calibration: dict[str, float] = {}
        #: True once calibration ran (or a checkpoint of a calibrated run was loaded).
        self.calibrated = False
        #: The code settings calibration measured under (see :meth:`calibration_key`).
        self.calibrated_for: dict[str, Any] | None = None
        #: The input shapes (batch aside) calibration measured on (see
        #: ``calibration.check_calibrated_shape``).
        self.calibrated_shapes: tuple[tuple, ...] = ()
        #: The largest batch calibration measured, where it kept a tensor whole for its size
        #: alone (0: none, or not calibrated): see ``calibration.check_calibrated_shape``.
        self.calibrated_batch = 0
        #: The largest tensor calibration kept whole for its size alone, per batch item.
        self.calibrated_small = 0.0
        self._measured_shapes: set[tuple] = set()
        self._measured_batch = self._calibrating_batch = 0
        self._kept_small = 0.0
        self._warned_batch = False
        self._warned_shape = False
        self._exact = False  # calibration's exact forward: every saved tensor kept as is
        #: Calibration: the modules that saved something, each with the narrowest width
        #: its codes use (None: nothing coded).
        self._saving: dict[str, int | None] | None = None

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
        # what an engine pickled by an earlier version lacks
        fill = {
            **self._new_caches(),
            "_warned_grad_inside": False,
            "_began_without_grad": False,
            "batch_numel": BATCH_NUMEL,
            "forwards_out": 0,
            "forwards_failed": 0,
            "_row_widths": frozenset(),
        }
        self.__dict__.update(fill)
        self.__dict__.update(state)
        self._outside_ids = WeakIdKeyDictionary()

    @staticmethod
    def _new_caches() -> dict[str, Any]:
        """What a copy of the engine starts anew: caches and the open account."""
        return {
            "_account": None,
            "_funcs": {},
            "_device_codebooks": {},
            "_drift_checks": {},
            "_drift_positions": {},
            "_handles": [],
            "_contexts": [],
            "_deferred": DeferredChecks(),
            "_batches": PackBatches(),
            "_copies": {},
            "_entry_frame": None,
            "_entry_exception": None,
            "_peak_before": None,
            "_input_ptrs": set(),
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
        heads = [prefix for prefix, label in self.parts if label == "head"]
        self._row_widths = row_widths(self.model, self.config.group_size, heads)
        for name, module in self.model.named_modules():
            is_root = module is self.model
            if not is_root and passes_through(module):
                continue  # no torch call, nothing saved: its hooks were pure host cost
            pre = module.register_forward_pre_hook(
                partial(self._enter, name, is_root), prepend=True
            )
            self._handles.append(pre)
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        self._entry_names = entry_methods(self)

    def detach(self) -> None:
        """Remove every hook this engine registered (and end per-step accounting), and end a
        forward left open (see :meth:`_end_interrupted`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        remove_entry_methods(self, getattr(self, "_entry_names", []))
        self._entry_names = []
        self.end_steps()
        self._end_interrupted()

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
        tol: float | None = None,
        scope: nn.Module | None = None,
        remeasure: bool = False,
        combine: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ) -> dict[str, float]:
        """Widen the modules whose codes bend their local gradient by more than ``tol``
        (None: the config's, scaled to each module's width; see :mod:`.calibration`);
        returns every saving module's local error."""
        from .calibration import calibrate

        return calibrate(self, loss_fn, tol, scope=scope, remeasure=remeasure, combine=combine)

    def stats(self) -> dict:
        """Accounting of the most recent forward that recorded autograd (zeros before one).

        A forward of the model itself is one account. When the model is driven through its
        submodules instead (``forward_features``, or a LightningModule calling its parts),
        the account covers every such forward since the last backward; within a training
        step marked by :meth:`begin_step` (the Lightning callback marks each), every forward
        of the step until a backward, two views through the model included.
        """
        self._settle()
        if self._last is None:
            return ForwardAccount().summary()
        return self._last

    def step_stats(self) -> dict:
        """The largest account since :meth:`begin_step`: what the step keeps at most. A step
        that runs several backwards (manual optimization: a GAN's two updates) frees each
        account's tensors in turn; :meth:`stats` is its last account only."""
        self._settle()
        return self._step_peak if self._step_peak is not None else self.stats()

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
