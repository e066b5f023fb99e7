"""Dense packing of small unsigned codes (1, 2, 4 or 8 bits each) into ``uint8``.

Layout: code ``i`` lives in byte ``i // (8 // bits)`` at bit offset ``(i % (8 // bits)) * bits``
(little-endian inside a byte). The Triton kernels write exactly this layout.
"""

from __future__ import annotations

import functools
import sys

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
    if _LITTLE_ENDIAN and codes.is_contiguous() and codes.storage_offset() % per_byte == 0:
        return _pack_words(codes, bits) if bits > 1 else _pack_ones(codes)
    codes = codes.view(-1, per_byte)
    # OR of strided slices: a few small passes, much faster than a uint8 sum on CPU.
    out = codes[:, per_byte - 1] << ((per_byte - 1) * bits)
    for i in range(per_byte - 1):
        out.bitwise_or_(codes[:, i] << (i * bits) if i else codes[:, 0])
    return out


_LITTLE_ENDIAN = sys.byteorder == "little"
#: The integer dtype as wide as a row of bytes (a word), for reading rows as one element.
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack 2- or 4-bit codes (contiguous, whole bytes' worth) by reading each byte's worth of
    codes as one int16 or int32 word: code ``i`` at bit ``8 i`` moves to bit ``bits * i`` by
    shift-ORs (4 bits: one shift by 4; 2 bits: by 6, then by 12), and nothing else lands in
    the low byte. Three to five contiguous passes instead of strided slices per code."""
    words = codes.view(_WORDS[8 // bits])
    x = words | (words >> (8 - bits))
    if bits == 2:
        x.bitwise_or_(x >> 12)
    return x.bitwise_and_(0xFF).to(torch.uint8)


def _pack_ones(codes: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 bytes (a multiple of 8, contiguous) eight to a byte, in eight small ops.

    Each int64 word holds eight codes, code ``i`` at bit ``8 i``; three shift-ORs move it to
    bit ``i`` (shifts by 7, 14 and 28 add up to ``7 i``), and nothing else lands in the low
    byte. Slicing the eight codes out one by one takes 21 ops: this is the mask path (ReLU,
    dropout, boolean masks), where the op count is the cost.
    """
    words = codes.view(torch.int64)
    x = words | (words >> 7)
    x.bitwise_or_(x >> 14)
    x.bitwise_or_(x >> 28)
    return x.bitwise_and_(0xFF).to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) uint8: the codes held in each possible byte."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    table = (torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return table.to(device)


@functools.lru_cache(maxsize=32)
def _byte_index(bits: int, device: torch.device) -> torch.Tensor:
    """:func:`_byte_table` as int64, ready to index with (cached: built once per device)."""
    return _byte_table(bits, device).long()


@functools.lru_cache(maxsize=32)
def _level_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) float32: each possible byte's codes as numbers (cached per device)."""
    return _byte_table(bits, device).float()


def unpack_levels(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes as float32 numbers (``unpack_lookup`` with ``values = arange``),
    from a cached table: no table is built per call."""
    check_bits(bits)
    if bits == 8:
        return packed[:n].float()
    return _rows(_level_table(bits, packed.device), packed)[:n]


def unpack_lookup(packed: torch.Tensor, bits: int, n: int, values: torch.Tensor) -> torch.Tensor:
    """Decode the first ``n`` codes straight into ``values[code]`` (any dtype).

    One lookup per packed byte in a 256-entry table of decoded bytes (:func:`_rows`): one
    pass instead of unpack, widen and gather.
    """
    check_bits(bits)
    table = values[_byte_index(bits, packed.device)] if bits < 8 else values.unsqueeze(1)
    return _rows(table, packed)[:n]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: return the first ``n`` codes as ``uint8``."""
    check_bits(bits)
    if bits == 8:
        return packed[:n]
    return _rows(_byte_table(bits, packed.device), packed)[:n]


def _rows(table: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``table[packed]`` flattened: the row of a (256, k) table for each byte, in order.

    A row of 1, 2, 4 or 8 bytes is read as one integer word, so the lookup gathers single
    elements (on CPU 4 to 10 times faster than ``index_select`` copying (256, k) rows); wider
    rows (1-bit codes decoded to float32) are copied whole, which a column-by-column gather
    did not beat at small sizes. The index is int32: an int64 copy of the bytes costs more on
    CPU than the lookup.
    """
    index = packed.int()
    width = table.shape[1] * table.element_size()
    table = table.contiguous()
    word = _WORDS.get(width)
    if word is not None:
        return table.view(word).view(-1).index_select(0, index).view(table.dtype)
    return table.index_select(0, index).view(-1)
