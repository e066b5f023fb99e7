"""Fused Triton kernels for the code quantizers (derivative codes, softmax rows, two-level).

One kernel per direction per kind, each a single launch without full-size intermediates:

* :func:`triton_encode_intervals` -- derivative codes: per element a branchless binary search
  over the sorted fp32 boundaries (``torch.bucketize``'s interval index), packed into bytes.
* :func:`triton_pack_codes` -- ready-made small codes (a bool mask, uint8 0/1) packed into bytes.
* :func:`triton_pack_nonzero` -- two-level tensors: one bit of nonzero-ness per element, plus
  the tensor's maximum (the single high value): per-program partial maxima, then one tiny
  ``amax`` over them when there are several programs.
* :func:`triton_unpack_lookup` -- decode for all of the above: unpack and look each code up in
  a small table, moved as raw bits (exact for any dtype).
* :func:`triton_quantize_rows` / :func:`triton_dequantize_rows` -- softmax rows: row maximum,
  kept in fp16 (the step divided from it in float32), rounding and packing in one kernel (one
  read of the input, two for rows too wide for a tile); unpack and rescale in one kernel.

All match the PyTorch reference in :mod:`.quantizers`, :mod:`.codebook` and :mod:`.bitpack`
bit for bit, with the conventions of :mod:`.triton_minmax`: IEEE divisions (``tl.div_rn``),
bfloat16 moved as raw 16-bit integers, NaN tested explicitly (``tl.max`` need not propagate it).
A NaN's payload and sign are not specified (a NaN row's fp16 scale is the canonical NaN; torch's
own conversions disagree on NaN bits between its scalar and vector paths). Stochastic rounding
draws its noise from Philox (``tl.rand(seed, element index)``), unrelated to ``torch.rand``.

The module imports without Triton (``HAS_TRITON`` is then False) and on CPU-only machines; the
kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import.
"""

from __future__ import annotations

import math

import torch

from .bitpack import check_bits, packed_numel
from .triton_minmax import (  # one import of Triton, and one set of element kinds
    _KIND_BF16,
    _KIND_F16,
    _KIND_F32,
    HAS_TRITON,
    _interpreting,
    tl,
    triton,
)

#: Elements per program of the elementwise kernels, and the largest [rows, width] tile of the
#: softmax kernel (powers of two). A tile holds whole rows, at least as many as fill whole bytes
#: (up to 8, for odd widths at 1 bit); rows too wide for that are read twice (max, then codes).
BLOCK_ELEMS = 4096
ROW_TILE = 4096

_MODE_CODES, _MODE_INTERVALS, _MODE_NONZERO = 0, 1, 2
_FLOAT_KINDS = {torch.float32: _KIND_F32, torch.float16: _KIND_F16, torch.bfloat16: _KIND_BF16}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

if HAS_TRITON:

    @triton.jit
    def _to_f32(raw, KIND: tl.constexpr):
        if KIND == 2:  # bf16 bits in the high half of an fp32 word (exact)
            x = (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            x = raw.to(tl.float32)
        return x

    @triton.jit
    def _store_f32(ptr, val, mask, KIND: tl.constexpr):
        if KIND == 2:  # fp32 -> bf16 round to nearest even on the bit pattern, stored as int16
            u = val.to(tl.uint32, bitcast=True)
            r = tl.where(val != val, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
            tl.store(ptr, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        elif KIND == 1:
            tl.store(ptr, val.to(tl.float16), mask=mask)
        else:
            tl.store(ptr, val, mask=mask)

    @triton.jit
    def _pack_store(packed_ptr, codes, byte, mask, BITS: tl.constexpr, PB: tl.constexpr):
        # codes: [bytes, PB] int32, 0 on padding; code k of a byte sits at bit k * BITS.
        k = tl.arange(0, PB)
        packed = tl.sum(codes << (k * BITS)[None, :], axis=1)
        tl.store(packed_ptr + byte, packed.to(tl.uint8), mask=mask)

    @triton.jit
    def _encode_kernel(
        x_ptr,
        bounds_ptr,
        packed_ptr,
        partial_ptr,
        n,
        n_bytes,
        BITS: tl.constexpr,
        BB: tl.constexpr,
        MODE: tl.constexpr,
        IN_KIND: tl.constexpr,
    ):
        PB: tl.constexpr = 8 // BITS
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BB + tl.arange(0, BB)
        e = byte[:, None] * PB + tl.arange(0, PB)[None, :]
        valid = e < n
        raw = tl.load(x_ptr + e, mask=valid, other=0)
        if MODE == 0:  # small codes as uint8
            codes = raw.to(tl.int32) & ((1 << BITS) - 1)
        else:
            x = _to_f32(raw, IN_KIND)
            if MODE == 1:
                # Lower bound over 2**BITS - 1 boundaries (+inf padded): count of b < x.
                codes = tl.zeros(x.shape, tl.int32)
                for i in tl.static_range(BITS):
                    step: tl.constexpr = 1 << (BITS - 1 - i)
                    probe = tl.load(bounds_ptr + codes + (step - 1))
                    codes = tl.where(probe < x, codes + step, codes)
            else:
                codes = tl.where(x != 0.0, 1, 0)
                # Partial maximum, as raw bits of the input dtype: a NaN wins (one of the NaNs).
                nan = valid & (x != x)
                top = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=1), axis=0)
                if IN_KIND == 2:
                    bits = raw.to(tl.int32)
                    top_bits = top.to(tl.int32, bitcast=True) >> 16
                elif IN_KIND == 1:
                    bits = raw.to(tl.int16, bitcast=True).to(tl.int32)
                    top_bits = top.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
                else:
                    bits = raw.to(tl.int32, bitcast=True)
                    top_bits = top.to(tl.int32, bitcast=True)
                nan_bits = tl.max(tl.max(tl.where(nan, bits, -(2**31)), axis=1), axis=0)
                n_nan = tl.sum(tl.sum(nan.to(tl.int32), axis=1), axis=0)
                top_bits = tl.where(n_nan > 0, nan_bits, top_bits)
                tl.store(partial_ptr + pid, top_bits.to(partial_ptr.dtype.element_ty))
        codes = tl.where(valid, codes, 0)
        _pack_store(packed_ptr, codes, byte, byte < n_bytes, BITS, PB)

    @triton.jit
    def _lookup_kernel(
        packed_ptr, table_ptr, out_ptr, n, n_bytes, BITS: tl.constexpr, BB: tl.constexpr
    ):
        PB: tl.constexpr = 8 // BITS
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BB + tl.arange(0, BB)
        k = tl.arange(0, PB)
        b = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
        codes = (b[:, None] >> (k * BITS)[None, :]) & ((1 << BITS) - 1)
        e = byte[:, None] * PB + k[None, :]
        valid = e < n
        tl.store(out_ptr + e, tl.load(table_ptr + codes, mask=valid), mask=valid)

    @triton.jit
    def _row_codes(x, s, idx, seed, LEVELS: tl.constexpr, STOCHASTIC: tl.constexpr):
        # floor(x / s + noise) clamped to [0, LEVELS]; 0 where s <= 0 or NaN, and for NaN x.
        v = tl.div_rn(x, tl.where(s > 0.0, s, 1.0))
        noise = tl.rand(seed, idx) if STOCHASTIC else 0.5
        q = tl.floor(v + noise)
        q = tl.where(q > 0.0, q, 0.0)
        q = tl.where(q < LEVELS, q, LEVELS * 1.0)
        return tl.where(s > 0.0, q, 0.0).to(tl.int32)

    @triton.jit
    def _rows_quantize_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        R,
        W,
        n,
        seed,
        BITS: tl.constexpr,
        BR: tl.constexpr,
        CW: tl.constexpr,
        IN_KIND: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        WIDE: tl.constexpr,
    ):
        # A program owns BR whole rows (BR * W fills whole bytes when there are several).
        PB: tl.constexpr = 8 // BITS
        LEVELS: tl.constexpr = (1 << BITS) - 1
        pid = tl.program_id(0).to(tl.int64)
        r = pid * BR + tl.arange(0, BR)
        rmask = r < R
        span = BR * W  # elements of the program, from `base`
        base = pid * BR * W
        n_bytes = (n + PB - 1) // PB
        if WIDE:  # rows wider than a tile: the maximum column block by column block
            top = tl.full((BR,), float("-inf"), tl.float32)
            n_nan = tl.zeros((BR,), tl.int32)
            for c0 in range(0, W, CW):
                c = c0 + tl.arange(0, CW)
                valid = rmask[:, None] & (c < W)[None, :]
                raw = tl.load(x_ptr + r[:, None] * W + c[None, :], mask=valid, other=0)
                x = _to_f32(raw, IN_KIND)
                top = tl.maximum(top, tl.max(tl.where(valid, x, float("-inf")), axis=1))
                n_nan += tl.sum((valid & (x != x)).to(tl.int32), axis=1)
        else:  # the whole [BR, CW] tile stays in registers: x is read once
            c = tl.arange(0, CW)
            valid = rmask[:, None] & (c < W)[None, :]
            idx = r[:, None] * W + c[None, :]
            x = _to_f32(tl.load(x_ptr + idx, mask=valid, other=0), IN_KIND)
            top = tl.max(tl.where(valid, x, float("-inf")), axis=1)
            n_nan = tl.sum((valid & (x != x)).to(tl.int32), axis=1)
        top = tl.where(n_nan > 0, float("nan"), top)  # amax propagates NaN
        top = tl.where(top < 0.0, 0.0, top)  # clamp(min=0), NaN kept
        scale16 = top.to(tl.float16)  # the row maximum; the step in float32 (as the reference)
        tl.store(scale_ptr + r, scale16, mask=rmask)
        s = tl.div_rn(scale16.to(tl.float32), tl.full(top.shape, LEVELS, tl.float32))
        if WIDE:  # codes in byte order, x read again; each element's row scale by gather
            for e0 in range(0, tl.minimum(span, n - base), CW):
                el = e0 + tl.arange(0, CW)
                ok = (el < span) & (base + el < n)
                x = _to_f32(tl.load(x_ptr + base + el, mask=ok, other=0), IN_KIND)
                lr = tl.where(ok, el // W, 0).to(tl.int32)
                q = _row_codes(x, tl.gather(s, lr, 0), base + el, seed, LEVELS, STOCHASTIC)
                q = tl.reshape(tl.where(ok, q, 0), (CW // PB, PB))
                byte = (base + e0) // PB + tl.arange(0, CW // PB)
                lb = e0 + tl.arange(0, CW // PB) * PB
                _pack_store(packed_ptr, q, byte, (lb < span) & (byte < n_bytes), BITS, PB)
        else:
            q = _row_codes(x, s[:, None], idx, seed, LEVELS, STOCHASTIC)
            if PB == 1:
                tl.store(packed_ptr + idx, q.to(tl.uint8), mask=valid)
            else:
                # Rows are CW wide in registers but W wide in memory: gather into byte order.
                qf = tl.reshape(tl.where(valid, q, 0), (BR * CW,))
                el = tl.arange(0, BR * CW)
                lr = el // W
                ok = (lr < BR) & (pid * BR + lr < R)
                pos = tl.where(ok, lr * CW + el % W, 0)
                q = tl.where(ok, tl.gather(qf, pos, 0), 0)
                q = tl.reshape(q, (BR * CW // PB, PB))
                lb = tl.arange(0, BR * CW // PB)
                byte = base // PB + lb
                _pack_store(packed_ptr, q, byte, (lb * PB < span) & (byte < n_bytes), BITS, PB)

    @triton.jit
    def _rows_dequantize_kernel(
        packed_ptr,
        scale_ptr,
        out_ptr,
        n,
        W,
        BITS: tl.constexpr,
        BB: tl.constexpr,
        KIND: tl.constexpr,
    ):
        PB: tl.constexpr = 8 // BITS
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BB + tl.arange(0, BB)
        k = tl.arange(0, PB)
        b = tl.load(packed_ptr + byte, mask=byte * PB < n, other=0).to(tl.int32)
        codes = (b[:, None] >> (k * BITS)[None, :]) & ((1 << BITS) - 1)
        e = byte[:, None] * PB + k[None, :]
        valid = e < n
        top = tl.load(scale_ptr + e // W, mask=valid, other=0.0).to(tl.float32)
        s = tl.div_rn(top, tl.full(top.shape, (1 << BITS) - 1, tl.float32))
        _store_f32(out_ptr + e, codes.to(tl.float32) * s, valid, KIND)  # one rounding, as torch


def _check_launch(t: torch.Tensor, bits: int) -> None:
    """Validate ``bits``, Triton availability and the device before a launch."""
    check_bits(bits)
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the `triton` package; use backend='torch'.")
    if t.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "Triton code kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before importing "
            "triton to run them on CPU); use backend='torch' for CPU tensors."
        )


def _float_source(x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Kernel input kind and flat contiguous source (bf16 as int16; others widened to fp32)."""
    flat = x.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return _KIND_BF16, flat.contiguous().view(torch.int16)
    if flat.dtype == torch.float16:
        return _KIND_F16, flat.contiguous()
    return _KIND_F32, flat.float().contiguous()


def _block_bytes(n_bytes: int, bits: int) -> int:
    """Bytes per program of the elementwise kernels: ``BLOCK_ELEMS`` elements, never more."""
    return max(1, min(BLOCK_ELEMS * bits // 8, triton.next_power_of_2(n_bytes)))


def _encode(src: torch.Tensor, n: int, bits: int, mode: int, kind: int, **extra) -> torch.Tensor:
    n_bytes = packed_numel(n, bits)
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=src.device)
    if n_bytes:
        bb = _block_bytes(n_bytes, bits)
        bounds = extra.get("bounds", packed)
        partial = extra.get("partial", packed)
        _encode_kernel[(triton.cdiv(n_bytes, bb),)](
            src, bounds, packed, partial, n, n_bytes, BITS=bits, BB=bb, MODE=mode, IN_KIND=kind
        )
    return packed


def triton_encode_intervals(x: torch.Tensor, boundaries: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_bits(encode(x, boundaries), bits)`` in one kernel (``boundaries`` ascending).

    At most ``2**bits - 1`` boundaries; NaN inputs get an unspecified code (the quantizer keeps
    non-finite tensors as they are before encoding).
    """
    _check_launch(x, bits)
    levels = 1 << bits
    if boundaries.numel() >= levels:
        raise ValueError(f"{boundaries.numel()} boundaries do not fit {bits}-bit codes.")
    bounds = torch.full((levels - 1,), float("inf"), dtype=torch.float32, device=x.device)
    bounds[: boundaries.numel()] = boundaries.reshape(-1)
    kind, src = _float_source(x)
    return _encode(src, src.numel(), bits, _MODE_INTERVALS, kind, bounds=bounds)


def triton_pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack_bits(codes, bits)`` for codes ``< 2**bits`` (higher bits dropped); bool or uint8
    codes are read as they are, other dtypes converted with ``.to(torch.uint8)`` first."""
    _check_launch(codes, bits)
    flat = codes.detach().reshape(-1)
    src = (flat if flat.dtype == torch.bool else flat.to(torch.uint8)).contiguous()
    src = src.view(torch.uint8)
    return _encode(src, src.numel(), bits, _MODE_CODES, 0)


def triton_pack_nonzero(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """1-bit codes of ``t != 0`` and, unless ``t`` is bool, ``t.amax()`` as a (1,) tensor."""
    _check_launch(t, 1)
    if t.dtype == torch.bool:
        return triton_pack_codes(t, 1), None
    if t.dtype not in _FLOAT_KINDS:
        raise TypeError(f"two-level kernels take bool, fp32, fp16 or bf16, not {t.dtype}.")
    kind = _FLOAT_KINDS[t.dtype]
    flat = t.detach().reshape(-1).contiguous()
    src = flat.view(torch.int16) if kind == _KIND_BF16 else flat
    n = src.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device), t.new_zeros(1)
    programs = triton.cdiv(packed_numel(n, 1), _block_bytes(packed_numel(n, 1), 1))
    partial = torch.empty(programs, dtype=_INT_OF_SIZE[t.element_size()], device=t.device)
    packed = _encode(src, n, 1, _MODE_NONZERO, kind, partial=partial)
    partial = partial.view(t.dtype)
    return packed, partial if programs == 1 else partial.amax(dim=0, keepdim=True)


def triton_unpack_lookup(
    packed: torch.Tensor, bits: int, n: int, values: torch.Tensor
) -> torch.Tensor:
    """``unpack_lookup(packed, bits, n, values)``: ``values[code]`` for the first ``n`` codes."""
    _check_launch(packed, bits)
    if values.numel() < (1 << bits):
        raise ValueError(f"a {bits}-bit code needs {1 << bits} table values, not {values.numel()}.")
    n_bytes = packed_numel(n, bits)
    if packed.numel() < n_bytes:
        raise ValueError(f"packed holds {packed.numel()} bytes, fewer than {n} codes need.")
    as_int = _INT_OF_SIZE[values.element_size()]
    table = values.detach().reshape(-1).contiguous().view(as_int)
    out = torch.empty(n, dtype=values.dtype, device=packed.device)
    if n:
        bb = _block_bytes(n_bytes, bits)
        _lookup_kernel[(triton.cdiv(n_bytes, bb),)](
            packed.reshape(-1).contiguous(), table, out.view(as_int), n, n_bytes, BITS=bits, BB=bb
        )
    return out


def triton_quantize_rows(
    rows: torch.Tensor, bits: int, stochastic: bool = False, seed: int = 0, *, tile: int = ROW_TILE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes over ``[0, row max]`` of a 2-D ``(R, W)`` tensor: ``(packed, max_fp16)``.

    Same as :class:`.packed.RowMaxPacked` (rows along the last dim). ``tile`` (a power of
    two >= 64) bounds the elements a program holds; wider rows take a second read.
    """
    if tile < 64 or tile & (tile - 1):
        raise ValueError(f"tile={tile!r} must be a power of two >= 64.")
    _check_launch(rows, bits)
    if rows.dim() != 2:
        raise ValueError(f"rows must be 2-D (rows, width), not {tuple(rows.shape)}.")
    R, W = rows.shape
    dev = rows.device
    packed = torch.empty(packed_numel(R * W, bits), dtype=torch.uint8, device=dev)
    scale = torch.zeros(R, dtype=torch.float16, device=dev)
    if R == 0 or W == 0:
        return packed, scale
    kind, src = _float_source(rows)
    per_byte = 8 // bits
    align = per_byte // math.gcd(W, per_byte)  # rows per program so that it fills whole bytes
    cw = triton.next_power_of_2(W)
    wide = align * cw > tile
    if wide:
        br, cw = align, tile // align
    else:
        br = max(align, min(tile // cw, triton.next_power_of_2(R)))
    _rows_quantize_kernel[(triton.cdiv(R, br),)](
        src, packed, scale, R, W, R * W, int(seed),
        BITS=bits, BR=br, CW=cw, IN_KIND=kind, STOCHASTIC=bool(stochastic), WIDE=wide,
    )  # fmt: skip
    return packed, scale


def triton_dequantize_rows(
    packed: torch.Tensor, scale: torch.Tensor, width: int, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`triton_quantize_rows`: an ``(R, width)`` tensor in ``dtype``."""
    _check_launch(packed, bits)
    R = scale.numel()
    n = R * width
    if packed.numel() < packed_numel(n, bits):
        raise ValueError(f"packed holds {packed.numel()} bytes, fewer than {n} codes need.")
    kind = _FLOAT_KINDS.get(dtype, _KIND_F32)
    out_dtype = {_KIND_BF16: torch.int16, _KIND_F16: torch.float16}.get(kind, torch.float32)
    out = torch.empty(R, width, dtype=out_dtype, device=packed.device)
    if n:
        bb = _block_bytes(packed_numel(n, bits), bits)
        scale16 = scale.reshape(-1).to(torch.float16).contiguous()
        grid = (triton.cdiv(packed_numel(n, bits), bb),)
        _rows_dequantize_kernel[grid](
            packed.reshape(-1).contiguous(), scale16, out, n, width, bits, bb, kind
        )
    return out.view(torch.bfloat16) if kind == _KIND_BF16 else out.to(dtype)
