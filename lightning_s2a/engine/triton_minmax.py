"""Fused Triton kernels for per-group min-max quantization (the ``"triton"`` backend).

One kernel per direction: :func:`triton_quantize_minmax` reads a block of groups, reduces each
group to its fp16 ``(offset, scale)``, rounds the codes and packs them into bytes, without any
full-size intermediate tensor; :func:`triton_dequantize_minmax` unpacks and rescales in one pass.
Both match the PyTorch reference in :mod:`.minmax` and the layout of :mod:`.bitpack` bit for
bit (stochastic rounding aside, which draws its noise from Triton's Philox generator).

Numerical details that make the results bit-identical to the reference:

* every division is IEEE round-to-nearest (``tl.div_rn``); Triton's plain ``/`` on fp32 lowers to
  an approximate division on NVIDIA GPUs;
* bfloat16 is moved in and out of the kernels as raw 16-bit integers and converted with integer
  arithmetic (round to nearest even on the way out), because the Triton interpreter
  (``TRITON_INTERPRET=1``) truncates fp32 -> bf16 instead of rounding;
* in dequantization ``code * scale`` is exact in fp32 (an 8-bit integer times an fp16 value), so
  a fused multiply-add gives the same result as PyTorch's separate multiply and add;
* the sign of a zero offset is not specified (``torch.amin`` itself returns whichever of
  ``0.0``/``-0.0`` it meets first); it compares equal and never changes dequantized values;
* the per-group ``fits`` flags (False for a group with a NaN, an infinity or a value beyond the
  fp16 range, whose offset is more than its span below its minimum, or whose rounded step
  moves its top code by more than half its span) test for NaN
  explicitly, since ``tl.min``/``tl.max`` need not propagate it; the stats and codes of such
  a group are not specified (the caller keeps that tensor as it is).

The module imports without Triton (``HAS_TRITON`` is then False) and on CPU-only machines; the
kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import.
"""

from __future__ import annotations

import os

import torch

from .bitpack import check_bits

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

FP16_MAX = 65504.0

#: Elements each program handles (a power of two); programs cover ``BLOCK_ELEMS // group_size``
#: whole groups, capped by the number of groups so that tiny tensors do not over-allocate.
BLOCK_ELEMS = 4096
MAX_GROUP_SIZE = 4096

# Input / output element kinds (constexpr selectors inside the kernels).
_KIND_F32, _KIND_F16, _KIND_BF16 = 0, 1, 2


def _interpreting() -> bool:
    """True if Triton runs kernels in its CPU interpreter (decided when Triton was imported)."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # pragma: no cover - old Triton


if HAS_TRITON:
    # Globals read inside kernels must be constexpr for the native compiler.
    _FP16_MAX_C = tl.constexpr(FP16_MAX)

    @triton.jit
    def _quantize_kernel(
        x_ptr,
        packed_ptr,
        offset_ptr,
        scale_ptr,
        fits_ptr,
        n,
        n_groups,
        seed,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        IN_KIND: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        WITH_FITS: tl.constexpr,
    ):
        # Each program owns BLOCK_G whole groups, loaded as a contiguous [BLOCK_G, GROUP] tile.
        PER_BYTE: tl.constexpr = 8 // BITS
        BYTES: tl.constexpr = GROUP // PER_BYTE
        LEVELS: tl.constexpr = (1 << BITS) - 1

        pid = tl.program_id(0).to(tl.int64)
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)  # int64 group ids
        e = tl.arange(0, GROUP)
        idx = g[:, None] * GROUP + e[None, :]
        valid = idx < n

        raw = tl.load(x_ptr + idx, mask=valid, other=0)
        if IN_KIND == 2:
            # bf16 bits arrive as int16: place them in the high half of an fp32 word (exact).
            bits32 = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
            x = bits32.to(tl.float32, bitcast=True)
        else:
            x = raw.to(tl.float32)

        # Group statistics; padding is ignored, which equals replicating the last element.
        lo_raw = tl.min(tl.where(valid, x, float("inf")), axis=1)
        hi_raw = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        lo = tl.minimum(tl.maximum(lo_raw, -_FP16_MAX_C), _FP16_MAX_C)
        hi = tl.minimum(tl.maximum(hi_raw, -_FP16_MAX_C), _FP16_MAX_C)
        offset16 = lo.to(tl.float16)
        # Rounded down, as the reference: one fp16 step toward -inf where rounding went up
        # (its bits minus one above zero, plus one below; from a zero, -2**-24's bits).
        bits16 = offset16.to(tl.int16, bitcast=True)
        below = tl.where(
            offset16 > 0.0, bits16 - 1, tl.where(offset16 < 0.0, bits16 + 1, -32767)
        ).to(tl.int16)
        offset16 = tl.where(
            offset16.to(tl.float32) > lo, below.to(tl.float16, bitcast=True), offset16
        )
        offset = offset16.to(tl.float32)
        span = tl.div_rn(hi - offset, tl.full(hi.shape, LEVELS, tl.float32))
        scale16 = tl.minimum(tl.maximum(span, 0.0), _FP16_MAX_C).to(tl.float16)
        scale = scale16.to(tl.float32)

        gmask = g < n_groups
        tl.store(offset_ptr + g, offset16, mask=gmask)
        tl.store(scale_ptr + g, scale16, mask=gmask)
        if WITH_FITS:
            # Same test as the reference's: within +-FP16_MAX and no NaN (checked explicitly).
            nans = tl.sum(tl.where(valid & (x != x), 1, 0), axis=1)
            fits = (lo_raw >= -_FP16_MAX_C) & (hi_raw <= _FP16_MAX_C) & (span <= _FP16_MAX_C)
            fits = fits & (nans == 0)
            # And the offset is at most the group's span below its minimum and the rounded
            # step moves the top code by at most half the span, or the group is constant
            # (see the reference's _group_stats).
            whole = hi - lo
            drift = lo - offset
            held = tl.abs(scale - span) * (2 * LEVELS)
            fits = fits & (((drift <= whole) & (held <= whole)) | (whole == 0.0))
            tl.store(fits_ptr + g, fits.to(tl.int8), mask=gmask)

        # Codes: floor((x - offset) / scale + noise), clamped; 0 for constant groups and padding.
        s = scale[:, None]
        safe = tl.where(s > 0.0, s, 1.0)
        v = tl.div_rn(x - offset[:, None], safe)
        noise = tl.rand(seed, idx) if STOCHASTIC else 0.5
        q = tl.floor(v + noise)
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
        q = tl.where((s > 0.0) & valid, q, 0.0)
        # Pack: code k of a byte goes to bit offset k * BITS (no overlap, so a sum is an OR).
        codes = tl.reshape(q.to(tl.int32), (BLOCK_G, BYTES, PER_BYTE))
        k = tl.arange(0, PER_BYTE)
        packed = tl.sum(codes << (k * BITS)[None, None, :], axis=2)
        b = tl.arange(0, BYTES)
        out = g[:, None] * BYTES + b[None, :]
        tl.store(packed_ptr + out, packed.to(tl.uint8), mask=gmask[:, None])

    @triton.jit
    def _dequantize_kernel(
        packed_ptr,
        offset_ptr,
        scale_ptr,
        out_ptr,
        n,
        n_groups,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        OUT_KIND: tl.constexpr,
    ):
        PER_BYTE: tl.constexpr = 8 // BITS
        BYTES: tl.constexpr = GROUP // PER_BYTE
        MASK: tl.constexpr = (1 << BITS) - 1

        pid = tl.program_id(0).to(tl.int64)
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        b = tl.arange(0, BYTES)
        k = tl.arange(0, PER_BYTE)
        gmask = g < n_groups

        # Unpack [BLOCK_G, BYTES] bytes into [BLOCK_G, BYTES, PER_BYTE] codes, then flatten groups.
        byte = tl.load(packed_ptr + g[:, None] * BYTES + b[None, :], mask=gmask[:, None], other=0)
        codes = (byte.to(tl.int32)[:, :, None] >> (k * BITS)[None, None, :]) & MASK
        scale = tl.load(scale_ptr + g, mask=gmask, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + g, mask=gmask, other=0.0).to(tl.float32)
        # code * scale is exact in fp32, so this equals the reference's separate mul and add.
        val = codes.to(tl.float32) * scale[:, None, None] + offset[:, None, None]
        val = tl.reshape(val, (BLOCK_G, GROUP))
        idx = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        valid = idx < n
        if OUT_KIND == 2:
            # fp32 -> bf16 round to nearest even on the bit pattern, stored as int16.
            u = val.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where(val != val, 0x7FC0, r)
            tl.store(out_ptr + idx, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
        elif OUT_KIND == 1:
            tl.store(out_ptr + idx, val.to(tl.float16), mask=valid)
        else:
            tl.store(out_ptr + idx, val, mask=valid)


def _check_launch(t: torch.Tensor, bits: int, group_size: int) -> None:
    """Validate ``bits``, ``group_size``, Triton availability and the device before a launch."""
    check_bits(bits)
    if (
        isinstance(group_size, bool)
        or group_size < 1
        or group_size > MAX_GROUP_SIZE
        or group_size & (group_size - 1)
        or (group_size * bits) % 8
    ):
        raise ValueError(
            f"group_size={group_size!r} is not supported by the Triton kernels: use a power of two "
            f"<= {MAX_GROUP_SIZE} whose codes fill whole bytes (group_size * bits % 8 == 0)."
        )
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the `triton` package; use backend='torch'.")
    if t.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "Triton min-max kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before "
            "importing triton to run them on CPU); use backend='torch' for CPU tensors."
        )


def _stats_arg(t: torch.Tensor) -> torch.Tensor:
    """Flat contiguous offsets/scales: fp16 as stored, anything else widened exactly to fp32."""
    t = t.reshape(-1)
    return (t if t.dtype == torch.float16 else t.float()).contiguous()


def _block_groups(n_groups: int, group_size: int) -> int:
    """Groups per program: about ``BLOCK_ELEMS`` elements, never more than needed."""
    block = max(1, BLOCK_ELEMS // group_size)
    return max(1, min(block, triton.next_power_of_2(n_groups)))


def triton_quantize_minmax(
    x: torch.Tensor,
    bits: int,
    group_size: int = 64,
    stochastic: bool = False,
    seed: int = 0,
    *,
    with_fits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Quantize ``x`` to ``(packed_uint8, offset_fp16, scale_fp16)`` with one fused kernel.

    Same contract as :func:`.minmax.quantize_minmax` and bit-identical to it for
    ``stochastic=False``. With ``stochastic=True`` the rounding noise is ``tl.rand(seed, i)`` for
    element ``i`` (deterministic for a given seed, unrelated to ``torch.rand``). With
    ``with_fits=True`` the per-group ``fits`` flags (bool) come fourth, as in the reference.
    """
    _check_launch(x, bits, group_size)
    flat = x.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        kind, src = _KIND_BF16, flat.contiguous().view(torch.int16)
    elif flat.dtype == torch.float16:
        kind, src = _KIND_F16, flat.contiguous()
    else:  # float32, or any other dtype the reference would also convert with .float()
        kind, src = _KIND_F32, flat.float().contiguous()
    n = src.numel()
    n_groups = -(-n // group_size)
    dev = src.device
    packed = torch.empty(n_groups * group_size * bits // 8, dtype=torch.uint8, device=dev)
    offset = torch.empty(n_groups, dtype=torch.float16, device=dev)
    scale = torch.empty(n_groups, dtype=torch.float16, device=dev)
    fits = torch.empty(n_groups if with_fits else 1, dtype=torch.int8, device=dev)
    if n_groups == 0:
        return (packed, offset, scale, fits.bool()) if with_fits else (packed, offset, scale)
    block_g = _block_groups(n_groups, group_size)
    grid = (triton.cdiv(n_groups, block_g),)
    _quantize_kernel[grid](
        src,
        packed,
        offset,
        scale,
        fits,
        n,
        n_groups,
        int(seed),
        BITS=bits,
        GROUP=group_size,
        BLOCK_G=block_g,
        IN_KIND=kind,
        STOCHASTIC=bool(stochastic),
        WITH_FITS=bool(with_fits),
    )
    if with_fits:
        return packed, offset, scale, fits.bool()
    return packed, offset, scale


def triton_dequantize_minmax(
    packed: torch.Tensor,
    offset: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`triton_quantize_minmax`: a flat tensor of ``n`` values in ``dtype``.

    Bit-identical to :func:`.minmax.dequantize_minmax` (values are computed in fp32, then
    rounded to ``dtype``; dtypes other than fp32/fp16/bf16 go through fp32 and ``.to``).
    """
    _check_launch(packed, bits, group_size)
    n_groups = offset.numel()
    if n > n_groups * group_size:
        raise ValueError(f"n={n} exceeds the {n_groups} groups of {group_size} stored.")
    if packed.numel() < n_groups * group_size * bits // 8:
        raise ValueError("packed holds fewer bytes than the groups described by offset/scale.")
    dev = packed.device
    if dtype == torch.bfloat16:
        kind, out = _KIND_BF16, torch.empty(n, dtype=torch.int16, device=dev)
    elif dtype == torch.float16:
        kind, out = _KIND_F16, torch.empty(n, dtype=torch.float16, device=dev)
    else:
        kind, out = _KIND_F32, torch.empty(n, dtype=torch.float32, device=dev)
    if n > 0:
        used = -(-n // group_size)  # groups that hold any of the first n values
        block_g = _block_groups(used, group_size)
        grid = (triton.cdiv(used, block_g),)
        _dequantize_kernel[grid](
            packed.reshape(-1).contiguous(),
            _stats_arg(offset),
            _stats_arg(scale),
            out,
            n,
            used,
            BITS=bits,
            GROUP=group_size,
            BLOCK_G=block_g,
            OUT_KIND=kind,
        )
    if kind == _KIND_BF16:
        return out.view(torch.bfloat16)
    return out.to(dtype)
