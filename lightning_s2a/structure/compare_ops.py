"""Comparisons of tensors (``maximum``, ``minimum``, ``fmax``, ``fmin``, ``clamp`` with
tensor bounds), saving how their operands compare, in exact bits, instead of the operands.

PyTorch's backward of these compares its saved inputs again to route the gradient: all of it
to the side that won, half to each on a tie, and its own rules for NaNs and crossing bounds.
Coded in 4 bits, two values close to each other can swap order, and an element's whole
gradient goes to the wrong input (a float64 MLP's biases before ``torch.maximum`` of two
branches: 2.9% off). Only the order is needed, so these rewrites save each operand's rank
among the operands of its element (0, 1 or 2; ties equal; 3 for a NaN), two bools per
operand the engine packs to one exact bit each. Backward runs PyTorch's own op and backward
on stand-ins holding those ranks, which compare exactly as the operands did: the gradient is
PyTorch's bit for bit, whatever its rules (a first version wrote them out, and clamp with two
tensor bounds was 40% off at ties). Installed whenever the engine compresses, as the
extremum rewrites.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..engine.accounting import raw_as
from .frozen_ops import bind_args, plain_tensor

_aten = torch.ops.aten


def _ranks(operands: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each operand's rank among the (broadcast) operands of its element: how many of the
    others are smaller (ties rank alike, so every comparison comes out the same), 3 for NaN."""
    values = torch.broadcast_tensors(*operands)
    ranks = []
    for i, v in enumerate(values):
        rank = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
        for j, u in enumerate(values):
            if j != i:
                rank += u < v  # a NaN compares false: it counts for no one
        ranks.append(rank.masked_fill_(v.isnan(), 3))
    return ranks


def _stand_ins(masks: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
    """Tensors holding the saved ranks (two bit masks per operand), NaN for rank 3."""
    out = []
    for low, high in zip(masks[::2], masks[1::2], strict=True):
        rank = low.to(dtype) + 2 * high.to(dtype)
        out.append(rank.masked_fill_(low & high, float("nan")))
    return out


#: The op of each rewrite, on tensors: the forward's value and the stand-ins' backward.
Op = Callable[..., torch.Tensor]
_PAIRS: dict[str, Op] = {
    "maximum": _aten.maximum.default,
    "minimum": _aten.minimum.default,
    # NaN-ignoring: the other operand wins over a NaN (rank 3 stands in as NaN)
    "fmax": _aten.fmax.default,
    "fmin": _aten.fmin.default,
}
_PAIRS["max"], _PAIRS["min"] = _PAIRS["maximum"], _PAIRS["minimum"]


class _Ranked(torch.autograd.Function):
    """``op(*operands)``, saving the operands' ranks; backward is ``op``'s own backward on
    stand-ins of the ranks, summed back to each operand's own (unbroadcast) shape."""

    @staticmethod
    def forward(ctx, op, *operands):
        masks = []
        for rank in _ranks(list(operands)):
            masks += [(rank & 1).bool(), rank >= 2]
        # raw: PyTorch's op saves its operands (the other masks stand in for nothing)
        ctx.save_for_backward(raw_as(masks[0], *operands), *(raw_as(m) for m in masks[1:]))
        ctx.op, ctx.shapes = op, [t.shape for t in operands]
        return op(*operands)

    @staticmethod
    def backward(ctx, grad):
        needed = ctx.needs_input_grad[1:]
        # A backward called under inference_mode: the stand-ins' own graph is still recorded.
        with torch.inference_mode(False), torch.enable_grad():
            decoded = _stand_ins(ctx.saved_tensors, grad.dtype)
            stand_ins = [t.requires_grad_(need) for t, need in zip(decoded, needed, strict=True)]
            wanted = [t for t in stand_ins if t.requires_grad]
            out = ctx.op(*stand_ins)
            grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=grad.requires_grad))
        return None, *(
            next(grads).sum_to_size(shape) if need else None
            for need, shape in zip(needed, ctx.shapes, strict=True)
        )


def _worth_it(tensors: list) -> bool:
    """Plain real floating tensors of one dtype on one device, one of them needing a
    gradient: what the rewrite keeps exact (mixed dtypes promote, and a CPU scalar tensor
    beside a GPU one, which the ranks cannot compare: these run as they are)."""
    return (
        all(plain_tensor(t) and t.is_floating_point() for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and len({t.device for t in tensors}) == 1
        and any(t.requires_grad for t in tensors)
        and torch.is_grad_enabled()
    )


def routed_pair(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``torch.maximum``/``torch.minimum``, ``torch.fmax``/``torch.fmin`` and
    two-tensor ``max``/``min`` (and the tensor methods); in place, ``out=`` and other forms
    run as they are."""
    name = getattr(func, "__name__", "")
    bound = bind_args(args, kwargs, ("input", "other"), {})
    if name not in _PAIRS or bound is None:
        return NotImplemented
    a, b = bound["input"], bound["other"]
    if not _worth_it([a, b]):
        return NotImplemented
    return _Ranked.apply(_PAIRS[name], a, b)


def routed_clamp(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``clamp``/``clip``/``clamp_min``/``clamp_max`` with tensor bounds (number
    bounds have an exact 1-bit code of their own, see :mod:`..engine.ops`)."""
    name = getattr(func, "__name__", "")
    if name in ("clamp_min", "clamp_max"):
        bound = bind_args(args, kwargs, ("input", name[-3:]), {})
        if bound is not None:
            bound.setdefault("min", None)
            bound.setdefault("max", None)
    elif name in ("clamp", "clip"):
        bound = bind_args(args, kwargs, ("input", "min", "max"), {"min": None, "max": None})
    else:
        return NotImplemented
    if bound is None:
        return NotImplemented
    x, lo, hi = bound["input"], bound["min"], bound["max"]
    given = [t for t in (lo, hi) if t is not None]
    if not given or not _worth_it([x, *given]):
        return NotImplemented
    # the op PyTorch runs for the call, whose own backward the stand-ins get
    if name == "clamp_min":
        return _Ranked.apply(_aten.clamp_min.Tensor, x, lo)
    if name == "clamp_max":
        return _Ranked.apply(_aten.clamp_max.Tensor, x, hi)
    if lo is None:
        return _Ranked.apply(_clamp_below, x, hi)
    if hi is None:
        return _Ranked.apply(_clamp_above, x, lo)
    return _Ranked.apply(_aten.clamp.Tensor, x, lo, hi)


def _clamp_above(x: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``clamp(x, min=lo)``."""
    return _aten.clamp.Tensor(x, lo, None)


def _clamp_below(x: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp(x, max=hi)``."""
    return _aten.clamp.Tensor(x, None, hi)


COMPARE_REWRITES = {
    **dict.fromkeys(_PAIRS.keys() - {"max", "min"}, routed_pair),  # max/min: rewrites.py
    **dict.fromkeys(("clamp", "clip", "clamp_min", "clamp_max"), routed_clamp),
}
