"""Operator recognition for the engine: what is running while autograd saves a tensor.

:class:`OperatorMode` (a ``TorchFunctionMode``) sees every torch call of a compressed forward
and records the recognised operator as a :class:`Call`, which the pack hook reads to choose a
quantizer; the rules that keep some saved tensors exact (weights in another form, reduced
statistics) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

from .ops import ElementwiseSpec

if TYPE_CHECKING:
    from .hooks import SavedTensorEngine

# Kinds whose operators also save reduced statistics (mean, rstd, logsumexp): those are tiny
# and precision-critical, so they are kept exact: tensors shaped like none of the op's inputs
# and smaller than the largest. Larger ones (the attention probabilities that SDPA's math path
# saves, with a float mask on CPU) are no statistics and are quantized like its inputs.
STATS_KINDS = ("norm", "attention")
#: Norms over the last dimension, given its size as ``normalized_shape`` (a one-entry shape).
ROW_NORMS = ("layer_norm", "native_layer_norm", "rms_norm")
#: Norms over each channel (dimension 1) across the batch: BatchNorm.
CHANNEL_NORMS = ("batch_norm", "native_batch_norm")


def foreign_autograd_context() -> bool:
    """True inside a backward pass (e.g. a checkpoint recomputing its region) or while other
    saved-tensor hooks are installed (activation checkpointing, ``save_on_cpu``).

    Only the innermost saved-tensor hooks apply, so pushing ours there would take tensors
    from the other owner; such regions are left to it, uncompressed.
    """
    return (
        torch._C._current_graph_task_id() != -1
        or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    )


def engine_saves(engine: SavedTensorEngine) -> bool:
    """True while the innermost saved-tensor hooks are ``engine``'s own."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and getattr(top[0], "__self__", None) is engine


def constant(t: torch.Tensor, weight_numels: set[int]) -> bool:
    """True for a floating tensor computed without autograd (nothing trained reaches it) with
    as many elements as a weight of the model: a weight in another form. A frozen embedding's
    output or the model's input is no weight: it is coded like any activation."""
    return (
        t.grad_fn is None
        and not t.requires_grad
        and t.is_floating_point()
        and t.numel() in weight_numels
    )


def statistics(t: torch.Tensor, call: Call) -> bool:
    """True for reduced statistics of a norm or attention op (see ``STATS_KINDS``)."""
    return tuple(t.shape) not in call.arg_shapes and t.numel() < call.arg_numel


@dataclass
class Call:
    """The recognised operator that is running while tensors get saved."""

    kind: str
    spec: ElementwiseSpec | None = None
    site: tuple | None = None
    arg_shapes: frozenset = frozenset()
    arg_numel: int = 0
    dim: int = -1
    #: A norm over each row of the last dimension alone (see ``quantizers.pack_norm``).
    rows: bool = False
    #: A norm over each channel across the batch (see ``quantizers.pack_norm``).
    channels: bool = False


class OperatorMode(TorchFunctionMode):
    """Records the operator being called, for the pack hook; otherwise transparent."""

    def __init__(self, engine: SavedTensorEngine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        engine = self.engine
        if engine._busy:
            return func(*args, **kwargs)
        info = engine._func_info(func)
        call = engine._classify(info, args, kwargs)
        rewrite = info[3]
        if rewrite is not None and not engine_saves(engine):
            # Inside another owner's saved-tensor hooks (a non-reentrant checkpoint) the
            # engine saves nothing, and the recomputation in backward runs without this
            # mode: a rewrite here would save other tensors than the recomputation.
            rewrite = None
        if call is None and rewrite is None:
            return func(*args, **kwargs)
        previous, engine._call = engine._call, call
        try:
            if rewrite is not None:
                result = rewrite(func, args, kwargs)
                if result is not NotImplemented:
                    return result
            return func(*args, **kwargs)
        finally:
            engine._call = previous
