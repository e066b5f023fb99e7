"""abs and order-1 norms save the sign of their input in two exact bits, not the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.structure.extremum_ops import masked_norm, normalize_masked
from lightning_s2a.structure.sign_ops import signed_abs
from tests.conftest import assert_close_in_norm

_SPECIAL = torch.tensor([0.0, -0.0, float("nan"), 1e-30, -1e-30, 2.0, -3.0], dtype=torch.float64)


def _input() -> torch.Tensor:
    x = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0] = _SPECIAL  # zeros of both signs, a NaN and values far below any 4-bit step
    return x


def _grad_pair(rewrite, func, args_after, kwargs):
    """Gradients of ``sum(w * out)`` through the rewrite and through PyTorch's op."""
    x = _input()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = rewrite(func, (a, *args_after), kwargs)
    ref = func(b, *args_after, **kwargs)
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (ga,) = torch.autograd.grad((out * w).nansum(), a)
    (gb,) = torch.autograd.grad((ref * w).nansum(), b)
    return a, b, ga, gb


@pytest.mark.parametrize("func", [torch.abs, torch.Tensor.abs, torch.absolute])
def test_abs_rewrite_is_pytorchs_gradient_at_zero_nan_and_tiny_values(func):
    *_, ga, gb = _grad_pair(signed_abs, func, (), {})
    assert torch.equal(ga.nan_to_num(7.0), gb.nan_to_num(7.0))
    assert ga[0, :3].tolist() == [0.0, 0.0, 0.0]  # zeros and the NaN: no gradient, as PyTorch
    assert ga[0, 3] != 0 and ga[0, 4] != 0  # far below any 4-bit step: still a gradient
    # a second derivative: d/dx (x * |x|) = 2|x|, whose own derivative is 2 sgn(x)
    a, b = _input().requires_grad_(), _input().requires_grad_()
    ya, yb = signed_abs(func, (a,), {}) * a, func(b) * b
    (ga,) = torch.autograd.grad(ya.nansum(), a, create_graph=True)
    (gb,) = torch.autograd.grad(yb.nansum(), b, create_graph=True)
    (ha,) = torch.autograd.grad(ga.nansum(), a)
    (hb,) = torch.autograd.grad(gb.nansum(), b)
    assert torch.equal(ha.nan_to_num(7.0), hb.nan_to_num(7.0))


_L1_FORMS = [
    (torch.linalg.vector_norm, (), {"ord": 1, "dim": -1, "keepdim": True}),
    (torch.linalg.vector_norm, (), {"ord": 1.0, "dim": (0, 1)}),
    (torch.linalg.vector_norm, (), {"ord": 1}),  # every dimension
    (torch.linalg.vector_norm, (), {"ord": 1, "dim": 0, "dtype": torch.float64}),
    (torch.Tensor.norm, (), {"p": 1, "dim": 1}),
    (torch.norm, (), {"p": 1, "dim": 0, "keepdim": False, "out": None, "dtype": None}),
    (torch.linalg.norm, (), {"ord": 1, "dim": -1}),
]


@pytest.mark.parametrize(("func", "args", "kwargs"), _L1_FORMS)
def test_l1_norm_rewrite_is_pytorchs_gradient(func, args, kwargs):
    *_, ga, gb = _grad_pair(masked_norm, func, args, kwargs)
    assert torch.equal(ga, gb)


def test_normalize_l1_rewrite_is_pytorchs_gradient():
    x = _input()[1:]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = normalize_masked(F.normalize, (a,), {"p": 1, "dim": -1})
    ref = F.normalize(b, p=1, dim=-1)
    assert torch.equal(out, ref)
    w = torch.randn(ref.shape, dtype=torch.float64)
    (ga,) = torch.autograd.grad((out * w).sum(), a)
    (gb,) = torch.autograd.grad((ref * w).sum(), b)
    assert_close_in_norm(ga, gb, 1e-12)  # the same formula, evaluated in another order


@pytest.mark.parametrize(
    ("func", "args", "kwargs"),
    [
        (torch.abs, (), {"out": torch.empty(6, 7, dtype=torch.float64)}),
        (torch.Tensor.abs_, (), {}),  # in place
        (torch.linalg.vector_norm, (), {"ord": -1, "dim": -1}),  # needs the values
        (torch.linalg.norm, (), {"ord": 1}),  # a matrix norm of a 2-D input
        (torch.norm, (), {"p": 2, "dim": -1}),
    ],
)
def test_sign_rewrites_decline_other_forms(func, args, kwargs):
    x = _input().requires_grad_()
    rewrite = signed_abs if func in (torch.abs, torch.Tensor.abs_) else masked_norm
    assert rewrite(func, (x, *args), kwargs) is NotImplemented
    assert signed_abs(torch.abs, (torch.randn(3, dtype=torch.complex128),), {}) is NotImplemented
    assert signed_abs(torch.abs, (_input(),), {}) is NotImplemented  # needs no gradient


class _SignNet(nn.Module):
    """Two linears with ``abs`` after each, then an order-1 normalization: every bias's
    gradient goes through the sign of values near zero."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.form == "abs":
            h = self.b(torch.abs(h)).abs()
        elif self.form == "l1 norm":
            h = self.b(h / torch.linalg.vector_norm(h, ord=1, dim=-1, keepdim=True))
        else:
            h = self.b(F.normalize(h, p=1, dim=-1))
        return self.head(h.mean(1))


@pytest.mark.parametrize("form", ["abs", "l1 norm", "normalize"])
def test_engine_keeps_the_sign_exact_at_four_bits(form):
    """Coded in 4 bits, the input of ``abs`` flipped sign near zero: the first bias's gradient
    came out 34% off. With the sign saved exactly it is PyTorch's, in 2 bits per element."""
    torch.manual_seed(0)
    model = _SignNet(form).double()
    x = torch.randn(8, 16, 64, dtype=torch.float64)
    grads = []
    for cfg in ({"compress": False}, {}):
        with apply_s2a(model, S2AConfig(head="head", min_numel=1, **cfg)) as handle:
            model(x).sum().backward()
            grads.append(torch.cat([model.a.bias.grad, model.b.bias.grad]))
            stats = handle.stats()
            model.zero_grad(set_to_none=True)
    exact, coded = grads
    if form == "abs":
        assert torch.equal(coded, exact)  # nothing else coded lies on the biases' path
        masks = stats["by_kind"]["mask"]
        assert (
            masks["tensors"] == 4 and masks["stored_bytes"] * 32 == masks["raw_bytes"]
        )  # 2 bits of 64
    else:  # the division's own saved input is min-max coded: 2e-5 off (0.33 without)
        assert_close_in_norm(coded, exact, 6e-5)
