"""Per-group asymmetric min-max quantization: the generic quantizer for saved tensors.

Groups are ``group_size`` consecutive elements of the flattened (contiguous) tensor, so for a
last dimension that is a multiple of the group size each group lies along the last dimension.
Each group stores an fp16 offset (its minimum) and an fp16 scale. Codes are rounded to nearest
(``floor(v + 0.5)``) or stochastically, and packed with :mod:`.bitpack`.

This pure-PyTorch version is the reference; the Triton kernels must match it bit for bit.
"""

from __future__ import annotations

import torch

from .bitpack import pack_bits, unpack_lookup

FP16_MAX = 65504.0


def group_stats(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fp16 ``(offset, scale)`` for each row of ``groups`` (float32, shape (G, S))."""
    levels = (1 << bits) - 1
    lo = groups.amin(dim=1).clamp(-FP16_MAX, FP16_MAX)
    hi = groups.amax(dim=1).clamp(-FP16_MAX, FP16_MAX)
    offset = lo.to(torch.float16)
    scale = ((hi - offset.float()) / levels).clamp(0.0, FP16_MAX).to(torch.float16)
    return offset, scale


def quantize_minmax(
    x: torch.Tensor,
    bits: int,
    group_size: int = 64,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any float dtype/shape) to ``(packed_codes, offset_fp16, scale_fp16)``."""
    levels = (1 << bits) - 1
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    groups = flat.view(-1, group_size)
    offset, scale = group_stats(groups, bits)
    s = scale.float().unsqueeze(1)
    # In-place chain: fresh full-size temporaries cost more than the arithmetic on CPU.
    v = groups - offset.float().unsqueeze(1)
    v.div_(torch.where(s > 0, s, torch.ones_like(s)))
    if stochastic:
        v.add_(torch.rand(v.shape, device=v.device, generator=generator))
    else:
        v.add_(0.5)
    v.floor_().clamp_(0, levels).mul_(s > 0)  # a constant group (scale 0) codes as 0
    codes = v.to(torch.uint8).reshape(-1)
    if pad:
        codes[n:] = 0
    return pack_bits(codes, bits), offset, scale


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
    levels = torch.arange(1 << bits, dtype=torch.float32, device=packed.device)
    codes = unpack_lookup(packed, bits, offset.numel() * group_size, levels)
    out = codes.view(-1, group_size).mul_(scale.float().unsqueeze(1))
    out.add_(offset.float().unsqueeze(1))
    return out.reshape(-1)[:n].to(dtype)
