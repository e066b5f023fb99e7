"""Attach the side network (``modules=["side"]``): what it reads, what it outputs, and the
hooks that run the backbone without autograd and route its output past (or onto) the head.

The side network's output replaces the head's; with no head in the model (the user's own head
sits outside it) it replaces the model's own output: pooled features of the same width, or
the feature pyramid of the hierarchical side, which the user's head then reads.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from ..config import S2AConfig
from .families import Block
from .head import head_modules
from .hierarchical import (
    HierarchicalSide,
    Tap,
    map_stride,
    plausible_strides,
    prefix_tokens,
    token_grid,
)
from .holders import add_module, like_parameters
from .model_hooks import SideHooks
from .modules import SideNetwork

if TYPE_CHECKING:
    from .surgery import StructureState

SIDE_NAME = "s2a_side"
#: Modules that put a model's tokens in another order than row by row (timm's Hiera unrolls
#: them into mask units): its token blocks cannot be laid out on the image grid.
TOKEN_REORDERING = ("Unroll",)
#: Default side width cap: the side branch stays lite on wide CNNs (ResNet-50: 2048 channels).
SIDE_MAX_WIDTH = 128
#: Default side width floor: a last block of 6 channels at reduction 4 gave width 1, whose
#: normalization sent every input to the same output.
SIDE_MIN_WIDTH = 8


def apply_side(model: nn.Module, config: S2AConfig, state: StructureState) -> None:
    """Build the side network over ``state.blocks``, add it to ``model`` and hook it in,
    noting all of it in ``state`` for the undo."""
    replaced = head_modules(state.head)[0] if state.head is not None else model
    if isinstance(replaced, (nn.ModuleList, nn.ModuleDict)):
        # A container is never called: the side's hook on it never ran (CrossViT's two heads:
        # an error at the first forward that blamed F.linear or an early return).
        name = next(n for n, m in model.named_modules() if m is replaced)
        members = ",".join(f"{name}.{k}" for k in replaced._modules)
        raise ValueError(
            f"modules=['side'] stands in for the head's output, but the head {name!r} is an "
            f"{type(replaced).__name__}, whose members {type(model).__name__} calls one by "
            f"one: name them, S2AConfig(head={members!r})."
        )
    hierarchical = config.side == "hierarchical"
    outputs = _side_outputs(model, state, config)
    channels = [b.shape[-1] if b.layout in ("tokens", "nhwc") else b.shape[0] for b in state.blocks]
    width = config.side_width or min(
        SIDE_MAX_WIDTH, max(SIDE_MIN_WIDTH, channels[-1] // config.side_reduction)
    )
    side: nn.Module
    image: tuple[int, int] | None = None  # the pooled side needs no image size
    if hierarchical:
        image = _image_size(model, state.input_size)
        taps = _taps(model, state.blocks, channels, image)
        side = HierarchicalSide(taps, config.side_strides, config.side_reduction, width, outputs)
        state.side_rule = (
            f"hierarchical, width {width}, strides {tuple(config.side_strides)}, "
            f"blocks per level {side.per_level}, output "
            + (f"{outputs} classes" if outputs is not None else "the pyramid (a list of maps)")
        )
        guessed = {t.prefix for t in taps if t.layout == "tokens" and t.prefix}
        if guessed and prefix_tokens(model) is None:
            # Said: a class token at the end of the sequence would shift every cell by one.
            state.side_rule += (
                f", {max(guessed)} leading token(s) taken for class/register tokens and "
                f"left out ({type(model).__name__} names no num_prefix_tokens: set it if "
                "they are elsewhere)"
            )
    else:
        assert outputs is not None
        layouts = [b.layout for b in state.blocks]
        side = SideNetwork(channels, config.side_reduction, width, outputs, layouts)
        state.side_rule = f"pooled, width {width}, {len(channels)} blocks, {outputs} outputs"
    if config.side_merge == "add":
        state.side_rule += (
            ", added to the trained head's output"
            if state.head is not None
            else f", added to {type(model).__name__}'s output"
        )
    # Like the blocks' outputs in the dry forward, before frozen weights were cast: the head
    # cast to bf16 by frozen_dtype made a bf16 side (its updates rounded away), and a head
    # held in 4 bits has no weight left to be like.
    like = state.blocks[-1].like if state.blocks else like_parameters(replaced)
    add_module(state.added_modules, model, SIDE_NAME, side, like)
    state.parts.append((SIDE_NAME, "side"))
    hooks = SideHooks(
        type(model).__name__,
        side,
        image,
        config.side_merge == "add",
        state.input_size[0],
        replaces_model=replaced is model,
    )
    # Order matters: the backbone's no-grad region opens after the engine's hooks start (the
    # engine registers its pre-hook first) and closes before they end.
    state.hooks.append(model.register_forward_pre_hook(hooks.enter, with_kwargs=True))
    state.hooks.extend(
        b.module.register_forward_hook(partial(hooks.tap, b.name, i))
        for i, b in enumerate(state.blocks)
    )
    # A distilled model's heads (class and distillation) are all replaced, or all added to:
    # one left as it was would be averaged into the output, frozen.
    heads = head_modules(state.head) or [model]
    if config.side_merge == "add" and state.head is not None:
        # the head runs with autograd (it trains), on the backbone's no-grad features
        state.hooks.extend(h.register_forward_pre_hook(hooks.open_head) for h in heads)
    state.hooks.extend(h.register_forward_hook(hooks.read_side) for h in heads)
    # In a Sequential head whose last Linear is followed by layers without weights (a
    # LogSoftmax for an NLL loss), the side stands in for (or adds to) that Linear's output,
    # so they apply to the side's output too: replacing the whole head's output dropped
    # them (an NLL loss on raw scores ran to -25, then NaN). Other heads, whose order of
    # layers their registration need not tell, are replaced whole.
    tails = [_tail_linear(h) for h in heads] if state.head is not None else []
    state.hooks.extend(t.register_forward_hook(hooks.read_at_linear) for t in tails if t)
    if tails and tails[0] is not None:
        name = next(n for n, m in heads[0].named_modules() if m is tails[0])
        state.side_rule += f", at the head's last Linear ({name}; the layers after it follow)"
    state.hooks.append(model.register_forward_hook(hooks.exit, always_call=True))


def _tail_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear that a Sequential head (nested ones too) ends in, followed by layers
    without weights; None where nothing follows it or the head is no such chain."""
    module, follows = head, False
    while isinstance(module, nn.Sequential):
        weighted = [i for i, c in enumerate(module) if any(True for _ in c.parameters())]
        if not weighted:
            return None
        follows = follows or weighted[-1] < len(module) - 1
        module = module[weighted[-1]]
    return module if follows and isinstance(module, nn.Linear) else None


def _classes(head: nn.Module) -> int | None:
    """A head's outputs: its own ``out_features``, or its last Linear's (LeViT's NormLinear:
    a BatchNorm then a Linear). None where its last weight layer is no Linear: a dense head
    (Segformer's decode head ends in a 1x1 conv; its last Linear is an inner projection, and
    the side's (batch, classes) output would have replaced a (batch, classes, H, W) one)."""
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if layers and not isinstance(layers[-1], nn.Linear):
        return None
    return getattr(head, "out_features", None) or (layers[-1].out_features if layers else None)


def _check_other_heads(model: nn.Module, state: StructureState, config: S2AConfig) -> None:
    """Refuse a named head that is one of a distilled model's heads: the side would replace
    it alone, and the model would average the side's output with the other head's, frozen
    (a class-count change leaves that one at its random initialisation)."""
    get = getattr(model, "get_classifier", None)
    if config.head == "auto" or state.head is None or not callable(get):
        return
    found = get()
    if not isinstance(found, (tuple, list)):
        return
    others = [h for h in found if isinstance(h, nn.Module) and h is not state.head]
    if state.head in found and any(any(True for _ in h.parameters()) for h in others):
        raise ValueError(
            f"'side' with head={config.head!r}: {type(model).__name__}.get_classifier() gives "
            f"{len(found)} heads (a distilled model's class and distillation heads), and the "
            "model averages their outputs, so the others would stay in it, frozen. Leave "
            "head='auto': the side replaces (or, side_merge='add', adds to) every one."
        )


def _image_size(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, int]:
    if len(input_size) != 3:
        raise ValueError(
            f"side='hierarchical' lays {type(model).__name__}'s block outputs out on an image "
            f"grid, so it needs an image input (C, H, W), "
            f"but the input size is {input_size}. Pass S2AConfig(input_size=(C, H, W))."
        )
    return int(input_size[1]), int(input_size[2])


def _taps(
    model: nn.Module, blocks: list[Block], channels: list[int], image: tuple[int, int]
) -> list[Tap]:
    """Each block's layout as a map; token blocks get their patch stride and prefix tokens."""
    reordering = sorted({type(m).__name__ for m in model.modules()} & set(TOKEN_REORDERING))
    if reordering:
        raise ValueError(
            f"side='hierarchical' lays token blocks out row by row, but "
            f"{type(model).__name__} keeps its tokens in another order ({reordering[0]}: "
            "Hiera's mask units), so the side's maps would hold the right values in the "
            "wrong places. Use side='pooled' (its average reads no order), or modules="
            "['bias'] / ['bias', 'prompt']."
        )
    prefix = prefix_tokens(model)
    taps = []
    for block, c in zip(blocks, channels, strict=True):
        if block.layout == "tokens":
            stride, skip = token_grid(block.shape[0], image, prefix)
            taps.append(Tap("tokens", c, stride, skip))
        elif block.layout == "ncl":
            raise ValueError(
                f"side='hierarchical' lays block outputs out on an image grid, but block "
                f"{block.name!r} returns a 1-D signal (C, L) = {block.shape}; use side='pooled'."
            )
        else:
            grid = block.shape[1:3] if block.layout == "nchw" else block.shape[0:2]
            strides = map_stride(image[0], grid[0]), map_stride(image[1], grid[1])
            # Refused where no stride fits both sides (a few cells are ambiguous: a ResNet's
            # 2x2 last stage of a 40x48 input reads 16 or 32 by its height, 32 by its width)
            if not plausible_strides(image[0], grid[0]) & plausible_strides(image[1], grid[1]):
                raise ValueError(
                    f"side='hierarchical' lays block outputs out on the image grid, but block "
                    f"{block.name!r} gives a {grid[0]}x{grid[1]} map of a {image[0]}x"
                    f"{image[1]} input (strides {strides[0]} and {strides[1]}): no image map "
                    "(NesT's (blocks, tokens) layout), or one strided unevenly. Use "
                    "side='pooled', or name other blocks with S2AConfig(blocks=...)."
                )
            probe = (*image, *grid)
            taps.append(Tap(block.layout, c, stride=map_stride(image[0], grid[0]), probe=probe))
    return taps


def _side_outputs(model: nn.Module, state: StructureState, config: S2AConfig) -> int | None:
    """Width of the side network's output: the head's classes, the model's feature width
    (pooled side without a head), or None (hierarchical side without a head: the pyramid)."""
    hierarchical = config.side == "hierarchical"
    _check_other_heads(model, state, config)
    if state.head is not None:
        found = {_classes(h) for h in head_modules(state.head)}
        classes = found.pop() if len(found) == 1 else None
        if not isinstance(classes, int):
            raise ValueError(
                "'side' replaces the task head's output with the side network's, so it needs a "
                f"Linear head to read the number of outputs from; the head is a "
                f"{type(state.head).__name__}. Name a Linear head with S2AConfig(head='...'); "
                "for a dense head (segmentation), side='hierarchical' with head=None gives the "
                "feature pyramid to train your own head on."
            )
        return classes
    if hierarchical:
        if config.side_merge == "add":
            raise ValueError(
                f"side_merge='add' adds the side network's output to the head's, but "
                f"{type(model).__name__} has no head here and the hierarchical side's output "
                "without one is the feature pyramid, which has no model output to add to. "
                "Name a Linear head with S2AConfig(head='...'), or use side_merge='replace'."
            )
        return None
    shape = state.output_shape
    if shape is None or len(shape) != 1:
        got = (
            "not a tensor (a tuple, dict or model-output object)"
            if shape is None
            else (f"(batch, {', '.join(map(str, shape))})")
        )
        raise ValueError(
            f"'side' without a head replaces {type(model).__name__}'s own output with the side "
            f"network's, which must then be (batch, features); it is {got}. Build the "
            "backbone without its pooling removed (e.g. timm num_classes=0 gives pooled "
            "features), name a Linear head inside it with S2AConfig(head='...'), or use "
            "side='hierarchical', whose output without a head is the feature pyramid."
        )
    return shape[0]
