"""amax/amin and full max/min keep only the 1-bit mask ``x == out``: PyTorch's exact gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.structure.extremum_ops import masked_extremum, masked_norm
from tests.conftest import assert_close_in_norm

CASES = [
    (torch.amax, {"dim": 1}),
    (torch.amin, {"dim": (0, 2), "keepdim": True}),
    (torch.Tensor.amax, {"dim": -1, "keepdim": False}),
    (torch.amax, {}),  # dim=(): every dimension
    (torch.max, {}),
    (torch.Tensor.min, {}),
]


@pytest.mark.parametrize(("func", "kwargs"), CASES)
def test_rewrite_matches_pytorch_gradient_with_ties(func, kwargs):
    torch.manual_seed(0)
    # Rounded values make ties, which the gradient splits evenly between them.
    x = (torch.randn(4, 6, 5, dtype=torch.float64) * 2).round()
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = masked_extremum(func, (a,), kwargs)
    ref = func(b, **kwargs)
    assert out is not NotImplemented
    assert out.grad_fn is not None and "MaskedExtremum" in type(out.grad_fn).__name__
    assert torch.equal(out, ref)
    # Only the boolean mask is saved: neither the input nor the output.
    assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.bool]
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert_close_in_norm(a.grad, b.grad, 1e-14)


def test_nan_gradients_follow_pytorch():
    x = torch.tensor([[1.0, float("nan"), 3.0], [4.0, 5.0, 5.0]], dtype=torch.float64)
    for func, kwargs in ((torch.max, {}), (torch.amax, {"dim": 1})):
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        masked_extremum(func, (a,), kwargs).sum().backward()
        func(b, **kwargs).sum().backward()
        assert torch.equal(a.grad.isnan(), b.grad.isnan()), func
        assert torch.equal(a.grad.nan_to_num(-7.0), b.grad.nan_to_num(-7.0)), func


@pytest.mark.parametrize(
    ("func", "args", "kwargs"),
    [
        (torch.max, (1,), {}),  # max(x, dim) saves indices, not values
        (torch.max, (), {"dim": 1}),
        (torch.amax, (), {"dim": 1.5}),
    ],
)
def test_rewrite_declines_other_forms(func, args, kwargs):
    x = torch.randn(3, 4, requires_grad=True)
    assert masked_extremum(func, (x, *args), kwargs) is NotImplemented
    assert masked_extremum(torch.amax, (x.detach(),), {"dim": 1}) is NotImplemented


class _Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x).amax(dim=1))


def _grads(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trainable parameters' gradients of ``sum(model(x)^2)``, flattened."""
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("surgery", [True, False])
def test_engine_uses_the_rewrite_whenever_it_compresses(surgery):
    torch.manual_seed(0)
    model = _Pool().double()
    x = torch.randn(4, 16, 8, dtype=torch.float64)
    config = S2AConfig(modules=["bias"], head=None, surgery=surgery)

    with apply_s2a(model, config.replace(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, config) as handle:
        approx = _grads(model, x)
        masks = handle.stats()["by_kind"]["mask"]
    assert torch.isfinite(approx).all()
    # The only saved tensor before fc's bias is the amax mask, packed to one exact bit per
    # element, so the bias gradient is exact; fc's output is never saved.
    numel = 4 * 16 * 32
    # raw: what PyTorch's amax keeps, its float64 input and output (4 x 32)
    assert masks["raw_bytes"] == numel * 8 + 4 * 32 * 8
    assert masks["stored_bytes"] == numel // 8  # one bit per element
    assert_close_in_norm(approx, exact, 1e-12)


NORMS = [
    (torch.linalg.vector_norm, {"ord": float("inf"), "dim": -1, "keepdim": True}),
    (torch.linalg.vector_norm, {"ord": -float("inf"), "dim": (0, 2)}),
    (torch.linalg.vector_norm, {"ord": float("inf")}),  # every dimension
    (torch.linalg.vector_norm, {"ord": float("inf"), "dim": 1, "dtype": torch.float64}),
    (torch.Tensor.norm, {"p": float("inf"), "dim": 1}),
    # as the operator mode sees torch.norm: out and dtype passed as None
    (torch.norm, {"p": -float("inf"), "dim": 1, "keepdim": False, "out": None, "dtype": None}),
    (torch.linalg.norm, {"ord": float("inf"), "dim": -1}),
]


@pytest.mark.parametrize(("func", "kwargs"), NORMS)
def test_inf_norm_rewrite_matches_pytorch_gradient_with_ties(func, kwargs):
    # A vector norm of order +-inf is amax/amin of |x|: its backward compares |x| with the
    # norm as amax's does, and coded the two never met (NaN gradients).
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 5, dtype=torch.float64) * 2).round()  # ties, zeros, both signs
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = masked_norm(func, (a,), kwargs)
    ref = func(b, **{k: v for k, v in kwargs.items() if k != "out"})
    # Only two exact masks are saved (where |x| is the norm, and x's sign): not x itself.
    assert [t.dtype for t in out.grad_fn.saved_tensors] == [torch.bool, torch.bool]
    assert out is not NotImplemented and torch.equal(out, ref)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert_close_in_norm(a.grad, b.grad, 1e-14)


@pytest.mark.parametrize(
    ("func", "kwargs"),
    [
        (torch.linalg.vector_norm, {"ord": 2, "dim": -1}),
        (torch.Tensor.norm, {}),  # Frobenius
        (torch.linalg.norm, {"ord": float("inf")}),  # a matrix norm of a 3-D input: refused
        (torch.linalg.norm, {"ord": float("inf"), "dim": (0, 1)}),  # a matrix norm
    ],
)
def test_inf_norm_rewrite_declines_other_norms(func, kwargs):
    x = torch.randn(3, 4, 5, requires_grad=True)
    assert masked_norm(func, (x,), kwargs) is NotImplemented


class _InfNormalized(_Pool):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.form == "normalize":
            return self.head(F.normalize(h, p=float("inf"), dim=-1).mean(1))
        order = float("inf") if self.form == "+inf" else -float("inf")
        # + 1: a -inf norm is the smallest |h|, and dividing by it would amplify any code
        return self.head((h / (torch.norm(h, p=order, dim=-1, keepdim=True) + 1)).mean(1))


@pytest.mark.parametrize("form", ["+inf", "-inf", "normalize"])
def test_engine_gradients_through_an_inf_norm_are_finite_and_close(form):
    # -inf: the element that sets the norm is the one nearest zero, whose coded sign flipped.
    torch.manual_seed(0)
    model = _InfNormalized(form).double()
    x = torch.randn(4, 16, 8, dtype=torch.float64)
    config = S2AConfig(modules=["bias"], head=None)

    with apply_s2a(model, config.replace(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, config):
        approx = _grads(model, x)
    assert torch.isfinite(approx).all()
    assert_close_in_norm(approx, exact, 0.02)


_RAW_OPS = {
    "amax": lambda h: F.gelu(h).amax(1, keepdim=True) * h,
    "amin": lambda h: h - h.amin(1, keepdim=True),
    "full max": lambda h: h * h.max(),
    "inf norm": lambda h: h / torch.linalg.vector_norm(h, ord=float("inf"), dim=-1, keepdim=True),
    "normalize inf": lambda h: F.normalize(h, p=float("inf"), dim=-1),
    "sin": lambda h: torch.sin(3 * h),
    "abs": lambda h: h.abs(),
    "l1 norm": lambda h: h / torch.norm(h, p=1, dim=-1, keepdim=True),
    "normalize l1": lambda h: F.normalize(h, p=1, dim=-1),
}


class _RawNet(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op, self.a, self.c, self.head = (
            op,
            nn.Linear(64, 64),
            nn.Linear(64, 64),
            nn.Linear(64, 5),
        )

    def forward(self, x):
        return self.head(self.c(_RAW_OPS[self.op](self.a(x))).mean(1))


@pytest.mark.parametrize("op", list(_RAW_OPS))
def test_raw_bytes_count_what_the_uncompressed_run_keeps(op):
    """The rewrites installed with compression save a mask (or a derivative) in place of
    PyTorch's input and output: raw counted the mask, up to 86% low (amin) or 24% high (an
    inf norm) against ``compress=False``, so the reported ratio erred either way."""
    torch.manual_seed(0)
    model = _RawNet(op).double()
    x = torch.randn(4, 50, 64, dtype=torch.float64)
    raw = []
    for cfg in ({"compress": False}, {}, {"bits": 8}):
        with apply_s2a(model, S2AConfig(head="head", **cfg)) as handle:
            model(x).sum().backward()
            raw.append(handle.stats()["raw_bytes"])
    assert raw[0] > 0 and raw[1] == raw[0] and raw[2] == raw[0]
