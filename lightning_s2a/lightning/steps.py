"""What ``S2ACallback`` does around each training step: it marks the step for the engines'
accounting (its own and other S2A'd modules'), calibrates on the first batch, meters the
step's saved bytes and logs the ``s2a/*`` metrics at each epoch's end. A mixin, in a file of
its own so the callback's file stays about applying S2A and the run's other hooks."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from ..api import S2AHandle, count_trainable
from ..engine.outside import OUTSIDE, OutsideModules
from .calibration import calibrate_on_batch
from .checkpoint import other_handles
from .metrics import EpochMeter, reset_peak_memory


class TrainingSteps:
    """The training-step half of :class:`~lightning_s2a.lightning.callback.S2ACallback` (it
    reads the callback's ``handle`` and keeps ``_meter``, ``_others``, ``_forwards_before``,
    ``_warned`` and ``epoch_metrics``)."""

    handle: S2AHandle | None
    _meter: EpochMeter
    _outside: OutsideModules | None
    count_outside: bool
    _others: dict[str, list[Any]] | None
    _forwards_before: int
    _out_before: int
    _failed_before: int
    _warned: bool
    epoch_metrics: dict[str, float]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter.reset()
        reset_peak_memory(pl_module.device)
        # What the module's other modules save (your classifier beside the S2A'd encoder)
        # counts in the step's bytes, as it is (until 2026-12-07 it was left out).
        self.stop_counting_outside()
        if self.handle is not None and self.count_outside:
            self._outside = self.handle.count_outside(pl_module)

    def stop_counting_outside(self) -> None:
        """Take the other modules' counting hooks off (each epoch's end, teardown)."""
        outside, self._outside = self._outside, None
        if outside is not None:
            outside.remove()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.handle is not None
        # The step's forwards add up (two views of a batch); calibration's forwards too,
        # as the real step's will (before 2026-12-07 a second view opened an account of
        # its own there and refitted a codebook that the real step then reused).
        self.handle.engine.begin_step()
        if self.handle.config.calibrate and not self.handle.engine.calibrated:
            calibrate_on_batch(trainer, pl_module, self.handle, batch, batch_idx)
        self._forwards_before = self.handle.engine.forwards
        self._out_before = self.handle.engine.forwards_out
        self._failed_before = self.handle.engine.forwards_failed
        if self._others is None:
            self._others = {path: [h, 0] for path, h in other_handles(pl_module, self.handle)}
        for entry in self._others.values():
            entry[0].engine.begin_step()
            entry[1] = entry[0].engine.forwards

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        assert self.handle is not None
        engine = self.handle.engine
        if engine.forwards == self._forwards_before:
            if engine.forwards_out != self._out_before:
                self._warn_once(
                    trainer,
                    "ran its forwards in this training step inside other saved-tensor hooks "
                    "(torch.utils.checkpoint around the whole module, save_on_cpu) or a "
                    "torch.func transform, where S2A stays out: its parameters train, but "
                    "nothing was compressed or counted, and the s2a/activation_* metrics of an "
                    "epoch with no other step are NaN. Checkpoint inside the module (its "
                    "blocks: timm's set_grad_checkpointing) to keep both.",
                )
                return
            self._warn_once(
                trainer,
                "ran no forward with autograd enabled in this training step: nothing was "
                "compressed and its S2A parameters get no gradient. Call it inside "
                "training_step, outside torch.no_grad().",
            )
            return
        if engine.forwards - self._forwards_before == engine.forwards_failed - self._failed_before:
            return  # every forward raised (a batch skipped after an error): nothing to measure
        stats = self.handle.engine.step_stats()  # several backwards: the largest account
        outside = stats["by_part"].get(OUTSIDE, {}).get("raw_bytes", 0)  # other modules'
        for handle, before in (self._others or {}).values():  # their step's bytes, alongside
            if handle.engine.forwards != before:
                more = handle.engine.step_stats()
                stats = {k: stats[k] + more[k] for k in ("raw_bytes", "stored_bytes")}
        if stats["raw_bytes"] == outside:
            self._warn_once(
                trainer,
                "saved no tensors for backward in this training step, so there is nothing to "
                "compress (expected only when every operator in it is linear in a frozen "
                "weight); check that the backbone's forward does the work.",
            )
        self._meter.update(stats)

    def _warn_once(self, trainer: pl.Trainer, why: str) -> None:
        if not self._warned:
            self._warned = True
            assert self.handle is not None
            rank_zero_warn(
                f"S2A: {type(self.handle.model).__name__} (the S2A'd module) {why} "
                f"(step {trainer.global_step}; warned once)."
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_counting_outside()
        # Counted on the whole LightningModule: a head outside the backbone trains too.
        weights = self.handle.weight_bytes() if self.handle is not None else (0, 0)
        if trainer.world_size > 1:
            self._meter.sum_over_ranks(
                partial(trainer.strategy.reduce, reduce_op="sum"), trainer.strategy.root_device
            )
        metrics = self._meter.metrics(pl_module.device, count_trainable(pl_module), weights)
        self.epoch_metrics = {key: float(value) for key, value in metrics.items()}
        if trainer.barebones:  # logging is off there (Lightning warns at every self.log)
            return
        for key, value in metrics.items():
            # the memory the most loaded device needs (a mean hid rank 0's logger and
            # checkpoint writing); the rest are reduced over the ranks already, or alike
            fx = "max" if key == "s2a/peak_memory_mb" else "mean"
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx=fx)
