"""Frozen-operator rewrites: same values and gradients as the originals, no saved activations."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_s2a.structure.frozen_ops import (
    FROZEN_REWRITES,
    dropout_identity,
    frozen_batch_norm,
    frozen_conv,
)
from tests.conftest import assert_close_in_norm

# Every comparison runs twice: in float64, where a rewrite and the original agree to ~1e-16
# (so 1e-12 proves them the same function), and in float32 with a tolerance scaled to the
# tensor's norm (1e-5; observed ~1e-7), which holds whatever order a CPU's kernels sum in.
EXACT = ((torch.float64, 1e-12), (torch.float32, 1e-5))


class RewriteMode(TorchFunctionMode):
    """Applies :data:`FROZEN_REWRITES` by function name, counting the rewrites that applied."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        rewrite = None if name.endswith("_") else FROZEN_REWRITES.get(name)
        if rewrite is not None:
            out = rewrite(func, args, kwargs)
            if out is not NotImplemented:
                self.applied[name] += 1
                return out
        return func(*args, **kwargs)


class SavedCounter:
    """Saved-tensor hooks recording every saved tensor that is not a parameter or buffer."""

    def __init__(self, *modules: nn.Module) -> None:
        self.storages = {
            t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())
        }
        self.numels: list[int] = []
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in self.storages:
            self.numels.append(t.numel())
            self.bytes += t.numel() * t.element_size()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval BN is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)


def _s2a_setup(model: nn.Module) -> nn.Module:
    """Train mode with eval BatchNorm; only biases and the classifier train."""
    model.train()
    _randomize_bn(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    return model


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: RewriteMode | None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    if mode is None:
        out = model(x)
    else:
        with mode:
            out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


# -- 1. exactness on timm models ---------------------------------------------------------------


# fp32 differs only by rounding: eval BN's native kernel fuses the multiply-add, the rewrite
# rounds twice, and ~50 BN layers of a randomly initialised network accumulate that (observed:
# 2e-6 of a gradient's norm). In fp64 the same comparison is exact to ~1e-15 (resnet18 only
# here: CPU fp64 depthwise convolutions are slow; the fp64 check of ConvNeXt and a pretrained
# EfficientNet-Lite0 through apply_s2a is tests/test_structure.py::test_surgery_is_exact).
_MODEL_REL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("resnet18", torch.float32),
        ("convnext_atto", torch.float32),
        ("tf_efficientnet_lite0", torch.float32),
        ("resnet18", torch.float64),
    ],
    ids=["resnet18", "convnext_atto", "tf_efficientnet_lite0", "resnet18-fp64"],
)
def test_timm_models_exact(name: str, dtype: torch.dtype) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=10).to(dtype)
    model = _s2a_setup(model)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    y = torch.tensor([3, 7])
    out_ref, grads_ref = _step(model, x, y, None)
    mode = RewriteMode()
    out_new, grads_new = _step(model, x, y, mode)

    assert mode.applied["conv2d"] > 0
    if name != "convnext_atto":
        assert mode.applied["batch_norm"] > 0
    rel = _MODEL_REL[dtype]
    assert_close_in_norm(out_new, out_ref, rel, "logits")
    assert grads_new.keys() == grads_ref.keys() and len(grads_ref) > 2
    for key, g in grads_ref.items():
        assert_close_in_norm(grads_new[key], g, rel, key)


# -- 2. memory: no activation saved ------------------------------------------------------------


def _conv_stack() -> nn.Module:
    stack = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(8, 8, 3, padding="same", groups=8),
        nn.Conv2d(8, 6, 1, dilation=2),
    )
    for name, p in stack.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    return stack


def _saved(module: nn.Module, x: torch.Tensor, rewrites: bool) -> SavedCounter:
    counter = SavedCounter(module)
    mode = RewriteMode() if rewrites else None
    with counter.hooks():
        if mode is None:
            out = module(x)
        else:
            with mode:
                out = module(x)
    out.sum().backward()
    return counter


def test_conv_stack_saves_no_activation() -> None:
    stack = _conv_stack()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    assert _saved(stack, x, rewrites=False).bytes > 0
    assert _saved(stack, x, rewrites=True).bytes == 0


def test_eval_batch_norm_saves_only_per_channel_tensors() -> None:
    channels = 8
    block = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, affine=False),
    )
    _randomize_bn(block)
    block.eval()
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    x = torch.randn(2, 3, 16, 16)
    baseline = _saved(block, x, rewrites=False)
    assert max(baseline.numels) > channels
    rewritten = _saved(block, x, rewrites=True)
    assert rewritten.numels and max(rewritten.numels) <= channels


# -- 3. unit tests -----------------------------------------------------------------------------

_CONV_CASES = [
    # (ndim, in_ch, out_ch, kernel, kwargs)
    (2, 4, 6, 3, {"stride": 2, "padding": 1}),
    (2, 4, 6, 3, {"padding": "same"}),
    (2, 4, 6, 3, {"padding": "valid", "stride": (2, 1)}),
    (2, 4, 6, 3, {"dilation": 2, "padding": 2}),
    (2, 6, 6, 3, {"groups": 6, "padding": 1}),
    (2, 6, 6, 5, {"groups": 6, "padding": "same", "dilation": 2}),
    (2, 4, 6, 3, {"groups": 2, "stride": 2}),
    (1, 4, 6, 3, {"padding": "same"}),
    (1, 4, 6, 4, {"padding": 3, "stride": 3}),
    (1, 4, 4, 5, {"groups": 4, "dilation": 2, "stride": 2}),
    (3, 4, 6, 3, {"stride": 2, "padding": 1}),
    (3, 4, 4, 3, {"groups": 4, "padding": "same"}),
]

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_grads(fn, x, w, b, kwargs, grad_seed: int = 5):
    x = x.detach().requires_grad_(True)
    b = None if b is None else b.detach().requires_grad_(b.requires_grad)
    out = fn(x, w, b, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    inputs = [x] if b is None or not b.requires_grad else [x, b]
    return out, torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("case", _CONV_CASES)
def test_frozen_conv_matches_conv(case, bias: str) -> None:
    ndim, cin, cout, k, kwargs = case
    conv = _CONVS[ndim]
    groups = kwargs.get("groups", 1)
    x64 = torch.randn(2, cin, *([11] * ndim), dtype=torch.float64)
    w64 = torch.randn(cout, cin // groups, *([k] * ndim), dtype=torch.float64)
    b64 = None if bias == "none" else torch.randn(cout, dtype=torch.float64)

    def rewritten(*args, **kw):
        out = frozen_conv(conv, args, kw)
        assert out is not NotImplemented
        return out

    for dtype, rel in EXACT:
        x, w = x64.to(dtype), w64.to(dtype)
        b = None if b64 is None else b64.to(dtype, copy=True).requires_grad_(bias == "trainable")
        counter = SavedCounter()
        with counter.hooks():
            out_new, grads_new = _conv_grads(rewritten, x, w, b, kwargs)
        out_ref, grads_ref = _conv_grads(conv, x, w, b, kwargs)
        assert counter.numels == [w.numel()]  # the weight only
        assert_close_in_norm(out_new, out_ref, rel, f"{dtype} output")
        assert len(grads_new) == len(grads_ref) == (2 if bias == "trainable" else 1)
        for a, r in zip(grads_new, grads_ref, strict=True):
            assert_close_in_norm(a, r, rel, f"{dtype} gradient")


# About one unit in the last place of each dtype, measured over the whole tensor.
_LOW_PRECISION_REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frozen_conv_channels_last_and_dtypes(dtype: torch.dtype) -> None:
    x = torch.randn(2, 8, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3).to(dtype)
    b = torch.randn(8).to(dtype).requires_grad_(True)
    kwargs = {"padding": 1, "groups": 8, "stride": 2}
    try:
        out_ref, grads_ref = _conv_grads(F.conv2d, x, w, b, kwargs)
    except (RuntimeError, NotImplementedError):
        pytest.skip(f"{dtype} convolution not supported on this CPU")
    out_new, grads_new = _conv_grads(
        lambda *a, **kw: frozen_conv(torch.conv2d, a, kw), x, w, b, kwargs
    )
    # Both paths run the same ATen kernels in the same layout (values agree to the dtype's
    # precision, in norm), and the input gradient keeps the channels-last layout.
    rel = _LOW_PRECISION_REL[dtype]
    assert_close_in_norm(out_new, out_ref, rel, "output")
    assert out_new.dtype == dtype and out_new.stride() == out_ref.stride()
    for a, r in zip(grads_new, grads_ref, strict=True):
        assert_close_in_norm(a, r, rel, "gradient")
        assert a.stride() == r.stride()


def test_frozen_conv_under_autocast_matches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    )
    _randomize_bn(model)
    model[1].eval()
    model[4].eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("6."))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def run(mode: RewriteMode | None):
        model.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if mode is None:
                out = model(x)
            else:
                with mode:
                    out = model(x)
        out.float().square().sum().backward()
        grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
        return out, grads

    out_ref, grads_ref = run(None)
    mode = RewriteMode()
    out_new, grads_new = run(mode)
    assert mode.applied["conv2d"] == 2 and mode.applied["batch_norm"] == 2
    assert out_new.dtype == out_ref.dtype == torch.bfloat16
    # The bf16 values may differ in the last place where the BN rewrite's fp32 result rounds
    # differently from the fused kernel's; that moves the fp32 gradients by ~1e-4 of their norm,
    # while element-wise fp32 tolerances would fail on the elements it touches.
    assert_close_in_norm(out_new, out_ref, 1e-3, "output")
    for a, r in zip(grads_new, grads_ref, strict=True):
        assert a.dtype == r.dtype == torch.float32
        assert_close_in_norm(a, r, 1e-3, "gradient")


def test_frozen_conv_bias_only() -> None:
    """An input without grad (e.g. the image) and a trainable bias: only the bias gradient."""
    x64, w64, b64 = (
        torch.randn(shape, dtype=torch.float64) for shape in [(2, 3, 10, 10), (5, 3, 3, 3), (5,)]
    )
    g64 = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    for dtype, rel in EXACT:
        x, w, g = x64.to(dtype), w64.to(dtype), g64.to(dtype)
        b = b64.to(dtype, copy=True).requires_grad_(True)
        counter = SavedCounter()
        with counter.hooks():
            out = frozen_conv(F.conv2d, (x, w, b, 2), {})
        assert counter.numels == [w.numel()]
        (grad_new,) = torch.autograd.grad(out, b, g)
        (grad_ref,) = torch.autograd.grad(F.conv2d(x, w, b, 2), b, g)
        assert_close_in_norm(grad_new, grad_ref, rel, str(dtype))


def test_frozen_conv_declines() -> None:
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3)
    trainable_w = w.clone().requires_grad_(True)
    assert frozen_conv(F.conv2d, (x, trainable_w), {}) is NotImplemented
    assert frozen_conv(F.conv2d, (x.detach(), w, torch.zeros(4)), {}) is NotImplemented
    assert frozen_conv(F.conv2d, (x, w.new_zeros(4, 4, 4, 4)), {"padding": "same"}) is (
        NotImplemented
    )
    assert frozen_conv(F.conv2d, (x[0], w), {}) is NotImplemented  # unbatched
    with torch.no_grad():
        assert frozen_conv(F.conv2d, (x, w), {}) is NotImplemented
    # positional and keyword arguments are accepted alike
    assert frozen_conv(F.conv2d, (), {"input": x, "weight": w, "padding": 1}) is not (
        NotImplemented
    )


# -- batch norm --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 5, 4), (2, 6, 3, 4, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_batch_norm_matches(shape, affine: bool) -> None:
    c = shape[1]
    stats64 = (torch.randn(c, dtype=torch.float64) * 0.3, torch.rand(c, dtype=torch.float64) + 0.5)
    w64 = torch.rand(c, dtype=torch.float64) + 0.5 if affine else None
    b64 = torch.randn(c, dtype=torch.float64) if affine else None
    x64 = torch.randn(shape, dtype=torch.float64)

    def rewritten(*args):
        out = frozen_batch_norm(F.batch_norm, args, {})
        assert out is not NotImplemented
        return out

    for dtype, rel in EXACT:
        rm, rv = (t.to(dtype) for t in stats64)
        w = None if w64 is None else w64.to(dtype)
        b = None if b64 is None else b64.to(dtype, copy=True).requires_grad_(True)

        def grads(fn, x, rm=rm, rv=rv, w=w, b=b):
            x = x.detach().requires_grad_(True)
            out = fn(x, rm, rv, w, b, False, 0.1, 1e-3)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
            return out, torch.autograd.grad(out, [x] if b is None else [x, b], g)

        x = x64.to(dtype)
        if len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        counter = SavedCounter()
        with counter.hooks():
            out_new, grads_new = grads(rewritten, x)
        out_ref, grads_ref = grads(F.batch_norm, x)
        assert all(n <= c for n in counter.numels)
        assert_close_in_norm(out_new, out_ref, rel, f"{dtype} output")
        for a, r in zip(grads_new, grads_ref, strict=True):
            assert_close_in_norm(a, r, rel, f"{dtype} gradient")


def test_frozen_batch_norm_aten_signature_and_low_precision() -> None:
    c = 5
    rm, rv, w = torch.randn(c), torch.rand(c) + 0.5, torch.rand(c)
    b = torch.randn(c).requires_grad_(True)
    x = torch.randn(2, c, 4, 4, requires_grad=True)
    for dtype, rel in EXACT:
        args = (*(t.to(dtype) for t in (x, w, b, rm, rv)), False, 0.1, 1e-5, True)
        out = frozen_batch_norm(torch.batch_norm, args, {})
        assert_close_in_norm(out, torch.batch_norm(*args), rel, str(dtype))

    xb = x.detach().bfloat16().requires_grad_(True)
    out = frozen_batch_norm(F.batch_norm, (xb, rm, rv), {"weight": w, "bias": b})
    assert out.dtype == torch.bfloat16
    assert_close_in_norm(out, F.batch_norm(xb, rm, rv, w, b), _LOW_PRECISION_REL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_batch_norm_of_a_low_precision_model_rounds_once(dtype) -> None:
    # A model converted to bf16/fp16 as a whole: the native kernel computes in fp32 and
    # rounds once; the rewrite rounded scale, shift and product in bf16 (here 1.6x PyTorch's
    # error to float64, 1.3x in fp16). Now no further from float64 than PyTorch.
    torch.manual_seed(0)
    c = 16
    rm, rv = torch.rand(c) * 2 - 1, torch.rand(c) * 2.5 + 0.5
    w, b = torch.rand(c) * 1.5 + 0.5, torch.rand(c) * 2 - 1
    x = torch.randn(4, c, 16, 16) * 3 + 1
    ref = F.batch_norm(*(t.double() for t in (x, rm, rv, w, b)))
    args = [t.to(dtype) for t in (x, rm, rv, w, b)]
    args[0].requires_grad_(True)
    args[4].requires_grad_(True)
    out = frozen_batch_norm(F.batch_norm, tuple(args[:3]), {"weight": args[3], "bias": args[4]})
    plain = F.batch_norm(*args)
    assert out.dtype == dtype
    err = (out.double() - ref).norm() / ref.norm()
    err_plain = (plain.double() - ref).norm() / ref.norm()
    assert err <= 1.05 * err_plain


def test_frozen_batch_norm_declines() -> None:
    c = 4
    rm, rv, w, b = torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c)
    x = torch.randn(2, c, 3, 3, requires_grad=True)
    bn = F.batch_norm
    assert bn.__name__ == "batch_norm"
    assert frozen_batch_norm(bn, (x, rm, rv, w, b, True), {}) is NotImplemented
    assert frozen_batch_norm(bn, (x, None, None, w, b), {"training": False}) is NotImplemented
    trainable_w = w.clone().requires_grad_(True)
    assert frozen_batch_norm(bn, (x, rm, rv, trainable_w, b), {}) is NotImplemented
    assert frozen_batch_norm(bn, (x, rm, rv, w, b), {}) is not NotImplemented


# -- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dropout", "dropout2d", "alpha_dropout", "feature_alpha_dropout"])
def test_dropout_identity(name: str) -> None:
    fn: Any = getattr(F, name)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert dropout_identity(fn, (x,), {"p": 0.3, "training": True}) is NotImplemented
    assert dropout_identity(fn, (x, 0.3, True), {}) is NotImplemented
    assert dropout_identity(fn, (x,), {"p": 1.5, "training": False}) is NotImplemented
    assert dropout_identity(fn, (x,), {"p": 0.3, "training": False}) is x
    assert dropout_identity(fn, (x, 0.0), {}) is x
    assert dropout_identity(torch.dropout, (x, 0.3), {"train": False}) is x
    torch.testing.assert_close(fn(x, 0.3, False), x)


def test_dropout_in_training_still_drops() -> None:
    drop = nn.Dropout(0.5).train()
    x = torch.ones(1000, requires_grad=True)
    with RewriteMode():
        out = drop(x)
    assert (out == 0).any() and (out != 0).any()


def test_rewrite_table() -> None:
    assert set(FROZEN_REWRITES) == {
        "conv1d",
        "conv2d",
        "conv3d",
        "batch_norm",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
    }


# -- weights standardized in forward (StdConv2d, ScaledStdConv2d) -----------------------------


def _std_convs() -> nn.Sequential:
    from timm.layers import ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    return nn.Sequential(
        StdConv2d(3, 8, 3, padding=1, bias=True),
        nn.GELU(),
        ScaledStdConv2d(8, 8, 3, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_standardized_weights_are_rebuilt_not_kept(dtype: torch.dtype) -> None:
    """A frozen StdConv2d/ScaledStdConv2d keeps nothing for its weight: its backward runs the
    standardization again. Same gradients as without the rewrite; fewer bytes by exactly the
    two standardized weights and the two convs' inputs."""
    model = _std_convs().to(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("5."))
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    y = torch.tensor([0, 3])
    runs = {}
    for rewrite in (False, True):
        counter = SavedCounter(model)
        mode = RewriteMode() if rewrite else None
        with counter.hooks():
            runs[rewrite] = (_step(model, x, y, mode), counter.bytes, mode)
    (_, grads_ref), bytes_ref, _ = runs[False]
    (_, grads_new), bytes_new, mode = runs[True]
    assert mode.applied["conv2d"] == 2 and mode.applied["batch_norm"] == 2
    weights = sum(model[i].weight.numel() * model[i].weight.element_size() for i in (0, 2))
    inputs = (x.numel() + 2 * 8 * 8 * 8) * x.element_size()  # what each conv keeps besides
    assert bytes_ref - bytes_new == weights + inputs
    rel = dict(EXACT)[dtype]
    for name in grads_ref:
        assert_close_in_norm(grads_new[name], grads_ref[name], rel, name)


def test_standardized_weight_recipes_live_as_long_as_their_weight() -> None:
    from lightning_s2a.structure.derived_weights import _RECIPES, rebuild_of

    model = _std_convs()
    weight = model[0].weight.requires_grad_(False)
    before = len(_RECIPES)
    with RewriteMode():
        std = F.batch_norm(
            weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(weight)
    rebuild = rebuild_of(std)
    assert rebuild is not None and len(_RECIPES) == before + 1
    assert torch.equal(rebuild(torch.float32), std)  # bit for bit, same shape and strides
    assert rebuild_of(std.clone()) is None  # a copy is no view of the recorded weight
    del std
    assert len(_RECIPES) == before  # gone with the weight: a reused address finds nothing
    with RewriteMode():  # an activation (not a frozen parameter) is no weight to rebuild
        out = F.batch_norm(torch.randn(1, 8, 9), None, None, training=True)
    assert rebuild_of(out) is None and len(_RECIPES) == before


def test_a_standardized_weight_changed_in_place_is_kept_not_rebuilt() -> None:
    """``w = std(W); w *= 0.5`` before the conv: the recipe would rebuild the unscaled weight."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).double()
    conv.weight.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def run(mode: RewriteMode | None) -> torch.Tensor:
        x.grad = None
        with mode if mode is not None else torch.enable_grad():
            w = F.batch_norm(conv.weight.reshape(1, 8, -1), None, None, training=True)
            w = w.reshape_as(conv.weight)
            w.mul_(0.5)
            out = F.conv2d(x, w, conv.bias, padding=1)
        out.square().sum().backward()
        return x.grad.clone()

    assert_close_in_norm(run(RewriteMode()), run(None), 1e-12, "input gradient")


def test_a_parameter_changed_before_backward_is_an_error_not_another_weights_gradient():
    model = _std_convs().double()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or name.startswith("5."))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with RewriteMode():
        loss = model(x).square().sum()
    with torch.no_grad():
        model[2].weight.mul_(-1)  # e.g. weights reloaded between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_recurrent_switches_come_back_after_nested_and_failing_calls() -> None:
    from lightning_s2a.structure.rnn_ops import native_rnn

    seen = []

    def inner(*args):
        seen.append((torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()))
        return args

    def outer():
        native_rnn(inner, (), {})
        seen.append((torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()))
        raise ValueError("a failing recurrent call")

    with pytest.raises(ValueError):
        native_rnn(lambda: outer(), (), {})
    assert seen == [(False, False), (False, False)]  # still off inside the outer call
    assert torch._C._get_mkldnn_enabled() and torch._C._get_cudnn_enabled()


def test_rewrites_skip_torchs_per_call_argument_binding(monkeypatch) -> None:
    """torch binds a ``setup_context`` Function's arguments with ``inspect.signature`` on every
    call (75 us on CPU, more than a small conv); the frozen conv and the 4-bit linear are
    written without it. Counted, not timed: no call of a step reaches the binding."""
    import torch.autograd.function as autograd_function

    from lightning_s2a import apply_s2a

    bound = []
    binding = autograd_function._bind_default_args
    monkeypatch.setattr(
        autograd_function, "_bind_default_args", lambda *a: bound.append(1) or binding(*a)
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 16), nn.Linear(16, 3)
    )
    for frozen_dtype in (None, "nf4"):
        with apply_s2a(model, head="4", frozen_dtype=frozen_dtype) as handle:
            model(torch.randn(2, 3, 8, 8)).sum().backward()
            assert handle.stats()["raw_bytes"] > 0
        assert not bound, frozen_dtype
