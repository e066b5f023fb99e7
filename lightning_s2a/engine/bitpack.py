"""Dense packing of small unsigned codes (1, 2, 4 or 8 bits each) into ``uint8``.

Layout: code ``i`` lives in byte ``i // (8 // bits)`` at bit offset ``(i % (8 // bits)) * bits``
(little-endian inside a byte). The Triton kernels write exactly this layout.
"""

from __future__ import annotations

import functools

import torch

SUPPORTED_BITS = (1, 2, 4, 8)


def check_bits(bits: int, field: str = "bits") -> int:
    """Return ``bits`` if it is a supported width, else raise a ``ValueError`` naming the field.

    Only a real ``int`` is a width: ``4.0`` and ``True`` compare equal to supported widths but
    would fail later, inside the packing arithmetic.
    """
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise ValueError(
            f"{field}={bits!r} is not supported: expected an int ({type(bits).__name__} given); "
            f"choose one of {SUPPORTED_BITS}."
        )
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{field}={bits!r} is not supported: choose one of {SUPPORTED_BITS} "
            "(codes are packed densely into uint8)."
        )
    return bits


def packed_numel(n: int, bits: int) -> int:
    """Number of bytes that ``n`` codes of ``bits`` bits occupy."""
    per_byte = 8 // bits
    return (n + per_byte - 1) // per_byte


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes ``< 2**bits`` into a flat ``uint8`` tensor."""
    check_bits(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    per_byte = 8 // bits
    n = codes.numel()
    pad = (-n) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.view(-1, per_byte)
    # OR of strided slices: a few small passes, much faster than a uint8 sum on CPU.
    out = codes[:, 0].clone()
    for i in range(1, per_byte):
        out.bitwise_or_(codes[:, i] << (i * bits))
    return out


@functools.lru_cache(maxsize=32)
def _byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) uint8: the codes held in each possible byte."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    table = (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return table.to(device)


def unpack_lookup(packed: torch.Tensor, bits: int, n: int, values: torch.Tensor) -> torch.Tensor:
    """Decode the first ``n`` codes straight into ``values[code]`` (any dtype).

    One ``index_select`` per packed byte against a 256-entry table of decoded bytes: one pass
    instead of unpack, widen and gather.
    """
    check_bits(bits)
    table = values[_byte_table(bits, packed.device).long()] if bits < 8 else values.unsqueeze(1)
    return table.index_select(0, packed.long()).view(-1)[:n]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: return the first ``n`` codes as ``uint8``."""
    check_bits(bits)
    if bits == 8:
        return packed[:n]
    return _byte_table(bits, packed.device).index_select(0, packed.long()).view(-1)[:n]
