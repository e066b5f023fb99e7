"""A check for plain training loops: parameters S2A adds that no optimizer steps.

An optimizer built before ``apply_s2a`` holds the parameters that existed then: the prompts,
the side network and added biases S2A creates get gradients but no optimizer holds them, and
the run quietly trains less than it says (BitFit instead of prompts; a side network that
stays at its initialisation). Lightning builds optimizers after S2A (and checks them); a
plain loop gets this warning instead.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

#: Steps of one optimizer after which the added parameters no stepping optimizer holds are
#: named (several optimizers, one per part of the model, each step within them).
STEPS = 3


#: Hooks of checks whose model is gone, taken off by :func:`_sweep`.
_retired: list[Any] = []


def _sweep() -> None:
    """Take off the hooks of checks whose model was collected (outside any optimizer step)."""
    while _retired:
        _retired.pop().remove()


class UnsteppedCheck:
    """An optimizer step pre-hook (PyTorch's global one, removed with the handle or the
    model): notes which parameters the stepping optimizers hold, and warns once if, after a
    few steps of one that holds some of the model's, added parameters with a gradient are
    held by none. It reads what optimizers hold, not whether values changed: fused
    optimizers, gradient accumulation and parameters without a gradient say nothing."""

    def __init__(self, model: nn.Module, added: set[int]) -> None:
        self.model = weakref.ref(model)
        self.added = added
        self.held: set[int] = set()
        self.steps: dict[int, int] = {}
        self.done = False
        _sweep()
        self.hook = register_optimizer_step_pre_hook(self)
        # Not removed from the finalizer: the garbage collector may run it inside an
        # optimizer's step, while torch iterates over these hooks ("OrderedDict mutated
        # during iteration", seen in a test run). A dead model's hook does nothing and is
        # taken off by the next check built.
        weakref.finalize(model, _retired.append, self.hook)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        model = self.model()
        # Once done (said or not), still note what later optimizers hold: remove() reads it.
        if model is None or (self.done and self.added <= self.held):
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self.done:
            self.held |= self.added & held
            return
        if not any(id(p) in held for p in model.parameters()):
            return  # another model's optimizer
        self.held |= held
        self.steps[id(optimizer)] = steps = self.steps.get(id(optimizer), 0) + 1
        if steps < STEPS:
            return
        self.done = True
        missing = [
            n
            for n, p in model.named_parameters()
            if id(p) in self.added and id(p) not in self.held and p.grad is not None
        ]
        if missing:
            warnings.warn(
                f"S2A: {len(missing)} parameters S2A added get gradients but no optimizer "
                f"that steps holds them ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): is the optimizer built before "
                "apply_s2a? It holds only the parameters that existed then. Build it after "
                "apply_s2a, over the parameters that require grad (said once).",
                stacklevel=3,
            )

    def remove(self) -> None:
        """Take the hook off (``handle.remove()``)."""
        self.hook.remove()
