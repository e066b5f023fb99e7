"""Apply the structural modules to a model, and undo them.

``apply_structure`` freezes the backbone, turns on the chosen modules (bias, prompt, side),
keeps the task head trainable and fixes BatchNorm's mode. Every change is recorded in a
:class:`StructureState`, so ``undo_structure`` puts back the original modules and flags
(trained biases keep their values; added modules go).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import FOUR_BIT_DTYPES, S2AConfig, check_composition
from ..messages import some_names
from .added_biases import CONVS_AND_LINEARS, add_biases
from .families import Block, block_output_shapes, default_input_size, find_blocks
from .four_bit import frozen_names
from .frozen_weights import cast_frozen, hold_frozen
from .head import check_parallel_heads, find_head, head_modules, is_bias, warn_named_alike
from .held_statistics import HeldStatistics, forget_statistics, release_eval
from .hierarchical import prefix_tokens
from .holders import add_module, home
from .modules import LowRankPrompt
from .prompt_grid import PromptGrid, attach_image_size
from .side import SIDE_NAME, apply_side

PROMPT_NAME = "s2a_prompt"


@dataclass
class StructureState:
    """Everything ``apply_structure`` changed, for ``undo_structure``; and the module parts."""

    flags: dict[str, bool]
    #: The same flags by parameter (held weakly): a layer the user wrapped or moved since
    #: has its parameters under other names, and gets its flags back all the same.
    flag_refs: list[tuple[weakref.ref, bool]] = field(default_factory=list)
    head: nn.Module | None = None
    blocks: list[Block] = field(default_factory=list)
    #: (module, attribute) of each bias ``add_bias`` added: ``bias`` of a Linear or conv,
    #: ``in_proj_bias`` of an ``nn.MultiheadAttention`` built with ``bias=False``.
    added_biases: list[tuple[nn.Module, str]] = field(default_factory=list)
    added_modules: list[tuple[nn.Module, str]] = field(default_factory=list)
    hooks: list[RemovableHandle] = field(default_factory=list)
    batch_norms: list[nn.Module] = field(default_factory=list)
    #: Original values of parameters cast by ``frozen_dtype`` (on CPU), for an exact undo.
    cast_originals: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The layer that owns each of them, as found at apply (held weakly): the user may wrap,
    #: move or swap it since, and its original goes back to it, not to the name.
    cast_layers: dict[str, weakref.ref] = field(default_factory=dict)
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

    def added_tensor_ids(self) -> set[int]:
        """``id``s of the parameters and buffers S2A added (injected modules, added biases):
        what is not the model's own."""
        ids = {id(getattr(m, attr)) for m, attr in self.added_biases}
        for parent, name in self.added_modules:
            added = getattr(parent, name)
            ids |= {id(t) for t in (*added.parameters(), *added.buffers())}
        return ids

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
        found, _, block_rule = find_blocks(model, config.blocks, config.block_layout, head)
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
    state.flag_refs = [(weakref.ref(p), p.requires_grad) for p in model.parameters()]
    state.runners = runners
    state.head, state.blocks, state.output_shape = head, blocks, output_shape
    state.input_size = size
    state.block_rule = block_rule if blocks else ""
    try:
        _apply(model, config, state, modules)
    except Exception:
        undo_structure(model, state)
        raise
    frozen_norms = [] if config.add_bias else buffer_norms(model)
    if not any(p.requires_grad for p in model.parameters()):
        undo_structure(model, state)
        hint = (
            f" Its {len(frozen_norms)} FrozenBatchNorm layers ({some_names(frozen_norms)}) hold "
            "their shift as buffers: S2AConfig(add_bias=True) trains a bias before each."
            if frozen_norms
            else ""
        )
        raise ValueError(
            f"nothing left to train: {type(model).__name__} has no bias parameters and no head "
            f"(head={config.head!r}). Name a head with S2AConfig(head='...').{hint}"
        )
    if frozen_norms and "bias" in modules:
        warnings.warn(
            f"S2A: {len(frozen_norms)} FrozenBatchNorm layers of {type(model).__name__} "
            f"({some_names(frozen_norms)}) hold their scale and shift as buffers, so bias "
            "tuning trains none of them (a torchvision detection backbone's: 5,080 of "
            "17,280 biases trained). S2AConfig(add_bias=True) gives the layers before them "
            "a trainable bias, an exact shift of each.",
            stacklevel=3,
        )
    return state


def buffer_norms(model: nn.Module) -> list[str]:
    """Names of the model's frozen BatchNorms (torchvision's and timm's
    ``FrozenBatchNorm2d``): weight and bias as buffers, which no bias tuning trains."""
    return [n for n, m in model.named_modules() if is_frozen_batch_norm(m) and "bias" in m._buffers]


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's and timm's ``FrozenBatchNorm2d`` (timm's ``FrozenBatchNormAct2d``)."""
    return type(module).__name__.startswith("FrozenBatchNorm")


def _apply(model: nn.Module, config: S2AConfig, state: StructureState, modules: tuple) -> None:
    parallel = check_parallel_heads(model, state.head, config)
    warn_named_alike(model, parallel, config)
    head_ids = {id(p) for p in state.head.parameters()} if state.head is not None else set()
    if config.add_bias and "bias" in modules:
        state.added_biases = add_biases(model, config, head_ids)
    # 'side' replacing the head's output leaves the head unused: it trains only when the
    # side's output is added to it
    head_trains = "side" not in modules or config.side_merge == "add"
    for name, p in model.named_parameters():
        train_bias = "bias" in modules and is_bias(name)
        p.requires_grad_(train_bias or (id(p) in head_ids and head_trains))
    _warn_thawed(model, state.flags, head_ids)
    if config.frozen_dtype is not None:
        hold_frozen(model, config, state, CONVS_AND_LINEARS)
    for head in head_modules(state.head):
        state.parts.append((_name_of(model, head), "head"))
    if "prompt" in modules:
        grids = _token_grids(model, state)
        for block in state.blocks:
            prompt = LowRankPrompt(block.shape, block.layout, config.prompt_rank)
            owner, owner_name, attr = home(model, block.name, PROMPT_NAME, "prompt", state.runners)
            # made like the block's output in the dry forward, before frozen weights were cast
            add_module(state.added_modules, owner, attr, prompt, block.like)
            hook = partial(_prompt_hook, prompt, block.name, grids.get(block.name))
            state.hooks.append(block.module.register_forward_hook(hook))
            state.parts.append((f"{owner_name}.{attr}" if owner_name else attr, "prompt"))
    if "side" in modules:
        apply_side(model, config, state)
    if state.adds_weights or (config.frozen_dtype in FOUR_BIT_DTYPES and state.cast_originals):
        # A fresh model has none of the injected weights; its load_state_dict then fails on
        # torch's "Unexpected key(s)" error, and this entry makes that error say what to do.
        # Weights held in 4 bits are saved as built: loaded into a plain model they give the
        # exact-weight twin, not the model that trained, so such a state dict is marked too.
        state.hooks.append(model.register_state_dict_post_hook(_marker_out))
        state.hooks.append(model.register_load_state_dict_pre_hook(_marker_in))
    if config.bn_mode == "eval":
        # The head's own BatchNorms train with it (affine or not), as without S2A; a head
        # the side replaces trains not, and its BatchNorms are held as the backbone's.
        heads = head_modules(state.head) if head_trains else []
        in_head = {id(m) for head in heads for m in head.modules()}
        # BatchNorms, and instance norms with running statistics (InstanceNorm's
        # track_running_stats=True normalized with batch statistics and updated them).
        state.batch_norms = [m for m in model.modules() if _held_norm(m) and id(m) not in in_head]
        _warn_other_statistics(model, in_head)
        # On each BatchNorm itself, not on the root's forward: a model driven through
        # ``forward_features`` or through its parts must never update frozen statistics.
        # In eval mode for the call only: outside it each keeps the mode the user or
        # Lightning set (a user's own eval BatchNorm stays eval after undo).
        held = HeldStatistics(model, state.batch_norms)
        for bn in state.batch_norms:
            state.hooks.append(bn.register_forward_pre_hook(held.hold))
            state.hooks.append(bn.register_forward_hook(release_eval, always_call=True))


def _prompt_hook(
    prompt: LowRankPrompt,
    name: str,
    grid: PromptGrid | None,
    module: nn.Module,
    args: Any,
    output: torch.Tensor,
) -> torch.Tensor:
    if grid is not None:
        grid.check(name)
    return prompt(output)


def _token_grids(model: nn.Module, state: StructureState) -> dict[str, PromptGrid]:
    """Per token block, the patch grid its prompt is sized for (see :mod:`.prompt_grid`)."""
    tokens = [b for b in state.blocks if b.layout == "tokens"]
    if not tokens or len(state.input_size) != 3:
        return {}
    image = attach_image_size(model, state.input_size[0], state.hooks)
    size, prefix = (state.input_size[1], state.input_size[2]), prefix_tokens(model)
    found = {b.name: PromptGrid.of(image, size, b.shape[0], prefix) for b in tokens}
    return {name: grid for name, grid in found.items() if grid is not None}


def _warn_thawed(model: nn.Module, flags: dict[str, bool], head_ids: set[int]) -> None:
    """Say which parameters the user had frozen before S2A and S2A made trainable (biases):
    a teacher frozen inside a LightningModule S2A'd whole trained its biases, silently. A
    body frozen whole before (a linear probe's leftover, whatever its head) is S2A's to
    train, as is one with nothing frozen."""
    body = {n: p for n, p in model.named_parameters() if id(p) not in head_ids and n in flags}
    frozen = [not flags[n] for n in body]
    if all(frozen) or not any(frozen):
        return
    thawed = [n for n, p in body.items() if p.requires_grad and not flags[n]]
    if thawed:
        warnings.warn(
            f"S2A makes {len(thawed)} parameters trainable that were frozen before it was "
            f"applied ({some_names(thawed)}): it trains every bias of the model it is applied "
            "to, and its head. To keep a part frozen (a teacher, another tower), apply S2A "
            "to the part that trains (S2ACallback(backbone=...), apply_s2a(model.student)), "
            "or freeze that part again after applying it.",
            stacklevel=5,
        )


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is target), "")


def _held_norm(module: nn.Module) -> bool:
    """A norm ``bn_mode="eval"`` holds: a BatchNorm, or an instance norm that tracks running
    statistics (one without them computes the same in either mode)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return isinstance(module, nn.modules.instancenorm._InstanceNorm) and bool(
        module.track_running_stats
    )


def _warn_other_statistics(model: nn.Module, in_head: set[int]) -> None:
    """Say where a module keeps running statistics that S2A cannot hold: not a PyTorch norm
    (timm's EvoNorm), whose own train mode goes on updating them in a frozen backbone.
    Frozen BatchNorms (torchvision's and timm's ``FrozenBatchNorm2d``) never update theirs."""
    others = [
        n
        for n, m in model.named_modules()
        if id(m) not in in_head
        and not isinstance(m, nn.modules.batchnorm._NormBase)
        and not is_frozen_batch_norm(m)
        and any(b in m._buffers for b in ("running_mean", "running_var"))
    ]
    if others:
        shown = some_names(others)
        warnings.warn(
            f"bn_mode='eval' holds PyTorch's BatchNorm and InstanceNorm layers; {shown} keep "
            "running statistics of their own kind, which update in every training forward of "
            "the frozen backbone (and normalize with the batch's). Put them in eval mode "
            "yourself after model.train() if they should stay as built.",
            stacklevel=4,
        )


class UnfrozenCheck:
    """A step check: warn once where every parameter S2A froze trains again.

    The GAN idiom ``set_requires_grad(disc, True)`` (pix2pix, CycleGAN) after a generator
    step, or ``model.requires_grad_(True)``, unfreezes the whole backbone: the run became
    full fine-tuning with compression, silently (only ``s2a/trainable_pct`` said 100).
    Unfreezing a stage on purpose leaves others frozen and is not warned about.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model_name = type(model).__name__
        self.frozen = frozen_names(model)
        self.said = False

    def __call__(self) -> None:
        if self.said:
            return
        frozen = list(self.frozen.keys())
        if not frozen or not all(p.requires_grad for p in frozen):
            return
        self.said = True
        warnings.warn(
            f"all {len(frozen)} parameters S2A froze in {self.model_name} require grad again "
            "(model.requires_grad_(True), as a GAN's set_requires_grad does after the "
            "generator's step): the backbone trains in full, which is no longer S2A. To freeze "
            "a model for another model's step, use LightningModule.toggle_optimizer, or "
            "requires_grad_(False) and back on exactly the parameters that trained "
            "(handle.trainable_parameters() counts them); said once.",
            stacklevel=4,
        )


def undo_structure(model: nn.Module, state: StructureState) -> None:
    """Remove injected modules, biases and hooks; restore flags and BatchNorm modes."""
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
    for parent, name in reversed(state.added_modules):
        delattr(parent, name)
    state.added_modules.clear()
    for module, attr in state.added_biases:
        module.register_parameter(attr, None)
    state.added_biases.clear()
    cast_frozen(model, state, None)
    with torch.no_grad():
        for owner, leaf, before, written in reversed(state.overwritten):
            tensor = still_written(owner, leaf, written)
            if tensor is not None:
                tensor.copy_(before)
    state.overwritten.clear()
    for bn in state.batch_norms:
        forget_statistics(bn)
    restored = set()
    for ref, flag in state.flag_refs:
        p = ref()
        if p is not None:
            p.requires_grad_(flag)
            restored.add(id(p))
    for name, p in model.named_parameters():  # parameter objects replaced since: by name
        if id(p) not in restored and name in state.flags:
            p.requires_grad_(state.flags[name])
    state.flag_refs.clear()
    state.cast_originals.clear()
    state.cast_layers.clear()


def still_written(owner: nn.Module, leaf: str, written: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``owner.<leaf>`` if it still holds the values ``load_adapter`` wrote over it
    (``written``; see ``StructureState.overwritten``), else None: trained since, or replaced.
    Looked up now: ``.to()``/``.double()`` since replaced buffer tensors."""
    tensor = owner._parameters.get(leaf, owner._buffers.get(leaf))
    if tensor is None or tensor.shape != written.shape:
        return None
    return tensor if torch.equal(tensor, written.to(tensor.device, tensor.dtype)) else None


#: State-dict entry of a model with injected S2A weights; named so that loading it into a model
#: without them fails with an error that names the call that loads it.
STATE_DICT_MARKER = "s2a_injected(load with lightning_s2a.load_from_checkpoint, or apply_s2a first)"


def _marker_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict[prefix + STATE_DICT_MARKER] = torch.zeros(0)


def _marker_in(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + STATE_DICT_MARKER, None)
