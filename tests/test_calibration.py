"""First-step calibration: modules whose codes bend their local gradient are widened."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_s2a import S2ACallback, S2AConfig, apply_s2a, get_handle


class LinearAttention(nn.Module):
    """EfficientViT-style linear attention: ReLU kernels, then a division by a saved sum,
    whose min-max codes bend the gradient (the divisor's small values lose most)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 1), value=1.0)
        out = q @ (k.transpose(-1, -2) @ v)
        return out[..., :-1] / (out[..., -1:] + 1e-15)


class Encoder(nn.Module):
    """A user's encoder: an embedding, the linear attention and a GELU MLP, residual."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = LinearAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        return self.drop(h + self.mlp(h)).mean(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 256, 8, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (4,), generator=g
    )


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout in every run
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def test_calibration_widens_the_module_that_bends_the_gradient_and_only_it():
    model = _model()
    x, y = _batch(0)
    xc, yc = _batch(1)  # calibrated on another batch than the one measured
    cfg = S2AConfig(head="classifier")
    with apply_s2a(model, cfg.replace(compress=False)):
        exact = _grads(model, x, y)
    with apply_s2a(model, cfg) as handle:
        before = _grads(model, x, y)
        stored_before = handle.stats()["stored_bytes"]
        errors = handle.calibrate(lambda: F.cross_entropy(model(xc), yc))
        after = _grads(model, x, y)
        stored_after = handle.stats()["stored_bytes"]
        assert "calibration: 1 of" in handle.summary() and "encoder.attn" in handle.summary()
    assert cfg.calibration_tol() == 0.05
    assert errors["encoder.attn"] > 0.05 > errors["encoder.mlp.1"] > 0.01  # the GELU: ~3.5%
    assert handle.engine.module_bits == {"encoder.attn": 8}
    err_before = ((before - exact).norm() / exact.norm()).item()
    err_after = ((after - exact).norm() / exact.norm()).item()
    assert err_before > 0.02 and err_after < err_before / 5
    assert stored_after > stored_before  # the attention's codes are wider now


def test_calibration_leaves_training_state_as_it_was():
    """Same random stream, BatchNorm statistics, gradients, step and statistics after it."""
    model = _model()
    model.encoder.norm = nn.BatchNorm1d(256).double()
    forward = model.encoder.forward
    model.encoder.forward = lambda x: forward(model.encoder.norm(x))
    x, y = _batch(0)
    with apply_s2a(model, head="classifier", bn_mode="train") as handle:
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats, step, forwards = handle.stats(), handle.engine.step, handle.engine.forwards
        running = model.encoder.norm.running_mean.clone()
        torch.manual_seed(5)
        handle.calibrate(lambda: F.cross_entropy(model(x), y))
        drawn = torch.rand(3)
        torch.manual_seed(5)
        assert torch.equal(drawn, torch.rand(3))
        assert torch.equal(model.encoder.norm.running_mean, running)
        for n, p in model.named_parameters():
            assert (p.grad is None) == (n not in grads) and (
                p.grad is None or torch.equal(p.grad, grads[n])
            )
        assert handle.stats() == stats
        assert (handle.engine.step, handle.engine.forwards) == (step, forwards)


def test_calibration_survives_a_checkpoint():
    model = _model()
    xc, yc = _batch(1)
    with apply_s2a(model, head="classifier") as handle:
        handle.calibrate(lambda: F.cross_entropy(model(xc), yc))
        state = handle.engine.state_dict()
    fresh = _model()
    with apply_s2a(fresh, head="classifier") as handle:
        assert not handle.engine.calibrated
        handle.engine.load_state_dict(state)
        assert handle.engine.calibrated and handle.engine.module_bits == {"encoder.attn": 8}
        assert handle.engine.calibration["encoder.attn"] > 0.05


def test_calibration_errors_are_clear():
    model = _model()
    x, y = _batch(0)
    with apply_s2a(model, head="classifier") as handle:
        with pytest.raises(TypeError, match="scalar loss"):
            handle.calibrate(lambda: model(x))
        assert not handle.engine.calibrated and handle.engine.module_bits == {}
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"outside torch\.no_grad"):
            handle.calibrate(lambda: F.cross_entropy(model(x), y))
        handle.stop_engine()
        with pytest.raises(RuntimeError, match="start_engine"):
            handle.calibrate(lambda: F.cross_entropy(model(x), y))
    for tol in (0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="calibrate_tol"):
            S2AConfig(calibrate_tol=tol)
    with pytest.raises(ValueError, match="compress=False"):
        S2AConfig(calibrate=True, compress=False)
    assert (
        S2AConfig(bits=2).calibration_tol() == 0.2
        and S2AConfig(bits=8).calibration_tol() == 0.003125
    )


class UserModule(pl.LightningModule):
    """A user's project: the encoder under its own name, an own head and optimizer."""

    def __init__(self, manual: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = Encoder()
        self.head = nn.Linear(16, 3)
        self.automatic_optimization = not manual
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        loss = F.cross_entropy(self.head(self.encoder(x)), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, batches: int = 2) -> pl.Trainer:
    x, y = _batch(0)
    data = DataLoader(TensorDataset(x.float(), y), batch_size=4)  # divisor: 1,024 values
    trainer = pl.Trainer(
        max_steps=batches,
        callbacks=[S2ACallback(backbone="encoder", calibrate=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return trainer


def test_the_callback_calibrates_on_the_first_batch_through_the_users_step():
    module = UserModule()
    trainer = _fit(module)
    handle = get_handle(module.encoder)
    assert handle is not None and handle.engine.calibrated
    assert handle.engine.module_bits == {"attn": 8}  # names inside the S2A'd encoder
    assert module.steps == 2 + 2  # two real steps, and calibration's two forwards once
    assert "train_loss" in trainer.callback_metrics
    assert "log" not in vars(module)  # logging is the module's own again


def test_the_callback_refuses_to_calibrate_under_manual_optimization():
    with pytest.raises(RuntimeError, match="manual optimization"):
        _fit(UserModule(manual=True))
