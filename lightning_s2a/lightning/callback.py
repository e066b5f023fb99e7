"""``S2ACallback``: S2A for an existing Lightning project in one line.

``Trainer(callbacks=[S2ACallback()])`` applies :func:`lightning_s2a.apply_s2a` in ``setup``,
which Lightning runs before ``configure_model``, the checkpoint restore, optimizer creation
and the DDP wrap: restored weights land in the injected modules, and optimizers and DDP see
only what trains. Metrics are logged through ``LightningModule.log`` so every logger gets them.
"""

from __future__ import annotations

import uuid
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from ..api import S2AHandle, apply_s2a, count_trainable, get_handle
from ..config import FOUR_BIT_DTYPES, S2AConfig, config_differences
from ..engine.outside import OutsideModules
from ..messages import some_names
from .callback_state import CheckpointState
from .checkpoint import load_other_engines, other_handles
from .checks import (
    check_batch_norms_in_place,
    check_evaluation_alone,
    check_optimized,
    check_single_s2a,
    copied_back_error,
    warn_frozen_optimizers,
)
from .data import sized_from_data
from .metrics import EpochMeter
from .module_hooks import parameter_layout, unwrap_hook, wrap_hook
from .other_callbacks import (
    check_averaging_after,
    check_no_finetuning,
    check_no_swa,
    copies_model_in_setup,
)
from .steps import TrainingSteps
from .target_checks import find_target


class S2ACallback(CheckpointState, TrainingSteps, pl.Callback):
    """Apply S2A to a LightningModule's backbone, log its memory each epoch, save adapters.

    The backbone is the attribute named by ``backbone="..."``, else ``pl_module.backbone`` if
    it exists, else the whole module (whose head must then be findable: timm's
    ``get_classifier()`` or ``S2AConfig(head="...")``). With a backbone attribute and
    ``head="auto"``, a backbone without ``get_classifier()`` keeps no head of its own: the
    LightningModule's head outside it trains as the user defined it. A backbone built in
    ``configure_model`` is S2A'd right after that hook, before checkpoints are restored and
    optimizers are built. A module that already has S2A applied (an earlier fit, or
    ``load_adapter``) is taken up as it is. ``count_outside=False`` leaves what the
    module's other parts save (a head outside the backbone) out of the ``s2a/activation_*``
    metrics: for a head that runs ``torch.func`` transforms in its forward, which refuse the
    counting hooks.
    """

    def __init__(
        self,
        config: S2AConfig | None = None,
        backbone: str | None = None,
        adapter_path: str | None = None,
        count_outside: bool = True,
        **fields: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else S2AConfig()
        if not isinstance(config, S2AConfig):  # a dict or "bias" failed later, at fit
            raise TypeError(
                f"S2ACallback's config must be an S2AConfig, got {type(config).__name__} "
                f"({config!r}); pass fields by name instead: S2ACallback(bits=2, "
                "modules=['bias'])."
            )
        self.config = config.replace(**fields) if fields else config
        self.backbone = backbone
        self.adapter_path = adapter_path
        self.count_outside = count_outside
        self.handle: S2AHandle | None = None
        self._module: pl.LightningModule | None = None
        self._meter = EpochMeter()
        self._outside: OutsideModules | None = None  # see TrainingSteps.on_train_epoch_start
        self._pending_state: dict[str, Any] | None = None
        self._pending_others: dict[str, Any] | None = None
        self._forwards_before = self._out_before = self._failed_before = 0
        #: Other S2A'd modules under the LightningModule (``apply_s2a`` in its ``__init__``):
        #: path -> (handle, forwards before the step); found at the first training batch.
        self._others: dict[str, list[Any]] | None = None
        self._warned = False
        self._for_evaluation = False
        self._alone_pending = False  # an evaluation alone: checked once a restore is known
        self._stage = ""  # the running Trainer call's stage (setup's)
        self._restored_s2a = False
        self._run = ""  # a token for this run's own checkpoints (a tuner's temporary ones)
        self.applied_here = False  # S2A applied by this run, not taken up from before
        #: The last training epoch's ``s2a/*`` metrics on this rank, also where nothing is
        #: logged (``Trainer(barebones=True)``, or a run without a logger).
        self.epoch_metrics: dict[str, float] = {}

    # -- where S2A goes ----------------------------------------------------------------
    def _target(self, pl_module: pl.LightningModule) -> tuple[nn.Module, S2AConfig]:
        return find_target(pl_module, self.backbone, self.config)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target, config = self._target(pl_module)
        existing = get_handle(target)
        others = [path for path, _ in other_handles(pl_module, existing)]
        if stage == "fit" and self.adapter_path and others:  # before S2A changes anything
            raise ValueError(
                f"S2ACallback(adapter_path=...) writes one adapter for "
                f"{type(pl_module).__name__}, which holds other S2A'd modules beside the "
                f"callback's ({some_names(others)}): save_adapter would refuse after training. "
                "After fit, save one per module with lightning_s2a.save_adapter(module, path, "
                "handle=get_handle(part)), and leave adapter_path out."
            )
        self.applied_here = existing is None
        if existing is None:
            keys = set(target.state_dict())
            self.handle = apply_s2a(target, sized_from_data(config, trainer.datamodule))
            error = copied_back_error(trainer, pl_module, target, keys) if stage == "fit" else None
            # Whether a checkpoint comes in is known once Lightning restores it, after setup
            # (trainer.ckpt_path is None here: test(ckpt_path=...) of a side run was refused)
            self._alone_pending = stage != "fit"
            if error is not None:  # leave the model as it was
                self.handle.remove()
                self.handle = None
                raise error
            # Applied for an evaluation only (validate/test/predict): taken off at teardown,
            # so a later fit without S2A trains the module as built.
            self._for_evaluation = stage != "fit"
        elif (
            stage != "fit"
            or existing.config == config
            or (config.input_size is None and existing.config.replace(input_size=None) == config)
            or (  # applied without a size, which it then took to be this one
                existing.config.input_size is None
                and tuple(existing.structure.input_size or ()) == tuple(config.input_size or ())
                and existing.config == config.replace(input_size=None)
            )
        ):
            self.handle = existing  # an earlier fit or load_adapter: take it up as it is
        else:
            differ = config_differences(config, existing.config)
            raise ValueError(
                f"{type(target).__name__} already has S2A applied with another config (fields "
                f"{differ} differ from this callback's). Fit with the same config, "
                "S2ACallback(lightning_s2a.get_handle(module).config), or start over with "
                "lightning_s2a.get_handle(module).remove()."
            )
        self._module = pl_module
        if self._pending_state is not None:
            self.handle.engine.load_state_dict(self._pending_state)
            self._pending_state = None
        if self._pending_others is not None:
            load_other_engines(pl_module, self.handle, self._pending_others)
            self._pending_others = None
        if stage == "fit":
            self.handle.engine.calibrates_elsewhere = True  # on the first training batch
            self.handle.start_engine()
        else:
            self.handle.stop_engine()

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_single_s2a(trainer)
        self._stage, self._alone_pending, self._others = stage, False, None
        if stage == "fit":
            check_no_finetuning(trainer)
        if self._module is not pl_module:
            self.handle = None  # a reused callback: the new module's S2A is found or applied
        cast = self.config.frozen_dtype not in (None, *FOUR_BIT_DTYPES)  # 4-bit: any precision
        if stage == "fit" and cast and "mixed" not in str(trainer.precision):
            raise ValueError(
                f"S2AConfig(frozen_dtype={self.config.frozen_dtype!r}) needs mixed precision so "
                "activations meet the low-precision weights under autocast; use "
                f"Trainer(precision='bf16-mixed') or frozen_dtype=None (got {trainer.precision!r})."
            )
        autocast = _AUTOCAST_DTYPES.get(str(trainer.precision))  # after Lightning's CPU remap
        if stage == "fit" and cast and autocast not in (None, self.config.frozen_dtype):
            raise ValueError(
                f"S2AConfig(frozen_dtype={self.config.frozen_dtype!r}) under "
                f"precision={str(trainer.precision)!r}, which autocasts to {autocast}: the "
                "weights would be rounded twice, and the model during fit would not be the one "
                f"after it. Use frozen_dtype={autocast!r} (on CPU Lightning runs '16-mixed' as "
                "'bf16-mixed')."
            )
        wide = any(p.dim() > 1 and p.element_size() > 2 for p in pl_module.parameters())
        if stage == "fit" and autocast and self.config.frozen_dtype is None and wide:
            rank_zero_warn(
                f"S2A: under precision={str(trainer.precision)!r} autocast copies every frozen "
                f"Linear and Conv weight to {autocast} in each forward, and backward keeps "
                "those copies: counted in s2a/activation_*, they can outweigh the compressed "
                f"activations several times. S2AConfig(frozen_dtype={autocast!r}) holds them "
                "so once: nothing is copied, and the model computes the same values."
            )
        # Lightning restores a checkpoint's weights (resume, --ckpt_path) before this
        # callback's state: the config it trained with is compared first, so a mismatch is
        # this error, not the weights' missing-keys error or another model run silently.
        wrap_hook(pl_module, "on_load_checkpoint", before=self._restoring, once=False)
        self._run = trainer.strategy.broadcast(uuid.uuid4().hex)  # one token on every rank
        wrap_hook(pl_module, "on_save_checkpoint", before=self._saving, once=False)
        if is_overridden("configure_model", pl_module):
            # Lightning calls configure_model after this hook and before the checkpoint
            # restore and the optimizers: the backbone may only exist from there on.
            wrap_hook(
                pl_module, "configure_model", after=lambda: self._apply(trainer, pl_module, stage)
            )
            return
        if not is_overridden("setup", pl_module):
            self._apply(trainer, pl_module, stage)
            return
        # The module's own setup runs right after this hook, and may build or replace parts
        # of the model (a backbone, reset_classifier for the data's classes, pretrained
        # weights loaded): S2A is applied right after it, to the model as it left it.
        if not _copies_in_setup(trainer):
            existing = _existing_handle(self, pl_module)
            before = parameter_layout(existing.model) if existing is not None else []

            def after_setup() -> None:
                if existing is not None:  # S2A from an earlier fit: setup must leave it be
                    self._check_unchanged(pl_module, existing, before)
                self._apply(trainer, pl_module, stage)

            wrap_hook(pl_module, "setup", after=after_setup)
            return
        # Another callback may copy the model in between (weight averaging, an EMA of the
        # user's own), so S2A is applied here first where it can be, and again after setup
        # where that changed the model. Where the model is not complete before it (no
        # backbone yet), S2A waits for it.
        try:
            self._apply(trainer, pl_module, stage)
        except Exception as err:  # raised again after setup if it still fails
            self.handle, self._module = None, None
            rank_zero_info(f"S2A waits for {type(pl_module).__name__}.setup: {err}")
            wrap_hook(pl_module, "setup", after=lambda: self._apply(trainer, pl_module, stage))
            return
        before = parameter_layout(self.handle.model)
        wrap_hook(
            pl_module,
            "setup",
            after=lambda: self._after_setup(trainer, pl_module, stage, before),
        )

    def _after_setup(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: str,
        before: list[tuple[str, int]],
    ) -> None:
        """Apply S2A again where the module's own setup changed the model it was applied to."""
        assert self.handle is not None
        if not self.applied_here:  # S2A from an earlier fit: setup must leave it be
            self._check_unchanged(pl_module, self.handle, before)
            return
        target, _ = self._target(pl_module)
        if target is self.handle.model and parameter_layout(target) == before:
            return
        self.handle.remove()
        self.handle = None
        self._apply(trainer, pl_module, stage)

    def _check_unchanged(
        self, pl_module: pl.LightningModule, existing: S2AHandle, before: list[tuple[str, int]]
    ) -> None:
        """A model that already had S2A (an earlier fit, load_adapter) must come out of the
        module's own setup as it went in: S2A cannot be applied again without losing what it
        trained, nor go on around parts it does not know."""
        target, _ = self._target(pl_module)
        if target is not existing.model or parameter_layout(target) != before:
            raise RuntimeError(
                f"{type(pl_module).__name__}.setup changed the model, which already had S2A "
                "applied (an earlier fit or load_adapter), so S2A cannot be applied again "
                "without losing what it trained. Make setup build or replace modules only "
                "once (e.g. `if not hasattr(self, 'encoder'): ...`)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unwrap_hook(pl_module, "setup")
        unwrap_hook(pl_module, "configure_model")
        if self.handle is None:
            raise RuntimeError(
                f"S2A was not applied: {type(pl_module).__name__}.configure_model (or setup) "
                "did not run."
            )
        check_batch_norms_in_place(self.handle)
        check_optimized(trainer, pl_module, self.handle)
        warn_frozen_optimizers(trainer, pl_module, self.handle)
        check_no_swa(trainer, self.handle)
        check_averaging_after(trainer, self)
        rank_zero_info(self._summary(pl_module))

    def _summary(self, pl_module: pl.LightningModule) -> str:
        """The handle's summary; where S2A covers a part of the module (``backbone=``), plus
        the whole module's trainable count, which ``s2a/trainable_params`` logs (a head
        outside the backbone trains too, and the two counts differed without a word)."""
        assert self.handle is not None
        text = self.handle.summary()
        if self.handle.model is not pl_module:
            count, share = count_trainable(pl_module)
            text += (
                f"\nwhole {type(pl_module).__name__} (as s2a/trainable_params logs, the parts "
                f"outside the S2A'd module included): {count:,} trainable ({100 * share:.3f}%)"
            )
        return text

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapter_path and trainer.is_global_zero:
            from ..adapters import save_adapter

            save_adapter(pl_module, self.adapter_path)
            rank_zero_info(f"S2A adapter written to {self.adapter_path}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Hooks off; the trained modules stay, so validate/test/predict/checkpoints use them.
        # S2A applied for an evaluation alone is removed: the module is as it was built.
        for handle, _ in (self._others or {}).values():  # their own engines stay attached
            handle.engine.end_steps()
            handle.engine.end_interrupted()  # a KeyboardInterrupt inside: hooks off
        self._others = None
        unwrap_hook(pl_module, "setup")
        unwrap_hook(pl_module, "configure_model")
        unwrap_hook(pl_module, "on_load_checkpoint")
        unwrap_hook(pl_module, "on_save_checkpoint")
        # A checkpoint of an S2A model restored by the run's ckpt_path stays, as Lightning
        # keeps restored weights: test(ckpt_path=...), then predict.
        if self.handle is not None and self._for_evaluation and not self._restored_s2a:
            self.handle.remove()
            self.handle = None
        elif self.handle is not None:
            # a training forward after this (a plain Trainer's fit) is told what it runs
            self.handle.stop_engine(watch=stage == "fit")
        # Last: the engines' hooks of a forward a KeyboardInterrupt cut short sat above these
        # (only the top of the thread's saved-tensor hooks can come off), so they stayed.
        self.stop_counting_outside()
        self._for_evaluation = self._restored_s2a = False

    def _evaluation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An evaluation alone, with nothing trained coming in (no checkpoint restored): see
        ``check_evaluation_alone``."""
        if self._alone_pending and self.handle is not None and trainer.ckpt_path is None:
            check_evaluation_alone(self.handle)
        self._alone_pending = False

    on_validation_start = on_test_start = on_predict_start = _evaluation_start

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips teardown when fit raises; the hooks must not outlive the run. A
        # restore that failed (another head's shapes) brought no S2A model to keep.
        self._restored_s2a = False
        self.teardown(trainer, pl_module, "fit")


#: The dtype each of Lightning's mixed precisions autocasts to, as ``frozen_dtype`` names it.
_AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def _copies_in_setup(trainer: pl.Trainer) -> bool:
    """True if another callback may copy the model in its ``setup``, which Lightning runs
    before the module's: a weight-averaging callback (EMA, SWA), or one of the user's own
    that has a ``setup`` (an EMA copy). Lightning's other callbacks copy no model there."""
    for c in trainer.callbacks:
        if isinstance(c, S2ACallback):  # this one, or another S2A's (an error of its own)
            continue
        if copies_model_in_setup(c):
            return True
        if not type(c).__module__.startswith("lightning.") and is_overridden("setup", c):
            return True
    return False


def _existing_handle(callback: S2ACallback, pl_module: pl.LightningModule) -> S2AHandle | None:
    """The S2A handle the module's target already has (an earlier fit), or None, also where
    the target does not exist yet."""
    try:
        target, _ = callback._target(pl_module)
    except ValueError:
        return None
    return get_handle(target)
