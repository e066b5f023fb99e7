"""The hierarchical side network (``S2AConfig(side="hierarchical")``), after HST.

The pooled side (:class:`~lightning_s2a.structure.modules.SideNetwork`) averages each block
output over its positions, which suits classification only. This one keeps the spatial layout:
every tap becomes a feature map, the taps are shared out over pyramid levels (earlier blocks to
finer levels, for example strides 8, 16 and 32 of the input), and each level mixes what it got
with the level above it. Its output is the pyramid, or class scores pooled from it.

The backbone still runs without autograd. What a tap needs before training starts (token grid,
channel averaging, downsampling to its level) is done there too, so only the reduced maps the
side network's own layers read are kept for backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modules import average_channel_groups

#: How many leading non-patch tokens (class, distillation, register tokens) are tried when the
#: model does not say (timm's ``num_prefix_tokens``).
MAX_PREFIX_TOKENS = 16


class FeaturePyramid(list):
    """The hierarchical side's output without a head: its maps, (B, C, H, W) each, finest
    first. A list like any other to a dense head (indexing, iterating, ``torch.cat``), but
    handed to an operator where a tensor goes (a classifier's ``nn.Linear`` outside the
    backbone), or asked for a tensor's method, it says what it is and what to use instead
    of torch's bare TypeError."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        raise TypeError(_misread(f"{getattr(func, '__name__', func)}()"))

    def __getattr__(self, name: str) -> object:
        if not name.startswith("__") and hasattr(torch.Tensor, name):
            raise AttributeError(_misread(f".{name}"))
        raise AttributeError(f"'FeaturePyramid' object has no attribute {name!r}")


# torch's pytree (DDP's output handling, torch.compile) flattens it as the list it is.
torch.utils._pytree.register_pytree_node(
    FeaturePyramid,
    lambda pyramid: (list(pyramid), None),
    lambda maps, _: FeaturePyramid(maps),
    serialized_type_name="lightning_s2a.FeaturePyramid",
)


def _misread(what: str) -> str:
    return (
        f"{what} got S2A's feature pyramid where it takes a tensor: modules=['side'] with "
        "side='hierarchical' and no head in the backbone outputs a list of maps (finest "
        "first) for a dense head. For a classifier outside the backbone use side='pooled', "
        "or give it pooled maps: torch.cat([f.mean(dim=(2, 3)) for f in pyramid], dim=1)."
    )


@dataclass(frozen=True)
class Tap:
    """How to turn one block's output into a (B, C, H, W) map: its layout, its stride against
    the input, and for tokens the number of leading non-patch tokens."""

    layout: str
    channels: int
    stride: int = 0
    prefix: int = 0
    #: For maps: the probe's input (H, W) and the map's (H, W) then, which bound its stride.
    probe: tuple[int, ...] = ()


def prefix_tokens(model: nn.Module) -> int | None:
    """The model's own count of leading (class, register) tokens, timm's
    ``num_prefix_tokens``; None where it names none (the count is then searched)."""
    return next(
        (
            m.num_prefix_tokens
            for m in model.modules()
            if isinstance(getattr(m, "num_prefix_tokens", None), int)
        ),
        None,
    )


def token_grid(tokens: int, image: tuple[int, int], prefix: int | None) -> tuple[int, int]:
    """(patch stride, prefix tokens) that lay ``tokens`` out as a grid over an ``image`` (H, W).

    The model's own count ``prefix`` (timm's ``num_prefix_tokens``) is tried first, then the
    fewest leading tokens (up to :data:`MAX_PREFIX_TOKENS`) that leave a grid: for each count,
    a whole grid ``(H // s) x (W // s)`` at a stride that divides the image first, then grids
    that do not cut the image evenly: cut (floor) or padded (ceil, timm's
    ``dynamic_img_pad``), powers of two first (72 px padded to a 5x5 grid of 16-pixel patches,
    not 14). Fewer leading tokens come first: trying every count at dividing strides first
    took 11 of a 6x6 grid's 36 tokens (16-pixel patches of 100 px, no class token) for class
    tokens and laid the other 25 out as a 5x5 grid of 20-pixel patches, silently.
    """
    h, w = image
    # The model's own count first; then the search (CaiT says 1, but its main blocks carry
    # no class token: that is added for its class-attention blocks only).
    strides = range(1, min(h, w) + 1)
    uneven = sorted(strides, key=lambda s: (s & (s - 1) != 0, s))
    searched = range(MAX_PREFIX_TOKENS + 1)
    for p in ([] if prefix is None else [prefix]) + list(searched):
        for s in strides:  # a stride that divides the image first (16 before 15 at 224)
            if not (h % s or w % s) and (h // s) * (w // s) == tokens - p:
                return s, p
        for s in uneven:
            if tokens - p in (gh * gw for gh, gw in patch_grids(image, s)):
                return s, p
    tried = f"0..{MAX_PREFIX_TOKENS}"
    raise ValueError(
        f"side='hierarchical' lays token blocks out on the image grid, but {tokens} tokens do "
        f"not make a (H/s) x (W/s) grid of a {h}x{w} input after any of {tried} leading "
        "tokens. Pass the "
        "size your data have with S2AConfig(input_size=(C, H, W)), or use side='pooled'."
    )


def patch_grids(image: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """The patch grid of an (H, W) image at ``stride``: cut (floor), then padded (ceil,
    timm's ``dynamic_img_pad``)."""
    h, w = image
    return [(h // stride, w // stride), (-(-h // stride), -(-w // stride))]


def plausible_strides(size: int, cells: int) -> set[int]:
    """Every stride that gives ``cells`` map cells of ``size`` pixels within the rounding
    of each stage (a 2-cell map of 40 pixels: 16 or 32), and the ratio itself."""
    powers = {2**k for k in range(size.bit_length()) if abs(cells - size / 2**k) < 1}
    return powers | {max(1, round(size / cells))}


def map_stride(size: int, cells: int) -> int:
    """A feature map's stride from one probe: ``size`` input pixels over ``cells`` map cells.

    The ratio at one size is blurred by rounding (ResNet's stride-16 stage at 100 px: 7
    cells, 14.3 pixels each): a power of two whose exact cell count lies within one cell of
    ``cells`` (rounding up or down at each stage) is the stride, so the map checks at other
    sizes hold (at 224 px that stage has 14 cells, 224 / 16). Other strides (ConvMixer's and
    Sequencer's patches of 7 or 14) are the ratio itself."""
    powers = [2**k for k in range(size.bit_length())]
    near = [s for s in powers if abs(cells - size / s) < 1]
    if near:
        return min(near, key=lambda s: abs(cells - size / s))
    return max(1, round(size / cells))


@functools.lru_cache(maxsize=4096)  # per forward and tap: the same few sizes every step
def _fits_probe(cells: tuple[int, ...], image: tuple[int, int], tap: Tap) -> bool:
    """Whether a map of ``cells`` can come from an ``image`` input: for some whole stride
    that gives the probe's map from the probe's input (rounded, or short of a few strides'
    worth of pixels), the cells this map has beyond the probe's are the pixels this input has
    beyond the probe's, over that stride, within the rounding of the two (each dimension).

    Convolutions without padding (Inception-v3's stem) lose pixels at each stage: 299 pixels
    give 147 cells at stride 2, which neither rounding of 299 / 2 is (that map was refused at
    the very size it was probed at). No single stride is guessed: 13 cells of 97 pixels are a
    stride of 7 or of 8 alike, and either must do where the other fails."""
    if not tap.probe:
        expected = (image[0] / tap.stride, image[1] / tap.stride)
        return all(abs(n - e) < 1 for n, e in zip(cells, expected, strict=True))
    probed, probed_cells = tap.probe[:2], tap.probe[2:]
    return any(
        all(
            -s < p - c * s < 4 * s and abs((n - c) * s - (size - p)) < 2 * s
            for n, size, p, c in zip(cells, image, probed, probed_cells, strict=True)
        )
        for s in range(1, max(probed) + 1)
    )


def as_map(h: torch.Tensor, tap: Tap, image: tuple[int, int]) -> torch.Tensor:
    """A block output as a (B, C, H, W) map, checked against the input size."""
    if tap.layout in ("nchw", "nhwc"):
        x = h if tap.layout == "nchw" else h.permute(0, 3, 1, 2)
        if not _fits_probe(tuple(x.shape[-2:]), image, tap):
            raise RuntimeError(
                f"side='hierarchical' took the input size {image[0]}x{image[1]} from the model's "
                f"first 4-D argument, but a block at stride {tap.stride} gave a "
                f"{x.shape[-2]}x{x.shape[-1]} map. Pass the image batch (B, C, H, W) as the "
                "model's first 4-D argument."
            )
        return x
    h_img, w_img, s = image[0], image[1], tap.stride
    # A patch grid cuts the image (floor) or pads it (ceil: timm's dynamic_img_pad).
    grids = patch_grids(image, s)
    found = [g for g in grids if g[0] * g[1] + tap.prefix == h.shape[1]]
    if not found:
        gh, gw = grids[0]
        raise RuntimeError(
            f"side='hierarchical' expected {gh}x{gw} patch tokens after {tap.prefix} leading "
            f"ones for a {h_img}x{w_img} input, got {h.shape[1]} tokens. Call the model "
            "with an image tensor (B, C, H, W) as its first argument, or apply S2A with "
            "S2AConfig(input_size=...) for the size your data have. Patch dropout in "
            "training (timm's patch_drop_rate) drops tokens too: set it to 0 for this side."
        )
    gh, gw = found[0]
    return h[:, tap.prefix :].transpose(1, 2).reshape(h.shape[0], h.shape[2], gh, gw)


def level_sizes(image: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Each pyramid level's (H, W): the input's size over the level's stride, rounded up."""
    return [(math.ceil(image[0] / s), math.ceil(image[1] / s)) for s in strides]


class LevelBlock(nn.Module):
    """One pyramid level's mixing: ``x + pw(gelu(dw(norm(x))))``, a 3x3 depthwise then 1x1
    convolution; light, and it spreads information across neighbouring positions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(F.gelu(self.dw(self.norm(x))))


class HierarchicalSide(nn.Module):
    """A side network that keeps the taps' spatial layout and builds a feature pyramid.

    Tap ``i`` of ``n`` feeds level ``i * L // n`` of ``L = len(strides)``: a 1x1 projection
    to ``width`` channels, resized to the level. Each level adds the level above it (average
    pooled) and runs a :class:`LevelBlock`. With ``num_classes`` the levels are averaged over
    positions, concatenated and classified; without, the output is the pyramid: one
    (B, width, H / stride, W / stride) map per stride.
    """

    def __init__(
        self,
        taps: Sequence[Tap],
        strides: Sequence[int],
        reduction: int,
        width: int,
        num_classes: int | None,
    ) -> None:
        super().__init__()
        self.taps, self.strides, self.reduction = tuple(taps), tuple(strides), reduction
        self.level_of = tuple(i * len(strides) // len(taps) for i in range(len(taps)))
        self.proj = nn.ModuleList(
            nn.Conv2d(max(1, t.channels // reduction), width, 1) for t in self.taps
        )
        self.levels = nn.ModuleList(LevelBlock(width) for _ in strides)
        self.head: nn.Module | None = None
        if num_classes is not None:
            self.head = nn.Sequential(
                nn.LayerNorm(width * len(strides)), nn.Linear(width * len(strides), num_classes)
            )

    def prepare(self, index: int, output: torch.Tensor, image: tuple[int, int]) -> torch.Tensor:
        """Parameter-free part of tap ``index``, run with the backbone (no autograd): the map,
        shrunk to its level where it is finer, with its channels averaged."""
        x = as_map(output, self.taps[index], image)
        size = level_sizes(image, self.strides)[self.level_of[index]]
        if x.shape[-2] > size[0] or x.shape[-1] > size[1]:
            x = F.adaptive_avg_pool2d(x, size)
        return average_channel_groups(x, self.reduction, 1)

    def features(self, taps: Sequence[torch.Tensor], image: tuple[int, int]) -> FeaturePyramid:
        """The pyramid, finest level first."""
        if len(taps) != len(self.proj):
            raise RuntimeError(f"side network expects {len(self.proj)} taps, got {len(taps)}.")
        dtype = self.proj[0].weight.dtype
        pyramid = FeaturePyramid()
        s: torch.Tensor | None = None
        for level, (size, block) in enumerate(
            zip(level_sizes(image, self.strides), self.levels, strict=True)
        ):
            if s is not None:
                s = F.adaptive_avg_pool2d(s, size)
            for i in (i for i, lv in enumerate(self.level_of) if lv == level):
                z = self.proj[i](taps[i].to(dtype))
                if z.shape[-2:] != size:
                    z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
                s = z if s is None else s + z
            assert s is not None  # tap 0 always feeds level 0
            s = block(s)
            pyramid.append(s)
        return pyramid

    def forward(
        self, taps: Sequence[torch.Tensor], image: tuple[int, int]
    ) -> torch.Tensor | list[torch.Tensor]:
        pyramid = self.features(taps, image)
        if self.head is None:
            return pyramid
        return self.head(torch.cat([f.mean(dim=(2, 3)) for f in pyramid], dim=1))

    @property
    def per_level(self) -> list[int]:
        """How many taps feed each level."""
        return [self.level_of.count(i) for i in range(len(self.strides))]

    def extra_repr(self) -> str:
        return f"strides={self.strides}, taps per level={self.per_level}"
