"""Block-output layouts: tokens (B, N, D), channels-first (B, C, H, W) or channels-last
(B, H, W, C) maps, 1-D channels-first signals (B, C, L), read from the output's shape (and
the block's layers) in the dry forward, and settled from the model's other blocks (or a
second forward) where a shape reads both ways."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .families import Block


def layout_of(
    shape: torch.Size,
    declared: str,
    hw: tuple[int, int] | None = None,
    block: nn.Module | None = None,
) -> str:
    """The layout of a block's output: declared, or read from its shape.

    A 3-D output is (B, N, D) tokens or (B, C, L) channels first: the dimension of the
    block's last weight layer's width where only one matches it, else (B, C, L) where that
    layer is a 1-D convolution (an audio or signal model; read as tokens, a side network
    averaged over its channels and its width followed the sequence length).

    A 4-D map is (B, C, H, W) or (B, H, W, C) (Swin-V2, TinyViT, MambaOut, Sequencer,
    torchvision's Swin): channels last where only its middle pair is shaped like the input
    ``hw``. Taken for channels first, a channels-last map gave a side network of width 1.
    Where both pairs are (C == H == W) the answer is :data:`AMBIGUOUS`, settled by the
    model's other blocks (:func:`settle_layouts`).
    """
    if declared != "auto":
        rank = 3 if declared in ("tokens", "ncl") else 4
        if len(shape) != rank:
            raise ValueError(
                f"block_layout={declared!r} describes {rank}-D block outputs (batch "
                f"included), but a block returns shape {tuple(shape)}; name the layout of "
                "that shape: 'tokens' or 'ncl' for 3-D, 'nchw' or 'nhwc' for 4-D."
            )
        return declared
    if len(shape) == 3:
        layers = [m for m in (block.modules() if block is not None else ()) if _weighted(m)]
        if layers:
            # The last weight layer's width names the channel dimension where only one of
            # the two matches it: a FastSpeech block (tokens, Conv1d feed-forward applied
            # transposed) and a Vocos block (a (B, C, L) signal, Linear pointwise layers)
            # were read by the layer's type alone, their side averaging channels.
            width = _out_width(layers[-1])
            if shape[-1] == width != shape[1]:
                return "tokens"
            if shape[1] == width != shape[-1]:
                return "ncl"
        return "ncl" if layers and isinstance(layers[-1], nn.Conv1d) else "tokens"
    if len(shape) == 4:
        if hw is None:
            return "nchw"
        first, last = _spatial(shape[2:], hw), _spatial(shape[1:3], hw)
        if last and not first:
            return "nhwc"
        if last and first:
            return AMBIGUOUS
        # Neither pair fits: channels last where the block ends in a Linear of the last
        # dimension's width (NesT's (B, blocks, tokens, C): read channels first, the side
        # network was 1 wide and gave every image the same output); channels first
        # otherwise, PyTorch's convention (MobileViT-V2's (B, C, patch, patches) blocks).
        layers = [m for m in (block.modules() if block is not None else ()) if _weighted(m)]
        last_linear = bool(layers) and isinstance(layers[-1], nn.Linear)
        if last_linear and layers[-1].out_features == shape[-1]:
            return "nhwc"
        return "nchw"
    video = " (a video model's (B, C, T, H, W))" if len(shape) == 5 else ""
    raise ValueError(
        f"cannot place a prompt or the side network's tap on a block output of shape "
        f"{tuple(shape)}{video}: both read (B, N, D) tokens, (B, C, L) signals or 4-D feature "
        "maps. Use modules=['bias'] (any rank), or name blocks whose outputs have one of "
        "those shapes with S2AConfig(blocks=...)."
    )


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _weighted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


#: A 4-D block output whose shape reads both ways (C == H == W at the probed size).
AMBIGUOUS = "nchw or nhwc"


def settle_layouts(
    blocks: list[Block], model: nn.Module, input_size: tuple[int, ...]
) -> list[Block]:
    """Blocks whose layout was :data:`AMBIGUOUS` take the one layout of the model's other
    4-D blocks of their class, else of all its 4-D blocks; with none to agree with, a second
    dry forward at twice the size tells the spatial dimensions (they grow, channels do not).
    torchvision's swin_t at 384 px has a 96-channel 96x96 first stage: read channels first,
    its side averaged image rows. What nothing settles is an error."""
    known = [b for b in blocks if b.layout in ("nchw", "nhwc")]
    unsettled = [b for b in blocks if b.layout == AMBIGUOUS]
    larger = None
    if unsettled and not known:
        larger = _shapes_at(model, unsettled, (*input_size[:-2], *(2 * v for v in input_size[-2:])))
    settled = []
    for b in blocks:
        if b.layout == AMBIGUOUS:
            same_class = {k.layout for k in known if type(k.module) is type(b.module)}
            layouts = same_class or {k.layout for k in known}
            if larger is not None and b.name in larger:
                layouts = {_grown_layout(b.shape, larger[b.name])} - {None}
            if len(layouts) != 1:
                raise ValueError(
                    f"block {b.name!r} outputs shape {(1, *b.shape)}, which reads as channels "
                    "first or channels last alike at this input size, and neither the other "
                    "blocks nor a forward at twice the size settle it. Say which: "
                    "S2AConfig(block_layout='nchw') or 'nhwc', or apply S2A at another "
                    "input_size."
                )
            b = dataclasses.replace(b, layout=layouts.pop())
        settled.append(b)
    return settled


def _grown_layout(shape: tuple[int, ...], larger: tuple[int, ...]) -> str | None:
    """The layout in which only the spatial pair of a (C, H, W)-or-(H, W, C) shape grew."""
    if len(larger) != 3:
        return None
    if larger[0] == shape[0] and larger[1:] != shape[1:]:
        return "nchw"
    if larger[2] == shape[2] and larger[:2] != shape[:2]:
        return "nhwc"
    return None


#: Samples in a dry forward: two, so that the batch dimension of each output shows (with one,
#: a sequence-first block's (N, 1, D) read as one sample of N tokens).
DRY_BATCH = 2


@torch.no_grad()
def dry_forward(
    model: nn.Module,
    blocks: list[Block],
    input_size: tuple[int, ...],
    calls: dict[str, int] | None = None,
) -> tuple[dict[str, object], object]:
    """One eval forward of :data:`DRY_BATCH` zero samples of ``input_size`` (C, H, W): each
    block's first output and the model's (and into ``calls``, how often each block ran).
    Every module's mode is put back; a failing forward raises."""
    outputs: dict[str, object] = {}
    counts = {} if calls is None else calls

    def recorder(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            outputs.setdefault(name, output)
            counts[name] = counts.get(name, 0) + 1

        return hook

    modes = {m: m.training for m in model.modules()}  # each module's own, to put back as is
    handles = [b.module.register_forward_hook(recorder(b.name)) for b in blocks]
    try:
        param = next(model.parameters())
        model.eval()
        out = model(torch.zeros(DRY_BATCH, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for module, training in modes.items():
            module.training = training
        for h in handles:
            h.remove()
    return outputs, out


class _Reads(torch.overrides.TorchFunctionMode):
    """Notes the id of every tensor passed to a torch function (in lists and dicts too)."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))  # torch.cat([q, v]) too
        self.read.update(id(a) for a in leaves if isinstance(a, torch.Tensor))
        return func(*args, **kwargs)


def tensors_read(model: nn.Module, input_size: tuple[int, ...]) -> set[int] | None:
    """Ids of the tensors (parameters included) that one dry forward at ``input_size`` passes
    to torch functions, or None where the model does not take that size."""
    reads = _Reads()
    try:
        with torch.no_grad(), reads:
            dry_forward(model, [], input_size)
    except Exception:
        return None
    return reads.read


def _shapes_at(
    model: nn.Module, blocks: list[Block], input_size: tuple[int, ...]
) -> dict[str, tuple[int, ...]] | None:
    """Each block's output shape (without the batch) in an eval forward at ``input_size``,
    or None where the model does not take that size."""
    try:
        outputs, _ = dry_forward(model, blocks, input_size)
    except Exception:
        return None
    return {n: tuple(o.shape[1:]) for n, o in outputs.items() if isinstance(o, torch.Tensor)}


def _spatial(pair: Sequence[int], hw: tuple[int, int]) -> bool:
    """True if ``pair`` could be the (H, W) of a feature map of an ``hw`` input: no larger,
    and the input's aspect ratio up to one cell of rounding (``|H w - W h| <= max(H, W)``)."""
    h, w = int(pair[0]), int(pair[1])
    if not (0 < h <= hw[0] and 0 < w <= hw[1]):
        return False
    return abs(hw[0] * w - hw[1] * h) <= max(hw)
