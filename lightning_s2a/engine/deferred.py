"""Read "does the code hold this tensor" answers from the device without stalling its queue.

A min-max or derivative code cannot hold a NaN, an infinity or a value beyond its fp16
statistics; such a tensor is kept as it is (:mod:`.quantizers`). The answer is computed on the
tensor's device, and ``bool()`` of a CUDA tensor waits for every kernel queued so far: one
stall per saved tensor, which would leave a GPU idle while Python catches up.

So on CUDA each answer is copied to pinned host memory asynchronously, with an event behind
it, and the tensor itself stays alive beside its codes until the answer is read:

* at every later pack, answers whose events have completed are read (no waiting);
* at most ``lag`` answers stay open: past that, the oldest is waited for, so at most ``lag``
  uncompressed tensors are alive beyond what autograd keeps (the host may still run ``lag``
  saved tensors ahead of the GPU);
* when the forward ends, the rest are read (one wait per forward), so ``stats()`` is exact.

On CPU there is nothing to overlap: answers are read at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

Resolved = Callable[[Any], None]
"""Called with the packed object once its answer is read (the engine counts its bytes then)."""


def record_answer(holds: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start reading ``holds``: an asynchronous copy to pinned memory and an event behind it
    on CUDA; on other devices the value itself, ready now."""
    if holds.device.type != "cuda":
        return holds, None
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(holds, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(holds.device))
    return host, event


class DeferredChecks:
    """Open answers of packed objects (``Packed.holds``), read in order as the device gets there."""

    def __init__(self, lag: int = 4, record: Callable[[torch.Tensor], tuple] | None = None):
        """``record(holds) -> (host_value, event_or_None)`` starts reading an answer (the
        default copies a CUDA answer to pinned memory behind an event)."""
        self.lag = lag
        self.record = record or record_answer
        self._open: deque[tuple[Any, torch.Tensor, Any, Resolved]] = deque()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, packed: Any, resolved: Resolved) -> None:
        """Track ``packed`` (its ``holds`` is set); ``resolved(packed)`` runs once it is read."""
        host, event = self.record(packed.holds)
        self._open.append((packed, host, event, resolved))
        self.poll()

    def poll(self) -> None:
        """Read every answer that is ready, and wait for the oldest beyond ``lag``."""
        while self._open:
            packed, host, event, resolved = self._open[0]
            if event is not None and not event.query():
                if len(self._open) <= self.lag:
                    return
                event.synchronize()
            self._open.popleft()
            packed.resolve(bool(host))
            resolved(packed)

    def flush(self) -> None:
        """Read every open answer, waiting where needed (the end of a forward)."""
        while self._open:
            packed, host, event, resolved = self._open.popleft()
            if event is not None:
                event.synchronize()
            packed.resolve(bool(host))
            resolved(packed)
