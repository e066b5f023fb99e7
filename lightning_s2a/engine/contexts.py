"""Where the engine is running: the contexts in which its hooks stand aside or save
differently (a Lightning wrapper's redirected call, a ``torch.func`` transform, a backward or
another owner's saved-tensor hooks, a checkpoint saving its region's inputs)."""

from __future__ import annotations

import os
import sys

import torch
import torch.autograd.forward_ad as forward_ad
import torch.utils.checkpoint
from torch import nn

from .packed import in_backward

#: Packages whose wrappers run another method through a module's ``forward``.
_REDIRECTING = ("lightning.", "pytorch_lightning.", "lightning_fabric.")


def redirected_call(module: nn.Module) -> bool:
    """True in a pre-hook of ``module`` whose call runs another method through its forward:
    under DDP, FSDP and DeepSpeed, Lightning (and Fabric) patch the LightningModule's
    ``forward`` on the instance to run ``training_step`` and call the wrapper, so the
    module's hooks see the whole step as one forward. The real forward runs inside it, as
    its own call; the patch is gone by then (and in the post-hooks).
    """
    forward = module.__dict__.get("forward")
    return (
        forward is not None
        and getattr(forward, "__name__", "") == "wrapped_forward"
        and str(getattr(forward, "__module__", "")).startswith(_REDIRECTING)
    )


def dual_level_open() -> bool:
    """True while forward-mode AD has a dual level open (``torch.autograd.forward_ad``): the
    rewrites' Functions have no jvp there, and what ops save may be dual tensors."""
    return forward_ad._current_level >= 0


def functorch_transform() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vmap``): the model's parameters
    are wrapped tensors there, whose storages cannot be read."""
    return torch._C._functorch.maybe_current_level() is not None


def foreign_autograd_context() -> bool:
    """True inside a backward pass (e.g. a checkpoint recomputing its region) or while other
    saved-tensor hooks are installed (activation checkpointing, ``save_on_cpu``).

    Only the innermost saved-tensor hooks apply, so pushing ours there would take tensors
    from the other owner; such regions are left to it, uncompressed.
    """
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return in_backward() or (top is not None and not _s2a_hooks(top))


def _s2a_hooks(top: tuple) -> bool:
    """True for another S2A engine's hooks, or the counting hooks of the modules beside an
    S2A'd model (:mod:`.outside`): a model S2A'd on its own, called inside another S2A'd
    model's forward or inside a user's module, saves through its own engine, under its own
    config (it stood aside, and the outer engine coded its trainable head's input at the
    outer's widths)."""
    from .hooks import SavedTensorEngine
    from .outside import OutsideModules

    owner = getattr(top[0], "__self__", None)
    return isinstance(owner, (SavedTensorEngine, OutsideModules))


_CHECKPOINT_FILE = os.path.normcase(os.path.abspath(torch.utils.checkpoint.__file__))


def checkpoint_input(depth: int = 8) -> bool:
    """True while ``torch.utils.checkpoint`` saves a region's inputs (reentrant or not; HF's
    ``gradient_checkpointing_enable`` and timm's ``set_grad_checkpointing`` call it): the
    save happens outside any operator, under the engine's hooks, and backward recomputes the
    whole region from these tensors. Coded, their error ran through every op of the region
    (a ViT's backbone-gradient cosine fell to 0.89); they are kept exact, as without S2A.
    Only the few frames above the pack hook are read, and only for saves outside operators.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if os.path.normcase(frame.f_code.co_filename) == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


def engine_saves(owner: object) -> bool:
    """True while the innermost saved-tensor hooks are ``owner``'s own (an engine's, or the
    counting hooks of the modules beside it: :mod:`.outside`)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and getattr(top[0], "__self__", None) is owner
