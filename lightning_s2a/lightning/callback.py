"""``S2ACallback``: S2A for an existing Lightning project in one line.

``Trainer(callbacks=[S2ACallback()])`` applies :func:`lightning_s2a.apply_s2a` in ``setup``,
which Lightning runs before ``configure_model``, the checkpoint restore, optimizer creation
and the DDP wrap: restored weights land in the injected modules, and optimizers and DDP see
only what trains. Metrics are logged through ``LightningModule.log`` so every logger gets them.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..api import S2AHandle, apply_s2a
from ..config import S2AConfig
from .metrics import EpochMeter, reset_peak_memory


class S2ACallback(pl.Callback):
    """Apply S2A to a LightningModule's backbone, log its memory each epoch, save adapters.

    The backbone is ``pl_module.backbone`` if it exists, else the attribute named by
    ``backbone="..."``, else the whole module (whose head must then be findable: timm's
    ``get_classifier()`` or ``S2AConfig(head="...")``). With a backbone attribute and
    ``head="auto"``, a backbone without ``get_classifier()`` keeps no head of its own: the
    LightningModule's head outside it trains as the user defined it.
    """

    def __init__(
        self,
        config: S2AConfig | None = None,
        backbone: str | None = None,
        adapter_path: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        config = config if config is not None else S2AConfig()
        self.config = config.replace(**fields) if fields else config
        self.backbone = backbone
        self.adapter_path = adapter_path
        self.handle: S2AHandle | None = None
        self._module: pl.LightningModule | None = None
        self._meter = EpochMeter()
        self._pending_state: dict[str, Any] | None = None

    # -- where S2A goes ----------------------------------------------------------------
    def _target(self, pl_module: pl.LightningModule) -> tuple[Any, S2AConfig]:
        name = self.backbone or ("backbone" if hasattr(pl_module, "backbone") else None)
        if name is None:
            return pl_module, self.config
        target = getattr(pl_module, name, None)
        if not isinstance(target, nn.Module):
            raise ValueError(
                f"S2ACallback(backbone={name!r}): {type(pl_module).__name__}.{name} is not an "
                "nn.Module; name the attribute that holds the backbone."
            )
        config = self.config
        if config.head == "auto" and not callable(getattr(target, "get_classifier", None)):
            config = config.replace(head=None)
        return target, config

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _check_single_s2a(trainer)
        if self.handle is not None and self._module is pl_module:  # later stage, same module
            if stage == "fit":
                self.handle.start_engine()
            return
        if self.config.frozen_dtype and "mixed" not in str(trainer.precision):
            raise ValueError(
                f"S2AConfig(frozen_dtype={self.config.frozen_dtype!r}) needs mixed precision so "
                "activations meet the low-precision weights under autocast; use "
                f"Trainer(precision='bf16-mixed') or frozen_dtype=None (got {trainer.precision!r})."
            )
        target, config = self._target(pl_module)
        self.handle = apply_s2a(target, config)
        self._module = pl_module
        if self._pending_state is not None:
            self.handle.engine.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None
        rank_zero_info(self.handle.summary())

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter.reset()
        reset_peak_memory(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        assert self.handle is not None
        self._meter.update(self.handle.stats())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.handle is not None
        metrics = self._meter.metrics(pl_module.device, self.handle.trainable_parameters())
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapter_path and trainer.is_global_zero:
            from ..adapters import save_adapter

            save_adapter(pl_module, self.adapter_path)
            rank_zero_info(f"S2A adapter written to {self.adapter_path}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Hooks off; the trained modules stay, so validate/test/predict/checkpoints use them.
        if self.handle is not None:
            self.handle.stop_engine()

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.handle is None else {"engine": self.handle.engine.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "engine" not in state_dict:
            return
        if self.handle is None:
            self._pending_state = state_dict["engine"]
        else:
            self.handle.engine.load_state_dict(state_dict["engine"])


def _check_single_s2a(trainer: pl.Trainer) -> None:
    """Two S2A appliers on one trainer (two callbacks, or callback and strategy) is an error."""
    owners = [c for c in trainer.callbacks if isinstance(c, S2ACallback)]
    if len(owners) > 1:
        from .strategy import S2AStrategyMixin

        via_strategy = isinstance(trainer.strategy, S2AStrategyMixin)
        raise ValueError(
            "S2A is configured twice on this Trainer"
            + (" (strategy='s2a' and an S2ACallback)" if via_strategy else " (two S2ACallbacks)")
            + ": use either Trainer(strategy='s2a') or Trainer(callbacks=[S2ACallback()]), "
            "not both."
        )
