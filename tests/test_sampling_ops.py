"""Where codes would move a sample or divide by nearly nothing: ``grid_sample``'s grid (kind
"position", exact), the input of a sampling whose grid trains (kind "sampled", 8 bits), and
what ``atan2``/``hypot`` save (kind "singular", exact).

Until 2026-12-07 each got 4-bit min-max codes: a bias before a spatial transformer's
``grid_sample`` 34% off (127% with offsets computed from the features), before ``atan2``
100-158% off.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a

B, C, SIZE = 2, 32, 32


class Warp(nn.Module):
    """conv, GELU, ``grid_sample`` at a fixed affine grid or at offsets computed from the
    features (deformable sampling), then a 1x1 conv."""

    def __init__(self, deformable: bool) -> None:
        super().__init__()
        self.deformable = deformable
        self.conv1, self.conv2 = nn.Conv2d(3, C, 3, padding=1), nn.Conv2d(C, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv1(x))
        n = h.shape[0]
        if self.deformable:
            base = F.affine_grid(torch.eye(2, 3, dtype=h.dtype).expand(n, 2, 3), h.shape, False)
            grid = base + 0.1 * torch.tanh(h[:, :2].permute(0, 2, 3, 1))
        else:
            theta = torch.tensor([[0.9, 0.2, 0.05], [-0.15, 1.1, 0.1]], dtype=h.dtype)
            grid = F.affine_grid(theta.expand(n, 2, 3), h.shape, align_corners=False)
        return self.conv2(F.grid_sample(h, grid, align_corners=False))


class Angle(nn.Module):
    """Orientation and magnitude of two feature maps: ``atan2`` or ``hypot``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.gx, self.gy = nn.Linear(16, 64), nn.Linear(16, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = torch.atan2 if self.op == "atan2" else torch.hypot
        return self.out(fn(self.gy(x), self.gx(x)))


def _compare(model: nn.Module, x: torch.Tensor, **config):
    """Bias-only gradients at ``config`` against the uncompressed run's (float64), and the
    compressed run's bytes by kind."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    grads = []
    for cfg in (S2AConfig(head=None, compress=False), S2AConfig(head=None, **config)):
        m = copy.deepcopy(model)
        handle = apply_s2a(m, cfg)
        r = torch.randn(m(x).shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
        (m(x) * r).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    exact, coded = grads
    return exact, coded, handle.stats()["by_kind"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("deformable", [False, True])
def test_grid_sample_keeps_its_grid_exact(deformable):
    torch.manual_seed(0)
    model = Warp(deformable).double()
    x = torch.randn(B, 3, SIZE, SIZE, dtype=torch.float64)
    exact, coded, kinds = _compare(model, x)
    # measured: 0.032 fixed, 0.048 deformable (0.34 and 1.27 with the grid coded)
    assert _rel(coded["conv1.bias"], exact["conv1.bias"]) < 0.08
    grid_bytes = B * SIZE * SIZE * 2 * 8
    assert kinds["position"] == {"raw_bytes": grid_bytes, "stored_bytes": grid_bytes, "tensors": 1}
    sampled = kinds["sampled" if deformable else "generic"]  # grid_sample's input
    assert sampled["raw_bytes"] >= B * C * SIZE * SIZE * 8
    # the input at 8 bits where the grid trains (its gradient differences the input), else 4
    assert sampled["stored_bytes"] * (6 if deformable else 12) < sampled["raw_bytes"]
    if deformable:
        assert sampled["stored_bytes"] * 8 > sampled["raw_bytes"]


def test_op_bits_codes_a_grid_when_asked():
    torch.manual_seed(0)
    model = Warp(deformable=True).double()
    x = torch.randn(B, 3, SIZE, SIZE, dtype=torch.float64)
    _, _, kinds = _compare(model, x, op_bits={"position": 8, "sampled": 4})
    assert kinds["position"]["stored_bytes"] * 6 < kinds["position"]["raw_bytes"]
    assert kinds["sampled"]["stored_bytes"] * 12 < kinds["sampled"]["raw_bytes"]


@pytest.mark.parametrize("op", ["atan2", "hypot"])
def test_atan2_and_hypot_keep_what_they_save_exact(op):
    torch.manual_seed(0)
    model = Angle(op).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    exact, coded, kinds = _compare(model, x)
    for name in ("gx.bias", "gy.bias"):
        assert torch.equal(coded[name], exact[name])
    singular = kinds["singular"]
    assert singular["stored_bytes"] == singular["raw_bytes"] >= 2 * 64 * 64 * 8
    _, _, kinds = _compare(model, x, op_bits={"singular": 8})
    assert kinds["singular"]["stored_bytes"] * 6 < kinds["singular"]["raw_bytes"]


def test_an_input_shaped_like_the_grid_is_no_grid():
    # (N, C, H, W) == (N, Hg, Wg, 2): the input was taken for the grid and kept exact.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 2, dtype=torch.float64)
    grid = torch.rand(2, 5, 7, 2, dtype=torch.float64) * 2 - 1

    class Sample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.grid_sample(self.pre(x), grid, align_corners=False)

    handle = apply_s2a(Sample().double(), S2AConfig(head=None, min_numel=1))
    handle.model(x).sum().backward()
    kinds = handle.stats()["by_kind"]
    assert kinds["position"]["tensors"] == 1  # the grid, not the input as well
    assert kinds["generic"]["stored_bytes"] < kinds["generic"]["raw_bytes"]
