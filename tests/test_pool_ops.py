"""Max pooling with one-byte window offsets: same gradients, far fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_s2a.structure.pool_ops import compact_max_pool2d
from tests.conftest import assert_close_in_norm


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},  # ResNet's stem pool (overlapping)
        {"kernel_size": 2},
        {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 0)},
        {"kernel_size": 3, "stride": 2, "dilation": 2, "ceil_mode": True},
    ],
)
def test_compact_max_pool_matches_native(kwargs):
    torch.manual_seed(0)
    x64 = torch.randn(2, 3, 17, 15, dtype=torch.float64)
    w64 = torch.randn_like(F.max_pool2d(x64, **kwargs))
    # Overlapping windows add gradients in whatever order each kernel uses: in float64 the two
    # agree to ~1e-16, in float32 to rounding, measured against the gradient's norm.
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        x = x64.to(dtype, copy=True).requires_grad_(True)
        x_plain = x.detach().clone().requires_grad_(True)
        w = w64.to(dtype)
        out = compact_max_pool2d(F.max_pool2d, (x,), kwargs)
        ref = F.max_pool2d(x_plain, **kwargs)
        assert torch.equal(out, ref)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        assert_close_in_norm(x.grad, x_plain.grad, rel, str(dtype))


def test_compact_max_pool_saves_one_byte_per_output():
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = compact_max_pool2d(F.max_pool2d, (x, 3), {"stride": 2, "padding": 1})
    assert [t.dtype for t in saved] == [torch.uint8]
    assert sum(t.numel() for t in saved) == out.numel()


def test_compact_max_pool_declines_what_it_cannot_do():
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    assert compact_max_pool2d(F.max_pool2d, (x, 2), {"return_indices": True}) is NotImplemented
    assert compact_max_pool2d(F.max_pool2d, (x.detach(), 2), {}) is NotImplemented
    assert compact_max_pool2d(F.max_pool2d, (x, 17), {}) is NotImplemented  # > 256 positions
    assert compact_max_pool2d(F.max_pool2d, (x[0], 2), {}) is NotImplemented  # unbatched
