"""Run by tests/test_ddp.py as a script: a 2-process CPU (gloo) DDP fit with S2A.

Usage: python tests/ddp_fit.py {strategy|callback|fork|calibrate} OUT_DIR. Each rank writes
its final trainable state and what DDP synchronises to OUT_DIR/rank{N}.pt. ``fork``: ddp_fork
with S2A applied before fit in this process; the main process also writes its model's state
after fit to OUT_DIR/main.pt (the workers' result copied back). ``calibrate``: the callback
with ``calibrate=True``; each rank also writes the errors it measured on its own share of
the first batch, and those the engine decided on. ``callback``: rank 1 runs its backbone
inside torch.utils.checkpoint (S2A measures none of its steps); each rank writes the epoch
metrics it logged.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_s2a import S2ACallback, S2AConfig, S2ADDPStrategy, apply_s2a, get_handle
from lightning_s2a.engine import calibration
from tests.lightning_helpers import UserModule, _data, quiet_trainer


class Rank1Checkpointed(UserModule):
    """The callback mode's model: on rank 1 the backbone runs whole inside
    torch.utils.checkpoint, where S2A stays out, so that rank measures no step."""

    def forward(self, x):
        if self.global_rank == 1 and torch.is_grad_enabled():
            return checkpoint(self.backbone, x, use_reentrant=False)
        return self.backbone(x)


class RecordDDP(pl.Callback):
    """What the model looks like while training: the DDP wrapper and what it synchronises."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ddp = trainer.strategy.model
        self.ddp_type = type(ddp).__name__
        self.synced = sum(p.numel() for p in ddp.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in ddp.parameters())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.in_worker:  # a ddp_fork worker: its state goes before the process ends
            save_rank(trainer, pl_module, self, self.out)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    cfg = S2AConfig(modules=("bias", "prompt"), input_size=(3, 32, 32))
    local: list[dict[str, float]] = []
    if mode == "calibrate":
        cfg = cfg.replace(calibrate=True, calibrate_tol=0.03)
        measure = calibration._measure

        def recorded(*args, **kwargs):
            out = measure(*args, **kwargs)
            local.append(dict(out[0]))
            return out

        calibration._measure = recorded
    pl.seed_everything(0)
    model = Rank1Checkpointed() if mode == "callback" else UserModule()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    applied = None
    if mode == "fork":  # the forked workers take up the S2A this process applied
        apply_s2a(model.backbone, cfg)
        applied = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = (
        {"strategy": S2ADDPStrategy(cfg)}
        if mode == "strategy"
        else {"strategy": "ddp_fork" if mode == "fork" else "ddp", "callbacks": [S2ACallback(cfg)]}
    )
    record = RecordDDP()
    record.initial, record.out, record.in_worker = initial, out, mode == "fork"
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), record]
    trainer = quiet_trainer(max_epochs=1, devices=2, **kwargs)
    trainer.fit(model, _data(), _data(8))
    if mode == "fork":  # the main process: the model as Lightning copied the result back
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "applied": applied}, os.path.join(out, "main.pt"))
        return
    extra = {}
    if mode == "calibrate":
        engine = get_handle(model.backbone).engine
        extra = {"local": local, "decided": engine.calibration, "module_bits": engine.module_bits}
    save_rank(trainer, model, record, out, **extra)


def save_rank(
    trainer: pl.Trainer, model: pl.LightningModule, record: RecordDDP, out: str, **extra
) -> None:
    """This rank's trained state, its initial one and what DDP synchronised."""
    torch.save(
        {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "initial": record.initial,
            "ddp_type": record.ddp_type,
            "synced_numel": record.synced,
            "total_numel": record.total,
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "epoch_metrics": next(  # this rank's own values (the callback's epoch_metrics)
                (c.epoch_metrics for c in trainer.callbacks if hasattr(c, "epoch_metrics")), {}
            ),
            **extra,
        },
        os.path.join(out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
