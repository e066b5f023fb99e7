"""Per-group asymmetric min-max quantization: the generic quantizer for saved tensors.

Groups are ``group_size`` consecutive elements of the flattened (contiguous) tensor, so for a
last dimension that is a multiple of the group size each group lies along the last dimension.
Each group stores an fp16 offset (its minimum, rounded down) and an fp16 scale. Codes are
rounded to nearest (``floor(v + 0.5)``) or stochastically, and packed with :mod:`.bitpack`.

Codes cannot hold a value the fp16 stats cannot reach: a NaN, an infinity, or a finite value
beyond the fp16 range (``|x| > 65504``, such as a ``torch.finfo(torch.float32).min`` attention
mask), nor a group whose fp16 offset (its minimum rounded down) is further below its minimum
than its whole span (a large common value with a small spread: fp16 keeps 11 bits of it),
or whose fp16 step moves its top code by more than half its span (a step under fp16's
subnormals, which rounds to 0).
Such groups are saturated or coarsened here, and flagged: with ``with_fits=True`` the
quantizer also returns one boolean per group that is False where the group's codes are not
faithful, computed from the group's minimum and maximum that quantization needs anyway (no
extra pass over the data). :class:`.packed.MinMaxPacked` keeps a tensor with any such group
exactly as it is, and one so small that fp16's subnormal stats would flatten it
(:func:`underflows`).

This pure-PyTorch version is the reference; the Triton kernels must match it bit for bit.
"""

from __future__ import annotations

import torch

from .bitpack import pack_bits, unpack_levels

FP16_MAX = 65504.0
_DOWN = torch.tensor(-torch.inf, dtype=torch.float16)


def group_stats(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fp16 ``(offset, scale)`` for each row of ``groups`` (a float tensor, groups
    along the last dimension)."""
    offset, scale, _, _ = _group_stats(groups, bits)
    return offset, scale


def _group_stats(
    groups: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(offset, scale, fits, offset_float32)`` per row: ``fits`` is False where the fp16
    stats saturate; the offset comes in float32 too, converted once for both of its uses.

    A group fits if it holds no NaN (``amin``/``amax`` propagate NaN, and every comparison with
    NaN is False), no value beyond +-65504 (infinities included), and its step is within the
    fp16 range too (at 1 bit the step is the whole span, up to twice 65504); and, unless it is
    constant, if its offset (the minimum rounded down) is at most its span below the minimum
    and rounding its step to fp16 moves its top code by at most half its span.
    """
    levels = (1 << bits) - 1
    # On CPU two reductions: ``aminmax(dim=-1)`` over 64-wide rows is 5 to 10 times slower
    # there than ``amin`` and ``amax`` together (same values, NaN propagated alike); on a
    # GPU one kernel reads the data once.
    if groups.device.type == "cpu":
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    else:
        lo, hi = torch.aminmax(groups, dim=-1)
    lo_raw, hi_raw = lo.reshape(-1).float(), hi.reshape(-1).float()
    lo = lo_raw.clamp(-FP16_MAX, FP16_MAX)
    hi = hi_raw.clamp(-FP16_MAX, FP16_MAX)
    # The offset is the minimum rounded down to fp16: rounded to nearest, half the groups
    # got an offset above their minimum, and their lowest values clamped to it.
    offset = lo.to(torch.float16)
    offset = torch.where(offset.float() > lo, offset.nextafter(_DOWN), offset)
    offset_f = offset.float()
    whole = hi - lo
    drift = lo - offset_f
    span = hi.sub_(offset_f).div_(levels)
    scale = span.clamp(0.0, FP16_MAX).to(torch.float16)
    # max(hi, -lo) <= 65504 is both bounds at once, and False for a NaN (maximum propagates
    # it). With 2 or more bits the step of a group within bounds is at most 2 * 65504 / 3.
    fits = torch.maximum(hi_raw, lo_raw.neg()) <= FP16_MAX
    if levels == 1:
        fits.logical_and_(span <= FP16_MAX)
    # fp16 keeps 11 bits of the minimum: on a large common value with a small spread
    # (LayerNorm inputs at 1000 +- 0.01) the offset moved by more than the group's whole
    # span (its lowest values clamped to it, and a bias gradient read 55x off, at any width,
    # until 2026-12-07). Rounded down, nothing clamps, and the step grows from span / levels
    # to (span + drift) / levels: a group fits where that at most doubles it, whatever the
    # width (a spread of 0.1% of the minimum or more). A constant group fits: its top code
    # decodes to its value within fp16's rounding of the step.
    # And the step itself must survive fp16: a group of spread 3e-6 at 8 bits has a step of
    # 1e-8, under fp16's smallest subnormal, and decoded flat (efficientvit_b0's bias
    # gradients 15% off). A group fits where rounding the step moves its top code by at
    # most half its span.
    held = (scale.float() - span).abs_().mul_(2 * levels)
    fits.logical_and_((drift <= whole).logical_and_(held <= whole).logical_or_(whole == 0))
    return offset, scale, fits, offset_f


def underflows(offset: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """True (a 0-dim bool tensor) where the whole tensor is so small that fp16's subnormal
    steps in its offsets and scales are no longer small beside the codes' own step.

    Below 2**-14 fp16 keeps an absolute step of 2**-24: a tensor of magnitude 1e-7 got
    scales of zero and decoded to zeros (gradient cosine 0.02, or exactly zero gradients).
    The bound is about the magnitude at which that rounding of a scale, times the levels,
    is 3% of the tensor's largest value, the error 4-bit codes have anyway: 2**(bits - 20)
    (1.5e-5 at 4 bits, 2.4e-4 at 8; tensors above it keep their codes' fidelity, and at 8 bits
    diffuse attention probabilities of 1e-3 stay coded). It is applied to each group's
    ``|offset| + span`` (between 1 and 3 times its largest magnitude), under twice that. It
    is read from the stored stats, so every backend decides alike; stats that rounded to
    zero cannot tell a tensor of zeros from one flattened, so a tensor of zeros is kept too.
    """
    if not offset.numel():
        return torch.zeros((), dtype=torch.bool, device=offset.device)
    # In fp16, four ops (this runs per packed tensor); an overflow to inf only says "large".
    big = offset.abs().add_(scale, alpha=(1 << bits) - 1).amax()
    return big < 2.0 ** (bits - 19)


def quantize_minmax(
    x: torch.Tensor,
    bits: int,
    group_size: int = 64,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    *,
    with_fits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Quantize ``x`` (any float dtype/shape) to ``(packed_codes, offset_fp16, scale_fp16)``.

    With ``with_fits=True`` a fourth tensor is returned: one bool per group, False where the
    group holds a NaN, an infinity or a value beyond the fp16 range, whose codes are not
    faithful (see the module docstring).
    """
    codes, offset, scale, fits = minmax_codes(x, bits, group_size, stochastic, generator)
    n = x.numel()
    if codes.numel() > n:
        codes[n:] = 0  # the padding, coded 0
    if with_fits:
        return pack_bits(codes, bits), offset, scale, fits
    return pack_bits(codes, bits), offset, scale


def minmax_codes(
    x: torch.Tensor,
    bits: int,
    group_size: int = 64,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, offset, scale, fits)`` of ``x``: one uint8 code per element, ``x`` padded to
    whole groups with its last value (the padding's codes are left as computed), before
    packing; :func:`quantize_minmax` packs them, :mod:`.batching` packs many tensors' at once.
    """
    levels = (1 << bits) - 1
    x = x.detach()
    n = x.numel()
    pad = (-n) % group_size
    if not pad and x.dim() and x.shape[-1] % group_size == 0 and x.stride(-1) == 1:
        # Groups lie along the last dimension: a view, whatever the other strides (q, k, v
        # sliced out of one qkv tensor), so no copy is made before the first pass.
        groups = x.unflatten(-1, (-1, group_size))
    else:
        flat = x.reshape(-1)
        if pad:
            flat = torch.cat([flat, flat[-1:].expand(pad)])
        groups = flat.view(-1, group_size)
    offset, scale, fits, offset_f = _group_stats(groups, bits)
    s = scale.float().unsqueeze(1)
    positive = s > 0
    # In-place chain: fresh full-size temporaries cost more than the arithmetic on CPU, and
    # on small tensors every op counts. The subtraction reads ``x`` in its own dtype and
    # writes float32 in logical order (exactly what converting first would give).
    v = torch.empty(groups.shape, dtype=torch.float32, device=x.device)
    torch.sub(groups, offset_f.view(*groups.shape[:-1], 1), out=v)
    v = v.view(-1, group_size)
    # A group whose scale is 0 divides by infinity: codes 0, even with stochastic rounding.
    v.div_(torch.where(positive, s, torch.inf))
    if stochastic:
        v.add_(torch.rand(v.shape, device=v.device, generator=generator))
    else:
        v.add_(0.5)
    # The uint8 conversion truncates, which is the floor of the clamped, non-negative values.
    return v.clamp_(0, levels).to(torch.uint8).reshape(-1), offset, scale, fits


def dequantize_minmax(
    packed: torch.Tensor,
    offset: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`quantize_minmax`: a flat tensor of ``n`` values in ``dtype``."""
    codes = unpack_levels(packed, bits, offset.numel() * group_size)
    out = codes.view(-1, group_size).mul_(scale.float().unsqueeze(1))
    out.add_(offset.float().unsqueeze(1))
    return out.reshape(-1)[:n].to(dtype)
