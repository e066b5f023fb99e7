"""Apply the structural modules to a model, and undo them exactly.

``apply_structure`` freezes the backbone, turns on the chosen modules (bias, prompt, side),
keeps the task head trainable and fixes BatchNorm's mode. Every change is recorded in a
:class:`StructureState`, so ``undo_structure`` puts back the original modules and flags.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import FOUR_BIT_DTYPES, S2AConfig, check_composition
from .families import Block, block_output_shapes, default_input_size, find_blocks
from .frozen_weights import cast_frozen, hold_frozen
from .head import find_head, head_modules, is_bias, parallel_heads
from .hierarchical import HierarchicalSide, Tap, map_stride, token_grid
from .holders import home
from .layouts import tensors_read
from .model_hooks import (
    HeldStatistics,
    SideHooks,
    forget_statistics,
    release_eval,
)
from .modules import LowRankPrompt, SideNetwork

PROMPT_NAME = "s2a_prompt"
SIDE_NAME = "s2a_side"
#: Default side width cap: the side branch stays lite on wide CNNs (ResNet-50: 2048 channels).
SIDE_MAX_WIDTH = 128
#: Also the layers whose weight ``frozen_dtype="nf4"`` holds in 4 bits. A subclass that
#: computes with its weight in its own way (timm's StdConv2d standardizes it first) reads the
#: dequantized values; the engine then keeps what it derives exact, whole until backward.
_CONVS_AND_LINEARS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class StructureState:
    """Everything ``apply_structure`` changed, for ``undo_structure``; and the module parts."""

    flags: dict[str, bool]
    head: nn.Module | None = None
    blocks: list[Block] = field(default_factory=list)
    added_biases: list[nn.Module] = field(default_factory=list)
    added_modules: list[tuple[nn.Module, str]] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    batch_norms: list[nn.Module] = field(default_factory=list)
    #: Original values of parameters cast by ``frozen_dtype`` (on CPU), for an exact undo.
    cast_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    #: (module-name prefix, part label) for per-part accounting and the summary table.
    parts: list[tuple[str, str]] = field(default_factory=list)
    #: The model's output shape without the batch dimension, when prompt/side measured it.
    output_shape: tuple[int, ...] | None = None
    #: How the blocks were found (the summary prints it): family table, named, or repeated.
    block_rule: str = ""
    #: The (C, H, W) prompt and side were sized for.
    input_size: tuple[int, ...] = ()
    #: Modules whose forward runs their children, found by the dry forward: they hold no
    #: added module (see ``holders.home``).
    runners: set[str] = field(default_factory=set)
    #: What the side network is (the summary prints it).
    side_rule: str = ""
    #: (owner module, attribute, value before, value written) for what ``load_adapter``
    #: wrote over when it applied S2A: ``undo_structure`` puts back the values that still
    #: are what the adapter wrote (what trained since stays), so another task's adapter
    #: starts on the backbone as built.
    overwritten: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = field(
        default_factory=list
    )

    @property
    def adds_weights(self) -> bool:
        """Whether S2A added parameters (modules, biases) that the plain model lacks."""
        return bool(self.added_modules or self.added_biases)


def apply_structure(model: nn.Module, config: S2AConfig) -> StructureState:
    """Freeze ``model`` and inject the config's structural modules, in place."""
    modules = tuple(config.modules)
    check_composition(modules)
    head = find_head(model, config.head)
    blocks: list[Block] = []
    output_shape: tuple[int, ...] | None = None
    block_rule = ""
    size: tuple[int, ...] = ()
    runners: set[str] = set()  # modules whose forward runs their children
    if "prompt" in modules or "side" in modules:
        found, _, block_rule = find_blocks(model, config.blocks, config.block_layout)
        size = default_input_size(model, config.input_size)
        # The dry forward that sizes the blocks also probes where added modules would live;
        # a module found to run its children passes its prompt to its parent, tried again.
        while True:
            owners = (
                {home(model, "", SIDE_NAME, "side", runners)[1]} if "side" in modules else set()
            )
            if "prompt" in modules:
                owners |= {home(model, b.name, PROMPT_NAME, "prompt", runners)[1] for b in found}
            blocks, output_shape, ran = block_output_shapes(
                model, found, size, sorted(owners), side="side" in modules
            )
            if not ran:
                break
            runners |= ran
    state = StructureState(flags={n: p.requires_grad for n, p in model.named_parameters()})
    state.runners = runners
    state.head, state.blocks, state.output_shape = head, blocks, output_shape
    state.input_size = size
    state.block_rule = block_rule if blocks else ""
    try:
        _apply(model, config, state, modules)
    except Exception:
        undo_structure(model, state)
        raise
    if not any(p.requires_grad for p in model.parameters()):
        undo_structure(model, state)
        raise ValueError(
            f"nothing left to train: {type(model).__name__} has no bias parameters and no head "
            f"(head={config.head!r}). Name a head with S2AConfig(head='...')."
        )
    return state


def _check_parallel_heads(model: nn.Module, state: StructureState, config: S2AConfig) -> None:
    """A named Linear head with a sibling of its shape (Hugging Face's DeiT-with-teacher
    averages a class and a distillation head): naming one leaves the other frozen, and half
    of each prediction comes from it. An error for 'side' (which replaces the named one
    alone), said otherwise."""
    others = parallel_heads(model, state.head) if state.head is not None else []
    if not others or config.head in (None, "auto") or "," in str(config.head):
        return
    get = getattr(model, "get_classifier", None)
    found = get() if callable(get) else None
    if isinstance(found, (tuple, list)) and any(h is state.head for h in found):
        return  # timm's distilled models: head='auto' takes both (see _check_other_heads)
    both = ",".join([str(config.head), *others])
    text = (
        f"head={config.head!r} has {others} beside it with the same shape: a model that "
        "combines parallel heads (a class and a distillation head) would keep the others "
        f"frozen in its output. Name them all, S2AConfig(head={both!r})"
    )
    if "side" in config.modules:
        raise ValueError(f"'side' with {text}.")
    warnings.warn(f"{text}, unless the model does not combine them.", stacklevel=4)


def _apply(model: nn.Module, config: S2AConfig, state: StructureState, modules: tuple) -> None:
    _check_parallel_heads(model, state, config)
    head_ids = {id(p) for p in state.head.parameters()} if state.head is not None else set()
    if config.add_bias and "bias" in modules:
        for module in model.modules():
            if isinstance(module, _CONVS_AND_LINEARS) and module.bias is None:
                if any(id(p) in head_ids for p in module.parameters()):
                    continue
                w = module.weight
                module.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
                state.added_biases.append(module)
        _drop_unread_biases(model, config, state)
    # 'side' replacing the head's output leaves the head unused: it trains only when the
    # side's output is added to it
    head_trains = "side" not in modules or config.side_merge == "add"
    for name, p in model.named_parameters():
        train_bias = "bias" in modules and is_bias(name)
        p.requires_grad_(train_bias or (id(p) in head_ids and head_trains))
    if config.frozen_dtype is not None:
        hold_frozen(model, config, state, _CONVS_AND_LINEARS)
    for head in head_modules(state.head):
        state.parts.append((_name_of(model, head), "head"))
    if "prompt" in modules:
        for block in state.blocks:
            prompt = LowRankPrompt(block.shape, block.layout, config.prompt_rank)
            owner, owner_name, attr = home(model, block.name, PROMPT_NAME, "prompt", state.runners)
            # made like the block's output in the dry forward, before frozen weights were cast
            _add_module(state, owner, attr, prompt, block.like)
            hook = partial(_prompt_hook, prompt)
            state.hooks.append(block.module.register_forward_hook(hook))
            state.parts.append((f"{owner_name}.{attr}" if owner_name else attr, "prompt"))
    if "side" in modules:
        _apply_side(model, config, state)
    if state.adds_weights or (config.frozen_dtype in FOUR_BIT_DTYPES and state.cast_originals):
        # A fresh model has none of the injected weights; its load_state_dict then fails on
        # torch's "Unexpected key(s)" error, and this entry makes that error say what to do.
        # Weights held in 4 bits are saved as built: loaded into a plain model they give the
        # exact-weight twin, not the model that trained, so such a state dict is marked too.
        state.hooks.append(model.register_state_dict_post_hook(_marker_out))
        state.hooks.append(model.register_load_state_dict_pre_hook(_marker_in))
    if config.bn_mode == "eval":
        # The head's own BatchNorms train with it (affine or not), as without S2A.
        in_head = {id(m) for head in head_modules(state.head) for m in head.modules()}
        state.batch_norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in in_head
        ]
        # On each BatchNorm itself, not on the root's forward: a model driven through
        # ``forward_features`` or through its parts must never update frozen statistics.
        # In eval mode for the call only: outside it each keeps the mode the user or
        # Lightning set (a user's own eval BatchNorm stays eval after undo).
        held = HeldStatistics(model, state.batch_norms)
        for bn in state.batch_norms:
            state.hooks.append(bn.register_forward_pre_hook(held.hold))
            state.hooks.append(bn.register_forward_hook(release_eval, always_call=True))


def _apply_side(model: nn.Module, config: S2AConfig, state: StructureState) -> None:
    # The side network's output replaces the head's; with no head in the model (the user's
    # own head sits outside it), it replaces the model's own output: features of the same
    # width (pooled), or the feature pyramid (hierarchical), which the user's head then reads.
    replaced = head_modules(state.head)[0] if state.head is not None else model
    hierarchical = config.side == "hierarchical"
    outputs = _side_outputs(model, state, config)
    channels = [b.shape[-1] if b.layout in ("tokens", "nhwc") else b.shape[0] for b in state.blocks]
    width = config.side_width or max(1, min(SIDE_MAX_WIDTH, channels[-1] // config.side_reduction))
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
    _add_module(state, model, SIDE_NAME, side, _like(replaced))
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
    state.hooks.append(model.register_forward_hook(hooks.exit, always_call=True))


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
    prefix = next(
        (
            m.num_prefix_tokens
            for m in model.modules()
            if isinstance(getattr(m, "num_prefix_tokens", None), int)
        ),
        None,
    )
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


def _prompt_hook(
    prompt: LowRankPrompt, module: nn.Module, args: Any, output: torch.Tensor
) -> torch.Tensor:
    return prompt(output)


def _like(module: nn.Module) -> dict[str, Any]:
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _add_module(
    state: StructureState, parent: nn.Module, name: str, child: nn.Module, like: dict
) -> None:
    if hasattr(parent, name):
        raise RuntimeError(
            f"{type(parent).__name__} already has an attribute {name!r}: the model has one of "
            "that name, or two blocks whose names spell the same one (a.b and a_b). Name the "
            "blocks with S2AConfig(blocks=[...])."
        )
    parent.add_module(name, child.to(**like))
    state.added_modules.append((parent, name))


def _drop_unread_biases(model: nn.Module, config: S2AConfig, state: StructureState) -> None:
    """Take out the added biases that the model's forward never reads where it reads the
    layer's weight (EVA's and BEiT's attention compute ``F.linear(x, qkv.weight, qkv_bias)``
    with a bias built from ``q_bias`` and ``v_bias``, which train as biases already): they
    would be trainable parameters that train nothing. A layer whose weight the dry forward
    (eval mode, zeros) does not read either keeps its bias: it may run in training only (an
    auxiliary head) or for other inputs (an expert not routed to). Said, with the first
    names. Where no dry forward can run (no input size known), all stay."""
    if not state.added_biases:
        return
    try:
        size = default_input_size(model, config.input_size)
    except ValueError:
        return
    read = tensors_read(model, size)
    if read is None:
        return
    unread = [m for m in state.added_biases if id(m.bias) not in read and id(m.weight) in read]
    for module in unread:
        module.register_parameter("bias", None)
        state.added_biases.remove(module)
    if unread:
        names = [_name_of(model, m) for m in unread]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"add_bias: {len(unread)} layers' forwards never read a bias ({shown}: their "
            "module computes with a bias of its own, as EVA's and BEiT's attention build "
            "qkv's from q_bias and v_bias, which train as biases already); none was added "
            "there.",
            stacklevel=4,
        )


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is target), "")


def undo_structure(model: nn.Module, state: StructureState) -> None:
    """Remove injected modules, biases and hooks; restore flags and BatchNorm modes."""
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
    for parent, name in reversed(state.added_modules):
        delattr(parent, name)
    state.added_modules.clear()
    for module in state.added_biases:
        module.register_parameter("bias", None)
    state.added_biases.clear()
    cast_frozen(model, state, None)
    with torch.no_grad():
        for owner, leaf, before, written in reversed(state.overwritten):
            # looked up now: .to()/.double() since replaced buffer tensors
            tensor = owner._parameters.get(leaf, owner._buffers.get(leaf))
            unchanged = tensor is not None and tensor.shape == written.shape
            if unchanged and torch.equal(tensor, written.to(tensor.device, tensor.dtype)):
                tensor.copy_(before)
    state.overwritten.clear()
    for bn in state.batch_norms:
        forget_statistics(bn)
    for name, p in model.named_parameters():
        if name in state.flags:
            p.requires_grad_(state.flags[name])
    state.cast_originals.clear()


#: State-dict entry of a model with injected S2A weights; named so that loading it into a model
#: without them fails with an error that names the call that loads it.
STATE_DICT_MARKER = "s2a_injected(load with lightning_s2a.load_from_checkpoint, or apply_s2a first)"


def _marker_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict[prefix + STATE_DICT_MARKER] = torch.zeros(0)


def _marker_in(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + STATE_DICT_MARKER, None)
