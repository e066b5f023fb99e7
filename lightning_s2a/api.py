"""The one verb: ``apply_s2a(model, config) -> S2AHandle``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from .config import FOUR_BIT_DTYPES, S2AConfig
from .engine.calibration import warn_uncalibrated
from .engine.compile_guard import check_not_compiled
from .engine.hooks import SavedTensorEngine
from .engine.outside import OutsideModules, hooking_engine
from .stopped_watch import StoppedWatch
from .structure import four_bit
from .structure.frozen_weights import WidenedCheck, cast_frozen
from .structure.held_statistics import is_held
from .structure.holders import PROBE_NAME
from .structure.rewrites import rewrites_for
from .structure.side import SIDE_NAME
from .structure.surgery import (
    PROMPT_NAME,
    StructureState,
    UnfrozenCheck,
    apply_structure,
    still_written,
    undo_structure,
)
from .structure.unstepped import UnsteppedCheck

#: Where a model keeps its live handle: on the model itself, so that the two (and the engine
#: its hooks reach) are one cycle the garbage collector frees with the model. A registry
#: keyed weakly by the model would hold the handle, and through it the model, for ever.
HANDLE_ATTR = "_s2a_handle"

#: Names of the modules and tensors S2A adds to a model.
S2A_NAMES = frozenset({PROMPT_NAME, SIDE_NAME, PROBE_NAME, *four_bit.MADE_NAMES})


class S2AHandle:
    """What :func:`apply_s2a` returns: statistics of the last forward, and ``remove()``."""

    def __init__(self, model: nn.Module, config: S2AConfig, structure: StructureState) -> None:
        self.model = model
        self.config = config
        self.structure = structure
        self.engine = SavedTensorEngine(
            model,
            config,
            rewrites=rewrites_for(
                config.surgery, config.compress, config.frozen_dtype in FOUR_BIT_DTYPES
            ),
            parts=structure.parts,
        )
        if config.frozen_dtype in FOUR_BIT_DTYPES:  # read per forward: only where they exist
            self.engine.extra_weight_numels = partial(four_bit.held_numels, model)
            frozen = four_bit.frozen_names(model)
            self.engine.step_checks.append(
                partial(four_bit.check_unfrozen, model, frozen, config.frozen_dtype)
            )
        elif config.frozen_dtype is not None and structure.cast_originals:
            dtype = getattr(torch, config.frozen_dtype)
            held = list(structure.cast_originals)
            self.engine.step_checks.append(WidenedCheck(model, held, dtype))
        if config.calibrate:
            self.engine.step_checks.append(partial(warn_uncalibrated, self.engine))
        self.engine.step_checks.append(UnfrozenCheck(model))
        self.engine.attach()
        self.removed = False
        self.unstepped: UnsteppedCheck | None = None  # set by apply_s2a
        #: Version counters of the parameters that train, as applied: what remove() tells
        #: trained or loaded since by (see ``_removal_changes``).
        self._versions = {id(p): p._version for p in model.parameters() if p.requires_grad}
        self._stopped_watch: list[Any] = []  # see stop_engine(watch=True)

    def stats(self) -> dict[str, Any]:
        """Saved-activation bytes of the most recent forward that recorded autograd.

        Keys: ``raw_bytes`` (what an uncompressed run keeps), ``stored_bytes`` (what was kept),
        ``ratio`` (stored / raw), ``by_kind`` (per operator kind) and ``by_part`` (per part of
        the model: "backbone", "prompt", "side", "head"; "outside" for other modules'
        saves, see :meth:`count_outside`).
        """
        return self.engine.stats()

    def count_outside(self, scope: nn.Module) -> OutsideModules:
        """Count in :meth:`stats` what the modules of ``scope`` outside the S2A'd model save
        for backward (a head of your own beside an S2A'd encoder), kept as it is, under part
        ``"outside"``; ``.remove()`` on the result stops it. For steps marked with
        ``handle.engine.begin_step()``, whose forwards add up to one account (S2ACallback
        does both, every epoch)."""
        return OutsideModules(self.engine, scope)

    def calibrate(
        self,
        loss_fn: Callable[[], torch.Tensor],
        tol: float | None = None,
        scope: nn.Module | None = None,
        remeasure: bool = False,
        combine: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ) -> dict[str, float]:
        """Find the modules whose codes bend their gradient and keep what they save at 8 bits.

        ``loss_fn`` runs the model on one batch and returns its scalar loss, e.g.
        ``lambda: F.cross_entropy(model(x), y)``. It is called two to four times (saved tensors
        exact, then coded) with the same random state; the buffers of the model (or of
        ``scope``, a module around it that ``loss_fn`` also runs) are put back, and nothing
        reaches ``.grad``. Modules whose local relative gradient error exceeds ``tol``
        (default ``config.calibrate_tol``, or where that is None 0.05 at 4 bits doubled per
        bit fewer, by the narrowest width each module's codes use) are widened; returns every
        module's error.
        ``remeasure`` always runs the second measurement (same forwards on every process).
        ``combine`` maps each measurement's errors to the ones decided on: in a distributed
        run, the largest over the processes (each measured its own share of the batch), so
        that every process widens the same modules for the whole batch.
        ``S2ACallback`` calls this on the first training batch when ``config.calibrate``.
        """
        return self.engine.calibrate(
            loss_fn, tol, scope=scope, remeasure=remeasure, combine=combine
        )

    def trainable_parameters(self) -> tuple[int, float]:
        """Number of trainable parameters and their fraction of all parameters."""
        return count_trainable(self.model)

    def held_batch_norms(self) -> list[nn.Module]:
        """The BatchNorms S2A holds in eval mode now (``bn_mode="eval"``): frozen ones; one
        whose weight was unfrozen since keeps its own mode and updates its statistics."""
        return [bn for bn in self.structure.batch_norms if is_held(bn)]

    def stop_engine(self, watch: bool = False) -> None:
        """Stop compressing saved tensors; the structural modules stay (e.g. after fit). A
        live engine codes every backward through the model, in eval mode too: stop it for
        exact gradients after training (saliency maps, adversarial examples).

        ``watch``: the first backward that reaches the model's trainable parameters while
        stopped warns that it trained uncompressed with S2A's freezing still on (a plain
        ``Trainer.fit`` after an S2A fit trained biases only, silently). ``S2ACallback``
        stops it so after fit, and ``load_from_checkpoint`` after loading; the watch stays
        through later stops (an evaluation) until :meth:`start_engine` or :meth:`remove`.

        Frozen weights cast to ``frozen_dtype="bfloat16"``/``"float16"`` get their original
        values and dtype back, so a plain full-precision forward works after training. Weights
        held in 4 bits stay so (they run in any precision): the model after fit, validated,
        tested or loaded from an adapter or checkpoint is the one that trained, not its
        exact-weight twin (EfficientNet-Lite0's logits differ at cosine 0.97).
        ``remove()`` puts the exact weights back.
        """
        self.engine.detach()
        if self.config.frozen_dtype not in FOUR_BIT_DTYPES:
            cast_frozen(self.model, self.structure, None)
        if watch and not self._stopped_watch:
            # On the parameters' gradients, not a forward hook: evaluation stays silent, and
            # the model stays scriptable (TorchScript compiles module hooks); copies and
            # pickles carry no tensor hooks.
            warn = StoppedWatch(self)
            self._stopped_watch = [
                p.register_post_accumulate_grad_hook(warn)
                for p in self.model.parameters()
                if p.requires_grad
            ]

    def _warn_stopped(self) -> None:
        self._unwatch()  # said once
        trainable, share = self.trainable_parameters()
        warnings.warn(
            f"{type(self.model).__name__} trains with S2A stopped: its engine was stopped "
            f"after the last fit (or checkpoint load), so this step was not compressed, and "
            f"S2A's freezing still holds: only {trainable:,} parameters ({share:.2%}) train. "
            "Fit with S2ACallback (or strategy='s2a') to train it with S2A, or call "
            "lightning_s2a.get_handle(module).remove() first for the plain model with every "
            "parameter trainable (S2A's added modules go).",
            stacklevel=2,
        )

    def _unwatch(self) -> None:
        for hook in self._stopped_watch:
            hook.remove()
        self._stopped_watch = []

    def start_engine(self) -> None:
        """Resume compressing saved tensors (and ``frozen_dtype``) after :meth:`stop_engine`."""
        if self.removed:
            raise RuntimeError("this S2A handle was removed; call apply_s2a again.")
        if self.config.frozen_dtype is not None:
            cast_frozen(self.model, self.structure, self.config.frozen_dtype)
        self._unwatch()
        self.engine.attach()

    def weight_bytes(self) -> tuple[int, int]:
        """Bytes of the model's weights as held now (4-bit codes and scales, cast or plain
        parameters and buffers) and as the user built them: what ``frozen_dtype`` saves."""
        return weight_bytes(self.model, self.structure.cast_originals)

    def summary(self) -> str:
        """A readable table: per part, trainable parameters and the last forward's bytes."""
        from .summary import format_summary

        return format_summary(self)

    def remove(self) -> None:
        """Undo the structure: hooks off, injected modules (prompts, side, added biases) out,
        4-bit weights exact again, ``requires_grad`` flags back, the values ``load_adapter``
        wrote put back as built; trained biases keep their values. To keep the model that
        trained or was loaded (inference, export), use :meth:`stop_engine` instead: after
        training or an adapter load, ``remove()`` leaves another model, and says so (added
        modules an optimizer stepped, exact weights under parameters trained on 4-bit ones,
        an adapter's values put back)."""
        self._remove()

    def _remove(self) -> None:
        """``remove()``, its warning said at the caller's line (also from a ``with`` block)."""
        if self.removed:
            return
        changes = self._removal_changes()
        if changes:
            warnings.warn(
                f"S2A: handle.remove() {'; it '.join(changes)}: the model no longer computes "
                "what it did under S2A (a reviewer's ViT with a trained side network: another "
                "class for 3 of 4 images; a 4-bit ViT-Ti's trained biases on exact weights: "
                "1 of 4). To keep that model for inference or export, use handle.stop_engine() "
                "instead; save_adapter/load_adapter rebuild it elsewhere.",
                stacklevel=3,
            )
        self._unwatch()
        self.engine.detach()
        if self.unstepped is not None:
            self.unstepped.remove()
        undo_structure(self.model, self.structure)
        self.model.__dict__.pop(HANDLE_ATTR, None)
        self.removed = True

    def _removal_changes(self) -> list[str]:
        """What :meth:`remove` changes in the function the model computes, in words: the
        added modules that trained or were loaded, exact weights under parameters trained or
        loaded on 4-bit ones, and the values ``load_adapter`` wrote (put back as built). The
        last two, and loaded added modules, were silent until 2026-12-07 (a user's adapter
        loaded, S2A removed for deployment: the untrained model)."""
        changes = []
        check = self.unstepped
        held = check.held if check is not None else set()

        def changed(p: torch.Tensor) -> bool:
            # stepped by an optimizer (fused ones leave the version counter as it was), or
            # written in place since apply_s2a (another optimizer, an adapter, a checkpoint)
            before = self._versions.get(id(p))
            return id(p) in held or (before is not None and p._version != before)

        params = [p for p in self.model.parameters() if id(p) in self._versions]
        added = check.added if check is not None else set()
        if any(changed(p) for p in params if id(p) in added):
            changes.append(
                "takes out the modules S2A added (prompts, side network, added biases), which "
                "trained or were loaded"
            )
        if four_bit.held_numel(self.model) and any(changed(p) for p in params):
            changes.append(
                "puts back the exact weights under parameters trained or loaded on "
                f"{self.config.frozen_dtype} ones"
            )
        loaded = [
            f"{type(owner).__name__}.{leaf}"
            for owner, leaf, before, written in self.structure.overwritten
            if not torch.equal(before, written) and still_written(owner, leaf, written) is not None
        ]
        if loaded:
            changes.append(
                f"puts back, as built, the {len(loaded)} tensors load_adapter wrote "
                f"({', '.join(loaded[:3])}{', ...' if len(loaded) > 3 else ''}): the "
                "backbone without the adapter"
            )
        return changes

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of the model (an EMA copy) has no handle: this one belongs to the original
        (``get_handle(copy)`` is None; the copy's own hooks still run its own engine)."""
        return None

    def __reduce__(self) -> tuple:
        """Pickled with its model (``torch.save(model)``), a handle comes back as None, as in
        a deep copy."""
        return (type(None), ())

    def __enter__(self) -> S2AHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()  # said at the user's with block


def weight_bytes(model: nn.Module, originals: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(held, as built)`` bytes of ``model``'s parameters, buffers and 4-bit weights;
    ``originals`` are the exact values of the weights ``frozen_dtype`` changed, by name."""
    held, built = four_bit.held_bytes(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if four_bit.is_buffer_name(name):
            continue  # counted with the 4-bit weights
        held += t.numel() * t.element_size()
        original = originals.get(name, t)
        built += original.numel() * original.element_size()
    return held, built


def count_trainable(module: nn.Module) -> tuple[int, float]:
    """Number of parameters of ``module`` that train, and their fraction of all parameters
    (weights held in 4 bits by ``frozen_dtype`` count: they are frozen parameters to a user)."""
    total = sum(p.numel() for p in module.parameters()) + four_bit.held_numel(module)
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return train, (train / total if total else 0.0)


def get_handle(module: nn.Module) -> S2AHandle | None:
    """The live :class:`S2AHandle` of ``module`` if ``apply_s2a`` was applied to it, else None."""
    handle = module.__dict__.get(HANDLE_ATTR)
    return handle if handle is not None and handle.model is module else None


def check_no_s2a_inside(model: nn.Module) -> None:
    """Refuse a model that already holds S2A's modules or 4-bit weights: S2A applied to a
    part of it, or a copy of an S2A model (pickled, as ``ddp_spawn`` sends it to its
    workers, or deep-copied), whose modules no live handle owns and which a second surgery
    would stack on."""
    for name, module in model.named_modules():
        if module is not model and get_handle(module) is not None:
            raise RuntimeError(
                f"S2A is already applied to {name!r} inside this {type(model).__name__}; apply "
                f"it to one of them only (get_handle(model.{name}).remove() takes it off)."
            )
    made = (
        n
        for n, _ in (*model.named_modules(), *model.named_parameters(), *model.named_buffers())
        if n.rsplit(".", 1)[-1] in S2A_NAMES
    )
    name = next(made, None)
    if name is None:  # bias-only adds nothing but the engine's hooks
        where = next((n for n, m in model.named_modules() if hooking_engine(m)), None)
        if where is not None:
            name = f"engine hooks{' on ' + where if where else ''}"
            owner = hooking_engine(model.get_submodule(where))
            outer = owner.model if isinstance(owner, SavedTensorEngine) else None
            if outer is not None and outer is not model and get_handle(outer) is not None:
                raise RuntimeError(
                    f"S2A is already applied to a {type(outer).__name__} that contains this "
                    f"{type(model).__name__}; apply it to one of them only "
                    "(get_handle(that model).remove() takes it off)."
                )
    if name is not None:
        raise RuntimeError(
            f"{type(model).__name__} already holds S2A's {name!r}, but no S2A handle owns "
            "it: S2A is applied to a model that contains it, or it is a copy of an S2A model "
            "(pickled, as ddp_spawn sends the model to its workers, or copy.deepcopy). Apply "
            "S2A once, to the original model; under Lightning use strategy='ddp' or a forked "
            "one ('ddp_fork', 'ddp_notebook'), which keep S2A's handle, and evaluate a copy "
            "without S2ACallback (it runs as it is); or build the model afresh and load the "
            "trained weights with lightning_s2a.load_adapter / load_from_checkpoint."
        )


def apply_s2a(model: nn.Module, config: S2AConfig | None = None, **overrides: Any) -> S2AHandle:
    """Freeze ``model``'s backbone, train only the S2A modules, and compress saved activations.

    ``overrides`` are :class:`S2AConfig` fields (``apply_s2a(model, bits=2)``). The model is
    changed in place; ``handle.remove()`` restores its structure (trained biases keep their
    values; prompts and side networks go: :meth:`S2AHandle.stop_engine` keeps the trained
    model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_s2a expects an nn.Module, got {type(model).__name__}.")
    config = config if config is not None else S2AConfig()
    if not isinstance(config, S2AConfig):
        raise TypeError(f"config must be an S2AConfig, got {type(config).__name__}.")
    # Always through replace(): it validates again, so fields set after construction
    # (config.modules = "bias+prompt", config.bits = 3) get the same checks and parsing.
    config = config.replace(**overrides)
    if get_handle(model) is not None:
        raise RuntimeError(
            "apply_s2a was already applied to this model; call handle.remove() before "
            "applying it again."
        )
    check_no_s2a_inside(model)
    check_not_compiled(model, config.compress)
    before = {id(p) for p in model.parameters()}
    structure = apply_structure(model, config)
    handle = S2AHandle(model, config, structure)
    added = {id(p) for p in model.parameters()} - before  # prompts, side, added biases
    # Bias-only adds nothing an older optimizer could miss; with 4-bit weights, remove()
    # reads whether an optimizer stepped the model (see S2AHandle._removal_changes).
    if added or config.frozen_dtype in FOUR_BIT_DTYPES:
        handle.unstepped = UnsteppedCheck(model, added)
    object.__setattr__(model, HANDLE_ATTR, handle)  # a plain attribute, not a submodule
    return handle
