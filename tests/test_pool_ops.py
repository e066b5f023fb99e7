"""Max pooling with one-byte window offsets: same gradients, far fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 2, "stride": 2, "ceil_mode": True, "count_include_pad": False},  # ResNet-D
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 0), "divisor_override": 5},
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_shape_only_avg_pool_matches_native_and_saves_nothing(kwargs, channels_last):
    """PyTorch's avg_pool2d kept its whole input for a backward that reads its shape only
    (a ResNet-D's shortcut pools: 28.7% of resnet10t's stored bytes)."""
    from lightning_s2a.structure.pool_ops import shape_only_avg_pool2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 15, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    x_plain = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = shape_only_avg_pool2d(F.avg_pool2d, (x,), kwargs)
    ref = F.avg_pool2d(x_plain, **kwargs)
    assert saved == [] and torch.equal(out, ref)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.equal(x.grad, x_plain.grad)


def test_resnet_d_shortcut_pools_store_nothing():
    """resnet10t's three shortcut average pools kept (and coded) their inputs: 4 generic
    tensors, 65,024 bytes stored; now only the final pooling's input stays (its head's)."""
    import timm

    from lightning_s2a import apply_s2a

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with apply_s2a(model, compress=False) as handle:
        model(x).sum().backward()
        generic = handle.stats()["by_kind"]["generic"]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert generic["tensors"] == 1
    trained = {id(model.get_parameter(n)) for n in grads}
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(id(p) in trained)
    model.eval()(x).sum().backward()  # plain PyTorch: the same trainable set, BatchNorms held
    for n, g in grads.items():
        assert_close_in_norm(g, model.get_parameter(n).grad, 1e-12, n)


@pytest.mark.parametrize("compress", [False, True])
def test_a_vectorized_jacobian_through_the_max_pool_rewrite_is_exact(compress):
    # Batched gradients (jacobian(vectorize=True), grad(is_grads_batched=True)) failed in
    # the rewrite's backward: "Batching rule not implemented for aten::flatten.using_ints".
    def net():
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3, padding=1)
        return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.autograd.functional.jacobian(net().double(), x, vectorize=True)
    model = net().double()
    apply_s2a(model, S2AConfig(head="4", compress=compress))
    got = torch.autograd.functional.jacobian(model, x, vectorize=True)
    assert torch.equal(got, expected)  # ReLU masks and pool positions are exact codes
