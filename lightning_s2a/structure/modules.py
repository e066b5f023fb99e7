"""The trainable activation modules: a low-rank prompt per block, and a lite side network.

Both are chosen because their backward needs (almost) no stored activation:

* ``LowRankPrompt`` adds ``A @ B`` to a block's output. The term does not depend on the input,
  so its gradient is a sum of the incoming gradient, and the addition saves nothing.
* ``SideNetwork`` reads pooled, r-times-narrower copies of the block outputs of a backbone
  that runs without autograd; only its own small vectors are kept for backward. Its
  hierarchical sibling, which keeps the spatial layout, is in ``hierarchical.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _spatial_channels(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if layout == "tokens":
        return shape[0], shape[1]
    if layout == "ncl":
        return shape[1], shape[0]
    if layout == "nhwc":
        return shape[0] * shape[1], shape[2]
    return shape[1] * shape[2], shape[0]  # nchw


class LowRankPrompt(nn.Module):
    """``h' = h + A @ B`` on one block's output; ``B`` starts at zero, so the model is unchanged.

    ``A`` is (positions x rank) and ``B`` is (rank x channels), where positions are tokens or
    feature-map pixels or signal steps, for any of the layouts (B, N, D), (B, H, W, C),
    (B, C, H, W) and (B, C, L).
    """

    def __init__(self, shape: tuple[int, ...], layout: str, rank: int) -> None:
        super().__init__()
        self.shape, self.layout = tuple(shape), layout
        positions, channels = _spatial_channels(self.shape, layout)
        self.A = nn.Parameter(torch.randn(positions, rank) / math.sqrt(rank))
        self.B = nn.Parameter(torch.zeros(rank, channels))

    def prompt(self) -> torch.Tensor:
        """The additive term, shaped like one sample of the block output."""
        p = self.A @ self.B
        if self.layout == "nchw":
            c, h, w = self.shape
            return p.t().reshape(c, h, w)
        if self.layout == "ncl":
            return p.t()
        return p.reshape(self.shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.is_nested:
            # nn.TransformerEncoder packs its input into a nested tensor in eval mode without
            # autograd when given a padding mask (enable_nested_tensor=True): its rows have
            # lost their positions. PyTorch said "NestedTensorImpl doesn't support sizes".
            raise RuntimeError(
                "a prompt got a nested tensor: nn.TransformerEncoder packs padded sequences "
                "into one when it runs without autograd in eval mode with "
                "src_key_padding_mask, and a prompt on fixed positions cannot be added to "
                "it. Build the encoder with nn.TransformerEncoder(..., "
                "enable_nested_tensor=False) (its outputs at padded positions are then "
                "computed, not zeros, as in training)."
            )
        if tuple(h.shape[1:]) != self.shape:
            raise RuntimeError(
                f"prompt sized for block outputs {self.shape} got {tuple(h.shape[1:])}: the "
                "input resolution changed (apply S2A with S2AConfig(input_size=...) for it), "
                "or the model drops tokens in training (timm's patch_drop_rate), which a "
                "prompt on fixed positions cannot follow: build it with patch_drop_rate=0."
            )
        return h + self.prompt().to(h.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, layout={self.layout}, rank={self.B.shape[0]}"


def average_channel_groups(x: torch.Tensor, reduction: int, dim: int) -> torch.Tensor:
    """Average groups of ``reduction`` neighbouring channels along ``dim`` (parameter-free);
    a channel count that ``reduction`` does not divide is pooled adaptively."""
    c = x.shape[dim]
    out = max(1, c // reduction)
    if c == out * reduction:
        return x.unflatten(dim, (out, reduction)).mean(dim + 1 if dim >= 0 else dim)
    moved = x.movedim(dim, -1)
    pooled = F.adaptive_avg_pool1d(moved.reshape(-1, 1, c), out)
    return pooled.reshape(*moved.shape[:-1], out).movedim(-1, dim)


def channel_average_pool(h: torch.Tensor, layout: str, reduction: int) -> torch.Tensor:
    """Parameter-free tap: average over positions, then over groups of ``reduction`` channels."""
    if layout == "tokens":
        v = h.mean(dim=1)
    elif layout == "ncl":
        v = h.mean(dim=2)
    elif layout == "nhwc":
        v = h.mean(dim=(1, 2))
    else:
        v = h.mean(dim=(2, 3))
    return average_channel_groups(v, reduction, -1)


class SideNetwork(nn.Module):
    """A lite side branch: one projection per tapped block, summed, normalised, classified.

    Taps are the block outputs pooled by :func:`channel_average_pool`; the backbone itself
    runs without autograd, so it keeps nothing for backward.
    """

    def __init__(
        self,
        tap_channels: list[int],
        reduction: int,
        width: int,
        num_classes: int,
        layouts: list[str],
    ) -> None:
        super().__init__()
        if len(layouts) != len(tap_channels):
            raise ValueError(f"{len(tap_channels)} taps but {len(layouts)} layouts.")
        self.reduction = reduction
        self.layouts = tuple(layouts)
        self.proj = nn.ModuleList(nn.Linear(max(1, c // reduction), width) for c in tap_channels)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def prepare(self, index: int, output: torch.Tensor, image: tuple[int, int]) -> torch.Tensor:
        """Parameter-free part of tap ``index``, run with the backbone (no autograd)."""
        return channel_average_pool(output, self.layouts[index], self.reduction)

    def forward(
        self, taps: list[torch.Tensor], image: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if len(taps) != len(self.proj):
            raise RuntimeError(f"side network expects {len(self.proj)} taps, got {len(taps)}.")
        s = 0
        for proj, z in zip(self.proj, taps, strict=True):
            s = s + F.gelu(proj(z.to(proj.weight.dtype)))
        return self.head(self.norm(s))
