"""What a training step's other modules save: a head of the user's own beside the S2A'd
encoder, a loss module.

The engine's hooks are installed only while the S2A'd model's forward runs, so a
LightningModule whose classifier sits beside its S2A'd encoder kept that classifier's saved
tensors out of every count (until 2026-12-07: a reviewer's MLP head kept 3x the logged
bytes). :class:`OutsideModules` gives every module of a scope that no engine hooks the same
boundaries in counting mode: while the outermost of them runs with autograd, saved-tensor
hooks that keep each tensor as it is (a small view of a larger storage as a copy, as the
engine keeps its own) and add it to the engine's open account as part ``"outside"`` (a
storage the engine counted already, the head's input that the model saved too, is not
counted again in raw). It stands aside where the engine would (another owner's saved-tensor
hooks, a backward, a ``torch.func`` transform begun outside, ``torch.compile``) and inside
an S2A'd forward, whose engine takes what is saved there; a ``torch.func`` transform begun
inside a counted module's forward refuses the hooks, and a warning beside its error names
the switch (``S2ACallback(count_outside=False)``). What a training step computes in its own body,
between module calls (``F.cross_entropy``), is not seen.
"""

from __future__ import annotations

import sys
import warnings
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from .contexts import dual_level_open, engine_saves, functorch_transform, redirected_call
from .kept import Kept, compact
from .packed import in_backward

if TYPE_CHECKING:
    from .hooks import SavedTensorEngine

#: The part (``stats()["by_part"]``) and the kind of what other modules save.
OUTSIDE = "outside"

#: What ``torch.func.grad`` (vjp, jacrev, hessian) raises under saved-tensor hooks.
FUNC_REFUSAL = "don't yet support saved tensor hooks"


def hooking_engine(module: nn.Module) -> SavedTensorEngine | None:
    """The S2A engine whose forward hooks are on ``module`` (a module of an S2A'd model, or
    a copy of one: a copy carries them), or None."""
    from .hooks import SavedTensorEngine

    for hook in module._forward_pre_hooks.values():
        fn = hook.func if isinstance(hook, partial) else hook
        engine = getattr(fn, "__self__", None)
        if isinstance(engine, SavedTensorEngine):
            return engine
    return None


class OutsideModules:
    """Counts, into ``engine``'s accounts, what the modules of ``scope`` outside every S2A'd
    model save for backward (kept as it is: nothing is coded). :meth:`remove` takes the
    hooks off. Meant for steps marked with ``engine.begin_step()``, whose forwards add up
    to one account until a backward."""

    def __init__(self, engine: SavedTensorEngine, scope: nn.Module) -> None:
        self.engine, self.scope = engine, scope
        self._handles: list[RemovableHandle] = []
        self._depth = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._pushed_at = 0
        self._storages: set[int] = set()
        self._storages_at = -1  # the engine's account they were read in
        self._counted: list[nn.Module] = []
        self._engines: dict[int, SavedTensorEngine] = {}  # the S2A'd models' in the scope
        for module in scope.modules():
            owner = hooking_engine(module)
            if owner is not None and owner.model is not None:
                # (a copied part's engine is inert, knows no model: its modules are counted)
                self._engines[id(owner)] = owner
        # The S2A'd models' own modules, those their engines leave unhooked too (see
        # boundaries.passes_through), are theirs.
        theirs = {id(m) for e in self._engines.values() for m in e.model.modules()}
        for module in scope.modules():
            if id(module) in theirs or type(module) is nn.Identity:
                continue  # (a p=0 dropout here is hooked: raised later, its mask, called
                # from the step's body, has no counted parent to be seen in)
            self._counted.append(module)
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    @property
    def modules(self) -> int:
        """How many modules are counted (those of the scope that no engine hooks)."""
        return len(self._handles) // 2

    def remove(self) -> None:
        """Take every hook off (and the saved-tensor hooks, should a forward never have
        returned: a ``KeyboardInterrupt`` skips the forward hooks)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pop()
        self._depth = 0

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._depth += 1
        if self._hooks is not None or not torch.is_grad_enabled():
            return
        if torch.compiler.is_compiling() or redirected_call(module):
            return  # a compiled region; Lightning's DDP step through the module's call
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return  # an S2A'd forward's engine, or another owner's hooks (a checkpoint)
        if in_backward() or functorch_transform():
            return
        if self._storages_at != self.engine.step:
            self._storages = self._parameter_storages()
            self._storages_at = self.engine.step
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self._pushed_at = self._depth

    def _parameter_storages(self) -> set[int]:
        """Storages of the scope's parameters and buffers, no activations: the S2A'd models'
        as their engines read them (per account), the counted modules' own read here, once
        per account (a lazy module's weights exist from its first call; read per call over
        the whole scope, a ViT-B LightningModule's 406 parameters cost 1 ms a call)."""
        storages: set[int] = set()
        for engine in self._engines.values():
            if not engine._param_storages:  # no forward yet: read them now
                engine._refresh_parameters()
            storages |= engine._param_storages
        for module in self._counted:
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None and not is_lazy(t) and t.layout == torch.strided:
                    storages.add(t.untyped_storage().data_ptr())
        return storages

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        ours = self._hooks is not None and self._depth == self._pushed_at
        if ours:
            self._pop()
        self._depth = max(self._depth - 1, 0)
        raised = sys.exc_info()[1]  # torch calls this hook in its except block
        if ours and isinstance(raised, RuntimeError) and FUNC_REFUSAL in str(raised):
            # (an error raised here would be silenced by torch, the forward's own kept)
            warnings.warn(
                f"S2A: a torch.func transform (grad, vjp, jacrev, hessian) ran inside the "
                f"forward of {type(module).__name__} while S2A counted what it saves for "
                "backward with saved-tensor hooks, which those transforms refuse (the error "
                "below). If the transform runs in a module beside the S2A'd one (your head), "
                "turn the counting off: S2ACallback(count_outside=False), "
                "S2AStrategy(count_outside=False) or --s2a.count_outside false; the "
                "s2a/activation_* metrics then leave that module's saved tensors out.",
                stacklevel=2,
            )

    def _pop(self) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None and engine_saves(self):  # only the top hooks can come off
            hooks.__exit__(None, None, None)

    def _pack(self, t: torch.Tensor) -> Any:
        if dual_level_open():  # forward-mode AD: dual tensors' storages cannot be read
            return Kept(t, bare=True)
        if t.layout != torch.strided:
            self.engine.outside_account().add_unstrided(OUTSIDE, t, OUTSIDE)
            return Kept(t)
        if t.untyped_storage().data_ptr() in self._storages:
            return Kept(t)  # a parameter or buffer: no activation
        account = self.engine.outside_account()
        # A small view of a larger storage is kept as a copy, as the engine keeps its own
        # (a head's ``x[:, 0]`` kept the final norm's every token alive: 17x the slice at
        # 32 px, uncounted): the same values, only the slice's bytes. With compress=False
        # (the plain baseline) views stay as PyTorch keeps them, as the engine's do.
        kept = compact(t, self.engine._copies) if self.engine.config.compress else t
        account.add(OUTSIDE, t, None, OUTSIDE, kept)
        return Kept(kept)  # its version checked at unpack, as PyTorch does without hooks

    def _unpack(self, packed: Kept) -> torch.Tensor:
        self.engine._unpacked = True  # a backward ran: the next save starts a new account
        return packed.unpack()
