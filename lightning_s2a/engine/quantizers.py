"""Per-operator quantizers for saved tensors, chosen from one table by operator kind.

Each quantizer turns a tensor into a packed object (:mod:`.packed`) with ``unpack()`` (the
same data on every call) and ``nbytes`` (bytes actually kept). :data:`QUANTIZERS` maps an
operator kind from :mod:`.ops` to its quantizer; the engine looks the kind up there and
nowhere else.

Non-finite values never become finite ones (or spread to their neighbours): a tensor that a
code cannot represent is kept as it is. Min-max codes learn this from the group minimum and
maximum they compute anyway (NaN, +-inf, or beyond the fp16 range of the group stats);
derivative codes and bitsandbytes from one float32 sum of the tensor (a NaN or an infinity
makes it non-finite). Softmax rows need no check: a softmax row with a NaN is all NaN, and its
row maximum, NaN, gives back an all-NaN row.

This PyTorch code is the reference. With ``backend="triton"`` (CUDA) every quantizer but
bitsandbytes packs and unpacks with fused Triton kernels instead (:mod:`.triton_minmax`,
:mod:`.triton_codes`), which store the same bytes and give back the same values bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from .codebook import encode
from .geometry import Rows
from .packed import (
    BnbPacked,
    CodePacked,
    KeptPacked,
    MinMaxPacked,
    PackOptions,
    RowMaxPacked,
    TwoLevelPacked,
)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """On ``t``'s device: True if it holds no NaN and no infinity (one float32 sum; overflow
    reads as False)."""
    return torch.isfinite(t.sum(dtype=torch.float32))


def pack_minmax(t: torch.Tensor, opts: PackOptions) -> MinMaxPacked | BnbPacked | KeptPacked:
    """Generic quantizer: per-group min-max (torch/Triton) or bitsandbytes 4-bit.

    bitsandbytes codes 4 bits in blocks of 32 or more: other widths (``op_bits``,
    ``trainable_input_bits``, modules calibration widened to 8 bits) and norm rows whose
    groups shrink below 32 take the min-max codes instead (they were coded in 4 bits
    whatever was asked, or failed in bitsandbytes)."""
    if opts.row:
        opts, packed = _along_rows(t, opts)
        if packed is not None:
            return packed
    if opts.backend == "bnb" and opts.bits == 4 and opts.group_size >= 32:
        # absmax blocks: an infinity makes its block NaN, and a NaN may come back finite.
        finite = _finite(t)
        if not opts.defer and not bool(finite):
            return KeptPacked(t)
        packed = BnbPacked(t, opts)
        if opts.defer:
            packed.decide(t, finite, defer=True)
        return packed
    if (
        opts.batches is not None
        and opts.backend == "torch"
        and not opts.stochastic  # the noise is drawn per tensor
        and not opts.defer  # its check before batching reads the device
        and opts.group_size * opts.bits % 8 == 0  # each tensor's codes on whole bytes
        and t.numel()
    ):
        batched = opts.batches.minmax(t, opts.bits, opts.group_size)
        if batched is not None:
            return batched
    return MinMaxPacked(t, opts)


def pack_norm(t: torch.Tensor, opts: PackOptions) -> MinMaxPacked | BnbPacked | KeptPacked:
    """Norm inputs: min-max codes whose groups never span two rows of the norm.

    Its backward scales each row's error by that row's inverse standard deviation: a
    near-constant row (a class token at its initial 1e-6) sharing a group with a normal one
    gets a step far wider than itself, and its gradient is lost. Where the row length (layer
    norm: the normalized size; group norm: (C / G) x H x W; instance norm: H x W) is no
    multiple of ``group_size``, groups shrink to the largest power of two dividing it, if that
    is 8 or more (96 channels: Swin-T, ConvNeXt-T); otherwise (196 tokens, 14 x 14 planes)
    each row is padded to whole groups and coded on its own (:class:`.geometry.Rows`).
    """
    opts, packed = _along_rows(t, opts)
    if packed is not None:
        return packed
    n = t.numel()
    if opts.channels and opts.backend != "bnb" and t.dim() >= 2 and n:
        # BatchNorm in training: groups in memory order stay inside one channel only where
        # each channel's plane is a multiple of the group; elsewhere (7x7, 1x1, (N, C)) the
        # groups are taken along each channel instead.
        plane = n // (t.shape[0] * t.shape[1])
        if plane % opts.group_size:
            return MinMaxPacked(t, opts, Rows.of_channels(t, opts.group_size))
    return pack_minmax(t, opts)


def _along_rows(t: torch.Tensor, opts: PackOptions) -> tuple[PackOptions, MinMaxPacked | None]:
    """Min-max groups that never span two of ``opts.row``-long rows: where the row is no
    multiple of the group, groups shrink to the largest power of two dividing it if that is
    8 or more (96 channels: 32), or each row is padded to whole groups and coded on its own
    (that packed tensor is returned)."""
    row, n = opts.row, t.numel()
    if row and n and n % row == 0 and row % opts.group_size:
        pow2 = row & -row  # the largest power of two dividing the row
        if pow2 >= 8:
            return dataclasses.replace(opts, group_size=pow2), None
        if opts.backend != "bnb" or opts.bits != 4:
            return opts, MinMaxPacked(t, opts, Rows.of_length(t, row, opts.group_size))
    return opts, None


def pack_elementwise(t: torch.Tensor, opts: PackOptions) -> CodePacked | KeptPacked:
    """Derivative-aware code for a smooth op, or an exact 1-bit code for a step derivative."""
    spec = opts.spec
    assert spec is not None
    flat = t.detach().reshape(-1)
    triton = opts.backend == "triton"
    if spec.exact:
        assert spec.mask is not None
        table = _mask_table(spec.mask_points, t.dtype, t.device)
        if not _decodes_to_its_side(spec, table):
            return KeptPacked(t)  # a point that rounds onto the step in this dtype
        if triton:  # the mask is a Python function: computed first, then packed by the kernel
            from .triton_codes import triton_pack_codes

            codes = triton_pack_codes(spec.mask(flat), 1)
            return CodePacked(codes, 1, table, t, packed=True, triton=True)
        if opts.batches is not None and flat.numel():
            return opts.batches.mask(spec.mask(flat), t, table)
        return CodePacked(spec.mask(flat).to(torch.uint8), 1, table, t)
    # Interval codes would send a NaN (and +-inf) to an end interval's finite point.
    finite = _finite(flat)
    if not opts.defer and not bool(finite):
        return KeptPacked(t)
    assert opts.codebook is not None, "derivative codes need a fitted codebook"
    boundaries, points, grid = opts.codebook
    if triton:  # interval search and packing fused in one kernel
        from .triton_codes import triton_encode_intervals

        codes = triton_encode_intervals(flat, boundaries, opts.bits)
        packed = CodePacked(codes, opts.bits, points, t, packed=True, triton=True, first_order=True)
    else:
        packed = CodePacked(encode(flat, boundaries, grid), opts.bits, points, t, first_order=True)
    if opts.defer:
        packed.decide(t, finite, defer=True)
    return packed


_SIDES: dict[tuple, bool] = {}


def _decodes_to_its_side(spec: Any, table: torch.Tensor) -> bool:
    """True if each of the two decode points lies on its own side of the step in the
    tensor's dtype. A point next to a large or infinite bound (``clamp(max=65504)`` in
    float16, ``hardtanh(-inf, 2)``) can round onto the bound or become inf/NaN, and every
    element would decode to the other side: such tensors are kept exact instead."""
    key = (spec.name, spec.mask_points, table.dtype, table.device)
    known = _SIDES.get(key)
    if known is None:
        assert spec.mask is not None
        if len(_SIDES) >= 1024:  # bounds that change per call (a clamp to a running max)
            _SIDES.clear()
        known = _SIDES[key] = spec.mask(table).tolist() == [False, True]
    return known


@functools.lru_cache(maxsize=64)
def _mask_table(points: tuple[float, float], dtype: torch.dtype, device: torch.device):
    """The two values an exact 1-bit code decodes to, built once per dtype and device (read
    only: every decode indexes it into a new tensor)."""
    return torch.tensor(points, dtype=dtype, device=device)


def pack_softmax(t: torch.Tensor, opts: PackOptions) -> RowMaxPacked:
    """Softmax outputs: per-row codes over ``[0, row max]``."""
    return RowMaxPacked(t, opts)


def pack_two_level(t: torch.Tensor, opts: PackOptions) -> TwoLevelPacked:
    """Masks and dropout noise: exact, one bit per element."""
    return TwoLevelPacked(t, triton=opts.backend == "triton")


Quantizer = Callable[[torch.Tensor, PackOptions], Any]

#: Operator kind -> quantizer. The one place a saved tensor's storage format is chosen.
QUANTIZERS: dict[str, Quantizer] = {
    "elementwise": pack_elementwise,
    "mask": pack_two_level,
    "dropout": pack_two_level,
    "softmax": pack_softmax,
    "norm": pack_norm,
    "attention": pack_minmax,
    "fused_attention": pack_minmax,
    "matmul": pack_minmax,
    "linear": pack_minmax,
    "trainable": pack_minmax,
    "loss": pack_minmax,
    "custom": pack_minmax,
    "position": pack_minmax,
    "sampled": pack_minmax,
    "singular": pack_minmax,
    "generic": pack_minmax,
}
