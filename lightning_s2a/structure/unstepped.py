"""A step check for plain training loops: parameters S2A trains that no optimizer steps.

An optimizer built before ``apply_s2a`` holds the parameters that existed then: the prompts,
the side network and added biases S2A creates get gradients but never change, and the run
quietly trains less than it says (BitFit instead of prompts; a side network that stays at
its initialisation). Lightning builds optimizers after S2A (and checks them); a plain loop
gets this warning instead.
"""

from __future__ import annotations

import warnings

from torch import nn

#: Forwards after which parameters that never changed are named: a few optimizer steps with
#: every trainable parameter's gradient nonzero by then (a low-rank prompt's first factor
#: gets its first gradient after one step), or, where nothing moved at all, more than a
#: usual gradient accumulation.
SOME_MOVED_AFTER, NONE_MOVED_AFTER = 4, 16


class UnsteppedCheck:
    """Called at each forward's start (an engine step check): compares the trainable
    parameters' version counters with the last forward's, and warns once if those S2A
    added never changed while others did, or if nothing trainable changed at all."""

    def __init__(self, model: nn.Module, added: set[int]) -> None:
        self.model, self.added = model, added
        self.last: dict[int, int] | None = None
        self.moved: set[int] = set()
        self.forwards = 0
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        trained = {id(p): p for p in self.model.parameters() if p.requires_grad}
        versions = {i: p._version for i, p in trained.items()}
        if self.last is not None:
            self.moved |= {i for i, v in versions.items() if self.last.get(i, v) != v}
        self.last = versions
        self.forwards += 1
        stuck = [i for i in trained if i in self.added and i not in self.moved]
        if self.forwards > SOME_MOVED_AFTER and self.moved and stuck:
            self._warn(stuck, "while the others trained")
        elif self.forwards > NONE_MOVED_AFTER and not self.moved and trained:
            self._warn(list(trained), "nor any other trainable parameter")
        elif self.forwards > NONE_MOVED_AFTER or (self.moved and not stuck):
            self.done = True

    def _warn(self, ids: list[int], others: str) -> None:
        self.done = True
        names = [n for n, p in self.model.named_parameters() if id(p) in set(ids)]
        warnings.warn(
            f"S2A: {len(names)} trainable parameters ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) have not changed in {self.forwards - 1} "
            f"steps, {others}: is the optimizer built before apply_s2a? It holds only the "
            "parameters that existed then. Build it after apply_s2a, over the parameters "
            "that require grad (said once).",
            stacklevel=2,
        )
