"""Non-finite saved values: never turned into finite ones, never spread to their neighbours.

A saved tensor holding NaN, +-inf, or a finite value beyond the fp16 range of the min-max
stats (an additive attention mask of ``-inf`` or ``torch.finfo(dtype).min``) is kept as it is;
every other tensor is still compressed.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.engine.codebook import fit_codebook
from lightning_s2a.engine.ops import elementwise_spec
from lightning_s2a.engine.packed import MinMaxPacked, PackOptions
from lightning_s2a.engine.quantizers import QUANTIZERS
from tests.conftest import cosine, trainable_grads

INF = float("inf")
NAN = float("nan")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bit pattern (so NaN == NaN, and -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _with_specials(case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (16, 96) tensor with ``case`` values at a few places, and the same without them."""
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(16, 96, generator=g).to(dtype)
    x = clean.clone()
    big = torch.finfo(dtype).min if dtype != torch.float16 else -INF
    values = {
        "nan": [NAN],
        "+inf": [INF],
        "-inf": [-INF],
        "mixed": [NAN, INF, -INF],
        "beyond-fp16": [big, 1e5 if dtype != torch.float16 else INF],
    }[case]
    for i, v in enumerate(values):
        x.view(-1)[7 + 301 * i :: 97 * (i + 2)] = v
    return x, clean


@pytest.mark.parametrize("case", ["nan", "+inf", "-inf", "mixed", "beyond-fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_minmax_keeps_a_tensor_with_nonfinite_values_exactly(case, dtype, bits):
    x, clean = _with_specials(case, dtype)
    packed = MinMaxPacked(x, PackOptions(bits=bits))
    assert _same_bits(packed.unpack(), x)
    assert packed.nbytes == x.numel() * x.element_size()
    # the same tensor without those values is still compressed
    compressed = MinMaxPacked(clean, PackOptions(bits=bits))
    assert compressed.nbytes < clean.numel() * clean.element_size()
    assert torch.isfinite(compressed.unpack()).all()


def test_minmax_keeps_strided_layout_when_kept():
    x, _ = _with_specials("-inf", torch.float32)
    xt = x.t()  # non-contiguous
    out = QUANTIZERS["generic"](xt, PackOptions(bits=4)).unpack()
    assert _same_bits(out, xt)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)
@pytest.mark.parametrize("case", ["nan", "+inf", "mixed"])
def test_bitsandbytes_backend_keeps_nonfinite_values(case):
    x, _ = _with_specials(case, torch.float32)
    packed = QUANTIZERS["generic"](x, PackOptions(bits=4, backend="bnb"))
    assert _same_bits(packed.unpack(), x)


@pytest.mark.parametrize("case", ["nan", "+inf", "-inf", "mixed"])
def test_derivative_codes_keep_nonfinite_values(case):
    x, clean = _with_specials(case, torch.float32)
    spec = elementwise_spec(F.gelu, (x,), {})
    codebook = fit_codebook(clean.reshape(-1), spec.derivative, 4).to(x.device, x.dtype)
    opts = PackOptions(bits=4, spec=spec, codebook=codebook)
    packed = QUANTIZERS["elementwise"](x, opts)
    assert _same_bits(packed.unpack(), x)
    # finite tensors still get 4-bit interval codes
    assert QUANTIZERS["elementwise"](clean, opts).nbytes == clean.numel() // 2


class _Step(nn.Module):
    """``op(x + bias)`` for a step nonlinearity, so its saved tensor gets a 1-bit mask code."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.bias = nn.Parameter(torch.zeros(96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x + self.bias)


@pytest.mark.parametrize(
    "op",
    [
        F.relu,
        torch.relu_,
        nn.ReLU(),
        F.relu6,
        functools.partial(F.hardtanh, min_val=-2.0, max_val=3.0),
        functools.partial(F.threshold, threshold=0.5, value=0.0),
        functools.partial(F.leaky_relu, negative_slope=0.1),
        F.hardsigmoid,
        functools.partial(torch.clamp, min=-2.0, max=3.0),
        lambda x: x.clamp(min=0),
        lambda x: x.clamp(None, 0.5),
        functools.partial(torch.clamp_min, min=0.0),
        lambda x: x.clamp_max(1),
        lambda x: torch.clip(x, -1, 1),
        lambda x: x.clamp_(0.0, 2.0),
        functools.partial(F.hardshrink, lambd=0.5),
        F.softshrink,
        nn.PReLU(96, init=0.25),  # its slope frozen by S2A
        F.rrelu,  # training=False: the mean slope
    ],
    ids=[
        "relu",
        "relu_",
        "ReLU",
        "relu6",
        "hardtanh",
        "threshold",
        "leaky_relu",
        "hardsigmoid",
        "clamp",
        "clamp_min_kw",
        "clamp_max_pos",
        "clamp_min",
        "clamp_max",
        "clip",
        "clamp_",
        "hardshrink",
        "softshrink",
        "prelu",
        "rrelu",
    ],
)
def test_step_masks_pass_gradients_at_nonfinite_values_as_pytorch(op):
    # Each step op's backward decides from a comparison, and a NaN fails every comparison:
    # ReLU passes the gradient at a NaN, hard-sigmoid zeroes it. The 1-bit code must decode
    # to the side PyTorch takes, for NaN and +-inf as for ordinary values. clamp with number
    # bounds is such a step too (before 2026-12-06 its input was min-max coded at 4 bits,
    # flipping the gradient of elements near a bound).
    x, _ = _with_specials("mixed", torch.float32)
    x.view(-1)[::5] = 0.0  # the boundary itself
    if getattr(op, "func", op) in (F.relu6, F.hardtanh, F.hardshrink, F.softshrink):
        # PyTorch's hardtanh and shrink backwards treat a NaN's gradient one way in their
        # vectorized loop and the other in their scalar loop (and CUDA): which one runs
        # depends on the CPU and the size, so no NaN here.
        x = x.nan_to_num(nan=7.0)
    upstream = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))

    def input_grad(compress: bool) -> tuple[torch.Tensor, dict]:
        model = _Step(op)
        with apply_s2a(model, S2AConfig(compress=compress, head=None)) as handle:
            xi = x.clone().requires_grad_()
            (model(xi) * upstream).sum().backward()
            return xi.grad, handle.stats()["by_kind"]

    exact, _ = input_grad(False)
    coded, kinds = input_grad(True)
    elementwise = kinds["elementwise"]  # one bit for each tensor saved: coded
    assert elementwise["stored_bytes"] == elementwise["tensors"] * x.numel() // 8
    assert torch.equal(exact.isnan(), coded.isnan())
    assert torch.equal(exact.nan_to_num(), coded.nan_to_num())


# --------------------------------------------------------------------- masked attention models


class _Block(nn.Module):
    def __init__(self, mode: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.mode, self.heads = mode, heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.mode == "sdpa":  # the additive mask is saved by SDPA for its backward
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # logsumexp saves the masked scores, -inf included
            scores = q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5 + mask
            a = torch.exp(scores - torch.logsumexp(scores, -1, keepdim=True)) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.relu(self.fc1(x)))


class _MaskedNet(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(_Block(mode) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x.mean(1))


def _exact_and_compressed(model: nn.Module, config: S2AConfig, x, y):
    """Trainable gradients uncompressed and compressed (both finite), and the stored/raw
    ratio of the compressed forward."""
    with apply_s2a(model, config.replace(compress=False)):
        exact = trainable_grads(model, x, y)
    with apply_s2a(model, config) as handle:
        approx = trainable_grads(model, x, y)
        ratio = handle.stats()["ratio"]
    assert torch.isfinite(exact).all()
    assert torch.isfinite(approx).all()
    return exact, approx, ratio


@pytest.mark.parametrize(
    ("mode", "fill"),
    [("sdpa", -INF), ("sdpa", torch.finfo(torch.float64).min), ("logsumexp", -INF)],
    ids=["sdpa-inf", "sdpa-finfo-min", "logsumexp-inf"],
)
def test_masked_attention_gradients_match_uncompressed(mode, fill):
    torch.manual_seed(0)
    model = _MaskedNet(mode).double()
    b, n = 4, 48
    x = torch.randn(b, n, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (b,))
    padding = torch.arange(n)[None, :] >= torch.tensor([48, 40, 30, 20])[:, None]
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    blocked = padding[:, None, None, :] | causal  # (b, 1, n, n): no row is fully masked
    mask = torch.zeros(b, 1, n, n, dtype=torch.float64).masked_fill(blocked, fill)
    model.forward = functools.partial(model.forward, mask=mask)
    config = S2AConfig(modules=["bias"], head=None)
    exact, approx, ratio = _exact_and_compressed(model, config, x, y)
    assert ratio < 0.5  # everything else is still compressed
    assert cosine(exact, approx) > 0.999


# --------------------------------------------------------------------- amax / amin reductions


class _AmaxPoolNet(nn.Module):
    """Max-pooling over token groups with ``amax``, as timm's Hiera does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.fc1(x)
        h = h.view(b, 4, n // 4, -1).amax(dim=1)  # saves h and the pooled output
        h = self.fc2(h)
        return self.head(h.amin(dim=1))


def test_amax_pooling_gradients_are_finite_and_match():
    torch.manual_seed(0)
    model = _AmaxPoolNet().double()
    x = torch.randn(8, 64, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    exact, approx, _ = _exact_and_compressed(model, S2AConfig(modules=["bias"], head=None), x, y)
    assert cosine(exact, approx) > 0.99


@pytest.mark.slow
def test_hiera_gradients_are_finite():
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, num_classes=5)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([1, 3])
    exact, approx, _ = _exact_and_compressed(model, S2AConfig(modules=["bias"], bits=4), x, y)
    assert cosine(exact, approx) > 0.99


class _Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x) * 1e6  # beyond the fp16 range of min-max stats: kept exactly
        return (h * h).sum()  # saves h twice: one allocation in an uncompressed run


def test_a_kept_tensor_saved_twice_is_counted_once():
    model = _Square().double()
    with apply_s2a(model, S2AConfig(modules=["bias"], head=None)) as handle:
        model(torch.randn(64, 8, dtype=torch.float64)).backward()
        generic = handle.stats()["by_kind"]["generic"]
    assert generic["tensors"] == 2
    assert generic["raw_bytes"] == 64 * 64 * 8
    assert generic["stored_bytes"] == generic["raw_bytes"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "op",
    [
        lambda x: x.clamp(max=65504),
        lambda x: x.clamp(max=1e8) if x.dtype == torch.float32 else x.clamp(max=300),
        lambda x: torch.clamp_min(x, -1e4),
        lambda x: x.clamp(0, float("inf")),
        lambda x: x.clamp(float("-inf"), float("inf")),
        functools.partial(F.hardtanh, min_val=float("-inf"), max_val=2.0),
    ],
    ids=["max65504", "max_large", "min_-1e4", "0_inf", "-inf_inf", "hardtanh_-inf"],
)
def test_step_masks_with_large_or_infinite_bounds_pass_gradients_as_pytorch(op, dtype):
    """A decode point next to a large or infinite bound rounded onto it in low precision (or
    became inf/NaN): every element decoded to the outside, and the whole gradient was 0
    (float16's overflow guard clamp(max=65504), hardtanh(-inf, 2)). Points now stand well
    clear, and where one cannot in the dtype the tensor is kept exact."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 96, generator=g) * 100).to(dtype)
    x.view(-1)[::7] = 0.0
    upstream = torch.randn(16, 96, generator=g).to(dtype)

    def input_grad(compress: bool) -> torch.Tensor:
        model = _Step(op).to(dtype)
        with apply_s2a(model, S2AConfig(compress=compress, head=None)):
            xi = x.clone().requires_grad_()
            (model(xi) * upstream).sum().backward()
            return xi.grad

    exact, coded = input_grad(False), input_grad(True)
    assert exact.abs().sum() > 0 and torch.equal(exact, coded)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_keeps_a_tensor_too_small_for_fp16_stats_exactly(bits):
    """fp16 offsets and scales have an absolute step of 2**-24 below 2**-14: a tensor of
    magnitude 1e-7 got zero scales and decoded to zeros (every gradient through it zero)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 96, generator=g)
    x = x / x.abs().max()  # largest magnitude exactly 1
    bound = 2.0 ** (bits - 20)  # on the largest magnitude, within a factor of 2
    for scale in (bound / 4, 1e-7 * bound, 1e-30):
        packed = MinMaxPacked(x * scale, PackOptions(bits=bits))
        assert _same_bits(packed.unpack(), x * scale), scale
        assert packed.nbytes == x.numel() * 4
    for scale in (bound * 4, 1.0):
        packed = MinMaxPacked(x * scale, PackOptions(bits=bits))
        assert packed.nbytes < x.numel() * 4, scale
        err = (packed.unpack() - x * scale).norm() / (x * scale).norm()
        assert err < 2.0 ** (1 - bits), (scale, err)  # within the codes' own error
    # stats that rounded to zero cannot tell zeros from a flattened tensor: zeros are kept
    zeros = MinMaxPacked(torch.zeros(16, 96), PackOptions(bits=bits))
    assert zeros.nbytes == x.numel() * 4 and not zeros.unpack().any()


def test_gradients_through_tiny_activations_match_uncompressed():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 10)

        def forward(self, x):
            return self.head(self.a(x) * 1e-7 * self.b(x) / 1e-7)  # mul saves 1e-7-sized values

    torch.manual_seed(0)
    model = Scaled().double()
    x, y = torch.randn(32, 64, dtype=torch.float64), torch.randint(0, 10, (32,))
    with apply_s2a(model, S2AConfig(compress=False, head="head")):
        want = trainable_grads(model, x, y)
    with apply_s2a(model, S2AConfig(head="head")):
        got = trainable_grads(model, x, y)
    assert cosine(got, want) > 0.999
