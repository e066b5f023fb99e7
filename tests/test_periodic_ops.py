"""sin and cos save their derivative, not their input: coded, it still gives the gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.structure.periodic_ops import periodic
from tests.conftest import cosine


class _Siren(nn.Module):
    """SIREN layers: ``sin(30 W x)`` spans tens of radians."""

    def __init__(self, method: bool = False) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(3, 256), nn.Linear(256, 256), nn.Linear(256, 1)
        self.method = method

    def forward(self, p):
        h = 30 * self.l1(p)
        h = h.sin() if self.method else torch.sin(h)
        return self.head(torch.cos(self.l2(h)))

    def get_classifier(self):
        return self.head


def _grads(compress: bool | None, method: bool = False) -> tuple[torch.Tensor, dict]:
    pts = torch.rand(512, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    model = _Siren(method).double()
    handle = apply_s2a(model, S2AConfig(compress=bool(compress)))
    if compress is None:  # the same trainable set in plain PyTorch
        handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or name.startswith("head"))
    model(pts * 2 - 1).abs().mean().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return grads, ({} if compress is None else handle.stats())


@pytest.mark.parametrize("method", [False, True])
def test_sin_and_cos_keep_their_gradient_in_four_bits(method):
    """Their inputs coded in 4 bits gave a SIREN's gradient cosine 0.86: cos of a decoded
    value one radian off is noise. The derivative, coded instead, keeps it."""
    plain, _ = _grads(None, method)
    exact, _ = _grads(False, method)
    coded, stats = _grads(True, method)
    assert torch.equal(exact, plain)  # uncompressed, the engine changes nothing
    assert cosine(coded, plain) > 0.999
    generic = stats["by_kind"]["generic"]  # the two derivatives, what custom Functions save
    assert generic["tensors"] == 2 and generic["stored_bytes"] * 4 < generic["raw_bytes"]


def test_the_rewrite_is_pytorchs_gradient_and_refuses_a_second_derivative():
    x = torch.randn(64, dtype=torch.float64) * 20
    for name, func in (("sin", torch.sin), ("cos", torch.Tensor.cos)):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = periodic(func, (a,), {}), func(b)
        assert torch.equal(out, ref), name
        w = torch.randn(64, dtype=torch.float64)
        (ga,) = torch.autograd.grad((out * w).sum(), a)
        (gb,) = torch.autograd.grad((ref * w).sum(), b)
        assert torch.equal(ga, gb), name
    # a second derivative through the saved derivative would be missing: refused
    y = periodic(torch.sin, (a,), {}) * a
    with pytest.raises(RuntimeError, match=r"create_graph=True.*\(sin, cos, tanh"):
        torch.autograd.grad(y.sum(), a, create_graph=True)
    # in place, out= and inputs without gradient run as they are
    assert periodic(torch.Tensor.sin_, (x.clone(),), {}) is NotImplemented
    assert periodic(torch.sin, (x,), {"out": torch.empty(64)}) is NotImplemented
    assert periodic(torch.sin, (x,), {}) is NotImplemented
