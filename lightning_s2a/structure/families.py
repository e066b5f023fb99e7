"""Where the blocks are: one small table per model family, repeated blocks for the rest.

``prompt`` and ``side`` attach to the outputs of a model's blocks. For the timm families below
the blocks are known; any other model's are found as its most repeated block class in a
``ModuleList``/``Sequential`` (:func:`repeated_blocks`), else as the modules its timm
``feature_info`` names (:func:`feature_info_blocks`), or named with
``S2AConfig(blocks=...)``: a list of module names, or a pattern where ``*`` matches one name
component (``"encoder.layer.*"``). The rule that found them is in ``handle.summary()``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby

import torch
from torch import nn

from .holders import PROBE_NAME, Probe
from .layouts import DRY_BATCH, dry_forward, layout_of, settle_layouts

#: timm class name -> (block name pattern, layout of each block's output), for classes defined
#: in timm only: torchvision's VisionTransformer, ConvNeXt, ResNet... share the names, not the
#: layouts, and go through the rules for any model.
#: Layouts: "tokens" (B, N, D), "nhwc" (B, H, W, C), "nchw" (B, C, H, W).
FAMILIES: dict[str, tuple[str, str]] = {
    "VisionTransformer": ("blocks.*", "tokens"),  # ViT and DeiT
    "SwinTransformer": ("layers.*.blocks.*", "nhwc"),
    "ResNet": ("layer*.*", "nchw"),
    "ConvNeXt": ("stages.*.blocks.*", "nchw"),
    "EfficientNet": ("blocks.*.*", "nchw"),
}


@dataclass(frozen=True)
class Block:
    """A block whose output the structural modules read or change."""

    name: str
    module: nn.Module
    layout: str
    shape: tuple[int, ...] = ()  # output shape without the batch dimension
    #: Device and dtype of the output in the dry forward, before any cast of frozen weights:
    #: what a prompt added to it is made in.
    like: dict = field(default_factory=dict, compare=False)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = [re.escape(p).replace(r"\*", "[^.]*") for p in pattern.split(".")]
    return re.compile(r"\.".join(parts) + r"\Z")


def match_modules(model: nn.Module, pattern: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Submodules named by a list of names, or matching a ``*``-per-component pattern."""
    modules = dict(model.named_modules())
    if isinstance(pattern, str):
        regex = _pattern_regex(pattern)
        return [(n, m) for n, m in modules.items() if n and regex.match(n)]
    missing = [n for n in pattern if n not in modules]
    if missing:
        raise ValueError(f"blocks: {type(model).__name__} has no submodule(s) named {missing}.")
    return [(n, modules[n]) for n in pattern]


_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _weight_layers(module: nn.Module) -> int:
    return sum(isinstance(m, _WEIGHT_LAYERS) for m in module.modules())


def repeated_blocks(
    model: nn.Module, single_layers: bool = True, head: nn.Module | None = None
) -> tuple[list[tuple[str, nn.Module]], str]:
    """The model's repeated blocks, for a model outside the family table.

    Two or more consecutive children of one class in an ``nn.ModuleList`` or ``nn.Sequential``
    are blocks (a stage's blocks after its downsampling layer too), unless they have no
    parameters (activations, pools). The class with the most such blocks in the whole model
    wins, so a hierarchical model's stages (``stages.*.blocks.*``) give all their blocks, and
    a model's few class-attention blocks lose to its main blocks. Every block of that class
    in a list is taken, also one that is alone in its stage.

    Lists of lists count only where nothing else repeats: then the inner lists are the blocks
    (a user's ``nn.Sequential`` of ``nn.Sequential(Linear, GELU, Linear)`` blocks).

    Blocks with two or more weight layers (linear or convolution) come first: single layers
    and conv-norm-act units, the branches of an Inception block or the layers of a VoVNet
    block, outnumber the blocks they sit in. They count only where nothing else repeats (a
    user's plain stack of convolutions), and not at all with ``single_layers=False``.
    Lists inside the ``head`` are no blocks (a ModuleList of two Linear heads was taken for
    blocks beside the model's Linear blocks). Returns the blocks in model order and the rule,
    in words.
    """
    in_head = {id(m) for m in head.modules()} if head is not None else set()
    # class -> the distinct blocks in runs of two or more (by id: a block listed in two
    # containers, aliased, votes once)
    blocks: dict[type, set[int]] = {}
    units: dict[type, set[int]] = {}
    # Lists of lists: a list of stages, whose own block lists count instead; or, where
    # nothing else repeats, the blocks themselves (nn.Sequential(Linear, GELU, Linear) each).
    nested_blocks: dict[type, set[int]] = {}
    nested_units: dict[type, set[int]] = {}
    members: dict[type, list[tuple[str, nn.Module]]] = {}  # every child of a list, by class
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or id(container) in in_head:
            continue
        prefix = f"{name}." if name else ""
        for kind, run in groupby(container.named_children(), key=lambda child: type(child[1])):
            children = [(prefix + n, m) for n, m in run]  # consecutive children of one class
            members.setdefault(kind, []).extend(children)
            if len(children) < 2:
                continue
            first = children[0][1]
            if next(first.parameters(), None) is None:
                continue  # activations or pools repeated in a Sequential are no blocks
            nested = issubclass(kind, (nn.ModuleList, nn.Sequential))
            if _weight_layers(first) >= 2:
                counts = nested_blocks if nested else blocks
            else:
                counts = nested_units if nested else units
            counts.setdefault(kind, set()).update(id(m) for _, m in children)
    by_class = blocks or (units if single_layers else {})
    if not by_class:
        by_class = nested_blocks or (nested_units if single_layers else {})
    if not by_class:
        return [], ""
    # On a tie the finer blocks win: a model's blocks over stages holding as many of them.
    kind = max(by_class, key=lambda k: (len(by_class[k]), members[k][0][0].count(".")))
    # Every block of the winning class in a list, also one alone in its stage, outermost only.
    found = _outermost(_distinct(members[kind]))
    return found, f"repeated blocks: {len(found)} x {kind.__name__}"


def feature_info_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """The modules a timm model's ``feature_info`` names (one per feature level: its stages),
    for a model with no repeated blocks; ``([], "")`` without one.

    timm sets ``feature_info`` on its models as a list of dicts with a ``"module"`` name, and
    on ``features_only`` models as an object holding that list in ``.info``. A name that is
    no submodule is an error: the blocks would silently be fewer than the model says.
    """
    declared = getattr(model, "feature_info", None)
    info = getattr(declared, "info", declared)
    if not isinstance(info, (list, tuple)):
        return [], ""
    names = [i.get("module") for i in info if isinstance(i, dict) and i.get("module")]
    if not names:
        return [], ""
    modules = dict(model.named_modules())
    # timm's features_only models (their feature_info a FeatureInfo, not a list) flatten
    # their first level ("features.denseblock1" is module "features_denseblock1") but keep
    # the names in feature_info. Elsewhere a name is taken as it is: a missing "a.b" must not
    # silently become an unrelated module "a_b".
    flattened = info is not declared
    names = [
        n if n in modules or not flattened else n.replace(".", "_", 1) for n in dict.fromkeys(names)
    ]
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"{type(model).__name__}.feature_info names {missing}, which are no submodules of "
            "it. Name the blocks with S2AConfig(blocks=[...])."
        )
    return [(n, modules[n]) for n in names], f"timm feature_info: {len(names)} levels"


def find_blocks(
    model: nn.Module,
    blocks: str | Sequence[str] | None,
    layout: str = "auto",
    head: nn.Module | None = None,
) -> tuple[list[Block], str, str]:
    """The model's blocks, the declared layout ("auto" unless the family table has one), and
    the rule that found them: the family table, the user's ``blocks``, repeated blocks (none
    inside the ``head``), or timm's ``feature_info``."""
    family = family_of(model)
    if blocks is None and family is None:
        # Blocks of two or more weight layers, else the stages timm's feature_info names,
        # else repeated single-weight units (a user's small model).
        found, rule = repeated_blocks(model, single_layers=False, head=head)
        if not found:
            found, rule = feature_info_blocks(model)
        if not found:
            found, rule = repeated_blocks(model, head=head)
        if not found:
            raise ValueError(
                f"cannot find the blocks of {type(model).__name__}: 'prompt' and 'side' attach "
                f"to block outputs; it is not one of the known timm families "
                f"{sorted(FAMILIES)}, has no ModuleList or Sequential of repeated blocks and "
                "no timm feature_info naming its stages. "
                "Name the blocks, by their names inside the model S2A is applied to (the "
                "backbone, not the LightningModule around it), e.g. "
                "S2AConfig(blocks='layers.*') or S2AConfig(blocks=['layer1', 'layer2']) "
                "(CLI: --s2a.blocks; with prompts also --s2a.input_size)."
            )
        return [Block(n, m, layout) for n, m in _distinct(found)], layout, rule
    if blocks is not None:
        _check_not_nested(blocks)
        pattern, declared, rule = blocks, layout, f"named: blocks={blocks!r}"
    else:
        pattern, declared = family  # type: ignore[misc]
        declared = layout if layout != "auto" else declared
        rule = f"family table: {type(model).__name__} -> {pattern!r}"
    found = match_modules(model, pattern)
    if not found:
        raise ValueError(f"blocks={pattern!r} matches no submodule of {type(model).__name__}.")
    # Keep only outermost matches (a pattern may also match sub-blocks of a block).
    return [Block(n, m, declared) for n, m in _distinct(_outermost(found))], declared, rule


def family_of(model: nn.Module) -> tuple[str, str] | None:
    """The family table's entry for a timm model's class, else None."""
    cls = type(model)
    return FAMILIES.get(cls.__name__) if cls.__module__.startswith("timm.") else None


def _check_not_nested(blocks: str | Sequence[str]) -> None:
    """Refuse a list of block names one of which lies inside another (``["blocks.0",
    "blocks.0.mlp"]``): the inner one was dropped without a word. Patterns (``*``) may match
    sub-blocks; only the outermost of those are blocks, by design."""
    names = [blocks] if isinstance(blocks, str) else list(blocks)
    exact = [n for n in names if isinstance(n, str) and not any(c in n for c in "*?[")]
    inner = [(o, n) for n in exact for o in exact if n.startswith(o + ".")]
    if inner:
        outer, name = inner[0]
        raise ValueError(
            f"blocks names {name!r} inside {outer!r}: a prompt or side tap goes on each "
            "block's output, and a block inside another would be dropped. Name blocks that "
            "do not contain one another."
        )


def _outermost(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop the entries that lie inside another entry (``blocks.1.attn`` inside ``blocks.1``)."""
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]


def _distinct(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Each module once, under its first name: a block reachable under two names (a list of
    blocks and stage views of it, or a name given twice) gets one prompt, not two."""
    seen: set[int] = set()
    return [(n, m) for n, m in found if not (id(m) in seen or seen.add(id(m)))]


@torch.no_grad()
def block_output_shapes(
    model: nn.Module,
    blocks: list[Block],
    input_size: tuple[int, ...],
    owners: Sequence[str] = (),
    side: bool = False,
) -> tuple[list[Block], tuple[int, ...] | None, set[str]]:
    """Run :data:`DRY_BATCH` samples through the model to learn each block's output shape and
    layout (``side``: a side network reads them, which needs one row per sample).

    Also returns the shape of the model's own output without the batch dimension (None when
    it is not a tensor), which the side branch needs when there is no head to replace, and
    which of the modules named in ``owners`` ran a child added to them (:class:`~.holders.Probe`).
    """
    probes = {name: Probe() for name in owners}
    calls: dict[str, int] = {}
    try:
        for name, probe in probes.items():
            model.get_submodule(name).add_module(PROBE_NAME, probe)
        outputs, out = dry_forward(model, blocks, input_size, calls)
    except Exception as err:
        ran = {name for name, probe in probes.items() if probe.ran}
        if ran:  # a probe that ran may have made the forward fail: the caller moves it
            return blocks, None, ran
        no_forward = isinstance(err, NotImplementedError) and "forward" in str(err)
        advice = (
            f"{type(model).__name__} has no forward of its own (a LightningModule whose "
            "training_step calls its parts): S2A it where a forward runs the backbone, "
            "S2ACallback(backbone='<attribute>')"
            if no_forward
            else "Pass the size your data have: S2AConfig(input_size=(C, H, W))"
        )
        raise ValueError(
            f"'prompt' and 'side' size their parameters from one forward of "
            f"{type(model).__name__} at input size {tuple(input_size)}, which failed "
            f"({type(err).__name__}: {err}). {advice}."
        ) from err
    finally:
        for name in probes:
            holder = model.get_submodule(name)
            if PROBE_NAME in holder._modules:
                delattr(holder, PROBE_NAME)
    ran = {name for name, probe in probes.items() if probe.ran}
    shapes = {n: o.shape if isinstance(o, torch.Tensor) else o for n, o in outputs.items()}
    likes = {
        n: {"device": o.device, "dtype": o.dtype}
        for n, o in outputs.items()
        if isinstance(o, torch.Tensor)
    }
    missing = [b.name for b in blocks if b.name not in shapes]
    if missing:
        raise ValueError(f"blocks {missing} did not run in a forward pass; name blocks that do.")
    again = {n: c for n, c in calls.items() if c > 1}
    if again:
        name, count = next(iter(again.items()))
        raise ValueError(
            f"'prompt' and 'side' attach once to each block's output, but {len(again)} of "
            f"{type(model).__name__}'s blocks ran more than once in one forward (block "
            f"{name!r}: {count} times; a loop over the blocks, or a block reused), so a prompt "
            "would be added on every run, and the side network reads each block once. Name "
            "blocks that run once each with S2AConfig(blocks=...), or use modules=['bias']."
        )
    not_tensors = {b.name: type(shapes[b.name]).__name__ for b in blocks}
    not_tensors = {n: t for n, t in not_tensors.items() if t != "Size"}
    if not_tensors:
        raise ValueError(
            f"'prompt' and 'side' read and change a block's output tensor, but blocks "
            f"{sorted(not_tensors)} of {type(model).__name__} return "
            f"{sorted(set(not_tensors.values()))}. Name blocks that return a tensor: "
            "S2AConfig(blocks='...'); where none does (Hugging Face's Swin layers return "
            "tuples), those modules cannot attach, and modules=['bias'] still trains."
        )
    check_batch_first({b.name: tuple(shapes[b.name]) for b in blocks}, model, side)
    found = [
        Block(
            b.name,
            b.module,
            layout_of(shapes[b.name], b.layout, tuple(input_size[-2:]), b.module),
            tuple(shapes[b.name][1:]),
            likes[b.name],
        )
        for b in blocks
    ]
    found = settle_layouts(found, model, tuple(input_size))
    return found, (tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None), ran


def check_batch_first(shapes: dict[str, tuple[int, ...]], model: nn.Module, side: bool) -> None:
    """Block outputs of the dry forward (:data:`DRY_BATCH` samples) must put the batch first.

    Sequence-first outputs (N tokens, batch, D: ``nn.TransformerEncoderLayer`` without
    ``batch_first=True``) were read as one sample of N tokens. Outputs that fold the batch
    into their first dimension (MobileViT's transformer runs patches as samples: 8 rows for
    2 samples) take a prompt, which broadcasts over that dimension, but no side network,
    which pools each row as a sample."""
    seq_first, folded, other = {}, {}, {}
    for name, shape in shapes.items():
        if shape and shape[0] == DRY_BATCH:
            continue
        if len(shape) >= 2 and shape[1] == DRY_BATCH:
            seq_first[name] = shape
        elif shape and shape[0] % DRY_BATCH == 0:
            folded[name] = shape
        else:
            other[name] = shape
    what = type(model).__name__
    if seq_first or other:
        raise ValueError(
            f"'prompt' and 'side' read a block's output with the batch first, but in a forward "
            f"of {DRY_BATCH} samples blocks of {what} returned {_few({**seq_first, **other})}"
            ": the batch is not their first dimension"
            + (
                " (sequence first, as nn.TransformerEncoderLayer gives without "
                "batch_first=True). Build the blocks batch first, or name"
                if seq_first
                else ". Name"
            )
            + " blocks whose outputs are: S2AConfig(blocks='...'); modules=['bias'] does not "
            "depend on the layout."
        )
    if folded and side:
        raise ValueError(
            f"'side' pools each block's output per sample, but in a forward of {DRY_BATCH} "
            f"samples blocks of {what} returned {_few(folded)}: they fold the batch into their "
            "first dimension (patches run as samples), so the side would mix them. Name blocks "
            "whose outputs put the batch first alone: S2AConfig(blocks='...'); 'prompt' and "
            "'bias' take these blocks."
        )


def _few(shapes: dict[str, tuple[int, ...]], most: int = 3) -> str:
    """``name (shape)`` for the first few entries, and how many more."""
    items = [f"{n} {s}" for n, s in list(shapes.items())[:most]]
    more = len(shapes) - most
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def default_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    """The (C, H, W) used to size prompts, from the model as built.

    In order: the config's ``input_size``; the patch embedding's ``img_size`` (timm models
    built with ``img_size=...``); a Hugging Face ``config.image_size``; timm's
    ``pretrained_cfg["input_size"]``. Submodules count, so a LightningModule holding a timm
    model is sized by it.
    """
    if input_size is not None:
        return tuple(input_size)
    modules = list(model.modules())
    for m in modules:
        size, proj = getattr(m, "img_size", None), getattr(m, "proj", None)
        # The projection's first conv gives the channels: one conv, or a stack of them
        # (XCiT's ConvPatchEmbed; built with img_size=32 it was sized for 224 and refused
        # its own 32 px as "the input resolution changed").
        convs = (
            [c for c in proj.modules() if isinstance(c, nn.Conv2d)]
            if isinstance(proj, nn.Module)
            else []
        )
        if isinstance(size, (int, tuple, list)) and convs:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            return (convs[0].in_channels, *hw)
    for m in modules:
        cfg = getattr(m, "config", None)
        size, chans = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", None)
        if isinstance(size, int) and isinstance(chans, int):
            return (chans, size, size)
    for m in modules:
        cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None) or {}
        if isinstance(cfg, dict) and "input_size" in cfg:
            return tuple(cfg["input_size"])
    raise ValueError(
        f"cannot tell the input size of {type(model).__name__}, which 'prompt' and 'side' "
        "need to size their parameters; pass the shape of one sample without the batch: "
        "S2AConfig(input_size=(3, 224, 224)) for images, (tokens, features) for sequences."
    )
