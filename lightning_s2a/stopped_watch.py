"""The watch ``S2AHandle.stop_engine(watch=True)`` puts on the trainable parameters: the
first backward that reaches them while the engine is stopped says so (a plain fit after an
S2A fit trains biases only, uncompressed)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .api import S2AHandle


class StoppedWatch:
    """The gradient hook of :meth:`S2AHandle.stop_engine` with ``watch=True``, on each
    trainable parameter; a copy of the model gets one that watches nothing (as it gets no
    handle), should a copy carry it."""

    def __init__(self, handle: S2AHandle | None) -> None:
        # Weakly: tensor hooks live in C++, where the garbage collector cannot see a cycle
        # through them, and the handle holds the model (an armed model was never freed).
        self.handle = None if handle is None else weakref.ref(handle)

    def __call__(self, param: torch.Tensor) -> None:
        handle = None if self.handle is None else self.handle()
        # A backward of a model in eval mode trains nothing (saliency, adversarial inputs).
        if handle is not None and handle._stopped_watch and handle.model.training:
            handle._warn_stopped()

    def __deepcopy__(self, memo: dict) -> StoppedWatch:
        return StoppedWatch(None)

    def __reduce__(self) -> tuple:
        return (StoppedWatch, (None,))
