"""Bit packing and the per-tensor quantizers: round trips, exact byte counts, bad widths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_s2a.engine.bitpack import (
    pack_bits,
    packed_numel,
    unpack_bits,
    unpack_levels,
    unpack_lookup,
)
from lightning_s2a.engine.minmax import dequantize_minmax, quantize_minmax
from lightning_s2a.engine.packed import MinMaxPacked, PackOptions, RowMaxPacked, TwoLevelPacked

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
shapes = st.lists(st.integers(0, 37), min_size=1, max_size=4)


def _codes(bits: int, n: int, seed: int) -> torch.Tensor:
    """``n`` random codes of ``bits`` bits, as uint8."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)


@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 300), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_pack_bits_roundtrip_and_size(bits, n, seed):
    codes = _codes(bits, n, seed)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def _layout(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, one code at a time: code i in byte i // (8 // bits), at bit
    (i % (8 // bits)) * bits."""
    per_byte = 8 // bits
    out = [0] * -(-codes.numel() // per_byte)
    for i, c in enumerate(codes.tolist()):
        out[i // per_byte] |= int(c) << ((i % per_byte) * bits)
    return torch.tensor(out, dtype=torch.uint8)


@pytest.mark.parametrize("offset", [0, 1, 3, 8])
@pytest.mark.parametrize(
    ("bits", "as_bool"), [(1, False), (2, False), (4, False), (8, False), (1, True)]
)
def test_pack_bits_writes_the_documented_layout_from_any_offset(bits, offset, as_bool):
    # The word-wise packing paths read aligned storage; a slice starting mid-word (or a bool
    # mask) takes the other path, and both write the layout the Triton kernels write.
    # 200 codes: whole bytes, so the slice itself is packed (no padded copy at offset 0)
    codes = _codes(bits, 200 + offset, seed=bits + offset)[offset:]
    codes = codes.bool() if as_bool else codes
    assert torch.equal(pack_bits(codes, bits), _layout(codes.to(torch.uint8), bits))
    strided = _codes(bits, 400, seed=bits)[::2]  # every other code: no word view
    assert torch.equal(pack_bits(strided, bits), _layout(strided, bits))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_unpack_lookup_gives_each_codes_value_in_any_dtype(bits, dtype):
    # Tables of 1 to 64 bytes per packed byte: rows read as one word, or column by column.
    codes = _codes(bits, 211, seed=bits)
    g = torch.Generator().manual_seed(7)
    values = torch.randn(1 << bits, generator=g, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        values = torch.arange(1 << bits) % 2 == 1
    got = unpack_lookup(pack_bits(codes, bits), bits, codes.numel(), values)
    assert got.dtype == dtype
    assert torch.equal(got, values[codes.long()])


@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(0, 300), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_unpack_levels_is_the_codes_as_numbers(bits, n, seed):
    # Decoding from the cached float table gives each code's value, and the table is not
    # handed out: changing the result leaves the next decode as it was.
    codes = _codes(bits, n, seed)
    packed = pack_bits(codes, bits)
    got = unpack_levels(packed, bits, n)
    assert got.dtype == torch.float32
    assert torch.equal(got, codes.float())
    got.add_(1)
    assert torch.equal(unpack_levels(packed, bits, n), codes.float())


@pytest.mark.parametrize("bits", [0, 3, 5, 16, True, 4.0])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match=r"bits=.*not supported.*\(1, 2, 4, 8\)"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), bits)


@given(
    shape=shapes,
    bits=st.sampled_from([2, 4, 8]),
    dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(),
    seed=st.integers(0, 99),
)
@settings(max_examples=80, deadline=None)
def test_minmax_roundtrip_odd_shapes(shape, bits, dtype, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, -1)  # non-contiguous
    packed = MinMaxPacked(x, PackOptions(bits=bits))
    out = packed.unpack()
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.numel() > 1 and 1 not in x.shape:  # strides are meaningful: layout is kept
        assert out.stride() == x.stride()
    assert torch.equal(out, packed.unpack())  # unpack twice gives the same data
    if x.numel():
        # error bounded by half a step of the widest group, plus fp16/bf16 rounding of the result
        step = (x.float().max() - x.float().min()) / ((1 << bits) - 1)
        tol = step / 2 + 1e-2 * x.float().abs().max() + 1e-3
        assert (out.float() - x.float()).abs().max() <= tol
    groups = -(-x.numel() // 64)
    assert packed.nbytes == -(-groups * 64 * bits // 8) + 4 * groups


def test_minmax_pack_does_not_modify_input():
    x = torch.randn(1000)
    before = x.clone()
    quantize_minmax(x, 4)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_minmax_reads_strided_and_low_precision_input_like_a_float32_copy(dtype):
    """q, k and v sliced out of one qkv tensor (groups along a contiguous last dimension) and
    bf16/fp16 inputs are read in place, and give exactly the codes and stats of a contiguous
    float32 copy, deterministic or stochastic."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(2, 7, 3 * 4 * 64, generator=g) * 3).to(dtype)
    k = qkv.reshape(2, 7, 3, 4, 64).permute(2, 0, 3, 1, 4)[1]  # the middle third
    assert not k.is_contiguous()
    for stochastic in (False, True):
        got = quantize_minmax(
            k, 4, 64, stochastic, torch.Generator().manual_seed(1), with_fits=True
        )
        want = quantize_minmax(
            k.float().contiguous(),
            4,
            64,
            stochastic,
            torch.Generator().manual_seed(1),
            with_fits=True,
        )
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_minmax_constant_and_extreme_values():
    x = torch.full((130,), 7.25)
    p, o, s = quantize_minmax(x, 4)
    assert torch.equal(dequantize_minmax(p, o, s, 130, 4, 64, torch.float32), x)
    big = torch.tensor([-1e6, 0.0, 1e6] * 30)
    y = dequantize_minmax(*quantize_minmax(big, 4), 90, 4, 64, torch.float32)
    assert torch.isfinite(y).all()  # saturates at the fp16 range instead of producing inf


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64 * 2000, generator=g)
    p, o, s = quantize_minmax(x, 2, stochastic=True, generator=torch.Generator().manual_seed(1))
    y = dequantize_minmax(p, o, s, x.numel(), 2, 64, torch.float32)
    nearest = dequantize_minmax(*quantize_minmax(x, 2), x.numel(), 2, 64, torch.float32)
    assert abs((y - x).mean().item()) < 2e-3
    assert not torch.equal(y, nearest)
    assert (y - x).abs().max() <= s.float().max() + 1e-6  # within one step


@given(
    rows=st.integers(0, 20),
    width=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    dim=st.sampled_from([0, -1]),
)
@settings(max_examples=40, deadline=None)
def test_softmax_rowmax_roundtrip(rows, width, dtype, dim):
    x = torch.randn(rows, width).softmax(dim=dim).to(dtype)
    packed = RowMaxPacked(x, PackOptions(bits=4, dim=dim))
    out = packed.unpack()
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.numel():
        rowmax = x.float().amax(dim=dim, keepdim=True)
        assert ((out.float() - x.float()).abs() <= rowmax / 30 + 1e-2 * rowmax + 1e-6).all()
        assert (out >= 0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("side", [256, 512])
def test_flat_long_softmax_rows_keep_their_values(bits, side):
    """A spatial softmax over side x side positions: each row's maximum is a few 1e-6. Its
    fp16 step (max / levels) fell into fp16's subnormals: at 8 bits the 512 x 512 rows
    decoded to zeros, and 256 x 256 ones lost 4% (against 0.3% at 4 bits). The maximum is
    kept instead, the step divided from it in float32."""
    g = torch.Generator().manual_seed(0)
    x = (0.1 * torch.randn(2, side * side, generator=g, dtype=torch.float64)).softmax(-1)
    out = RowMaxPacked(x, PackOptions(bits=bits, dim=-1)).unpack()
    rowmax = x.amax(-1, keepdim=True)
    # within half a step, plus the fp16 maximum's rounding (its subnormal step below 6e-5)
    bound = rowmax / (2 * ((1 << bits) - 1)) + 2**-25 + rowmax * 2**-11
    assert ((out - x).abs() <= bound).all()
    assert torch.allclose(out.sum(-1), torch.ones(2, dtype=torch.float64), atol=0.01)


@given(n=st.integers(0, 500), dtype=st.sampled_from([torch.bool, *DTYPES]))
@settings(max_examples=40, deadline=None)
def test_masks_and_dropout_noise_are_exact_in_one_bit(n, dtype):
    keep = torch.rand(n) > 0.3
    x = keep if dtype == torch.bool else keep.to(dtype) / torch.tensor(0.7, dtype=dtype)
    packed = TwoLevelPacked(x)
    assert torch.equal(packed.unpack(), x)
    assert packed.codes.numel() == -(-n // 8)


@pytest.mark.parametrize(
    "width, rows, group", [(96, True, 32), (48, True, 16), (192, True, 64), (96, False, 64)]
)
def test_layer_norm_groups_never_span_two_rows(width, rows, group):
    from lightning_s2a.engine.quantizers import pack_norm

    torch.manual_seed(0)
    x = torch.randn(5, width, dtype=torch.float64)
    x[2] = 1e-6 * torch.randn(width, dtype=torch.float64)  # a near-constant row (a class token)
    packed = pack_norm(x, PackOptions(bits=4, row=width if rows else 0))
    n_groups = -(-x.numel() // group)
    assert packed.nbytes == n_groups * group // 2 + n_groups * 4  # codes, fp16 offset + scale
    err = (packed.unpack() - x)[2].abs().max() / x[2].abs().max()
    if rows:  # the small row keeps its own range
        assert err < 0.2
    else:  # sharing a group with a normal row, its values are lost
        assert err > 0.9


@pytest.mark.parametrize("row, shape", [(196, (5, 196)), (100, (5, 100)), (49, (2, 5, 7, 7))])
def test_norm_rows_without_a_power_of_two_factor_are_coded_each_on_its_own(row, shape):
    """Rows of 196 tokens, 100 values or a 7 x 7 plane: no power of two of 8 or more divides
    them, so groups spanned rows and a near-constant row lost its values; each row is now
    padded to whole groups (rows shorter than a group: the next power of two, at least 8)."""
    from lightning_s2a.engine.quantizers import pack_norm

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    flat = x.view(-1, row)
    flat[2] = 1e-6 * torch.randn(row, dtype=torch.float64)
    packed = pack_norm(x, PackOptions(bits=4, row=row))
    out = packed.unpack()
    assert out.shape == x.shape and out.dtype == x.dtype
    group = 64  # 49 is below a group: its next power of two, 64
    padded = -(-row // group) * group
    rows = x.numel() // row
    assert packed.nbytes == rows * (padded // 2 + padded // group * 4)  # codes, offset + scale
    err = (out.view(-1, row)[2] - flat[2]).abs().max() / flat[2].abs().max()
    assert err < 0.2  # the small row keeps its own range


@pytest.mark.parametrize("defer", [False, True])
def test_a_tensor_kept_as_it_is_holds_no_larger_storage(defer):
    from lightning_s2a.engine.quantizers import pack_minmax

    base = torch.randn(8, 256)
    base[0, 3] = float("inf")  # no code holds it: kept as it is
    view = base[:2]  # a quarter of base's storage
    packed = pack_minmax(view, PackOptions(bits=4, defer=defer))
    packed.settle()  # the deferred answer read (a no-op without defer)
    assert packed.raw is not None and torch.equal(packed.unpack(), view)
    assert packed.raw.untyped_storage().nbytes() == view.numel() * 4  # not base's 8 rows
    whole = pack_minmax(base, PackOptions(bits=4, defer=defer))
    whole.settle()
    assert whole.raw.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # no copy


@pytest.mark.parametrize("shape", [(4, 16, 7, 7), (4, 16, 1, 1), (5, 16)])
def test_batch_norm_groups_stay_inside_one_channel(shape):
    from lightning_s2a.engine.quantizers import pack_norm

    torch.manual_seed(0)
    means = torch.arange(16, dtype=torch.float64).view(1, 16, *[1] * (len(shape) - 2)) * 10
    x = torch.randn(shape, dtype=torch.float64) + means  # channels with far apart means
    packed = pack_norm(x, PackOptions(bits=4, channels=True))
    length = x.numel() // 16
    group = 64 if length >= 64 else max(8, 1 << (length - 1).bit_length())
    padded = -(-length // group) * group  # each channel's values padded to whole groups
    assert packed.nbytes == 16 * padded // 2 + 16 * padded // group * 4
    out = packed.unpack()
    assert out.shape == x.shape and out.dtype == x.dtype
    # each channel coded against its own range: the error is a fraction of its own spread
    err = (out - x).movedim(1, 0).reshape(16, -1).abs().amax(1)
    spread = (x - means).movedim(1, 0).reshape(16, -1)
    assert (err <= (spread.amax(1) - spread.amin(1)) / 15 / 2 * 1.01).all()
    plain = pack_norm(x, PackOptions(bits=4))  # groups in memory order mix channels
    assert (plain.unpack() - x).abs().max() > 4 * err.max()


def test_batch_norm_rows_keep_a_channels_last_layout():
    from lightning_s2a.engine.quantizers import pack_norm

    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    out = pack_norm(x, PackOptions(bits=8, channels=True)).unpack()
    assert out.stride() == x.stride() and (out - x).abs().max() < 0.05
