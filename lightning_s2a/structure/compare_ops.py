"""Comparisons of two tensors (``maximum``, ``minimum``, ``clamp`` with tensor bounds), saving
which side each element took, in exact bits, instead of both tensors.

PyTorch's backward of these compares its saved inputs again to route the gradient: all of it
to the side that won, half to each on a tie. Coded in 4 bits, two values close to each other
can swap order, and an element's whole gradient goes to the wrong input (a float64 MLP's
biases before ``torch.maximum`` of two branches: 2.9% off). Only the comparison is needed, so
these rewrites save it, one bool per outcome the backward tells apart (2 or 3 bits per element
of the output), and give PyTorch's gradient exactly: ties, NaNs, broadcasting and a clamp
whose bounds cross included. Installed whenever the engine compresses, as the extremum
rewrites.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..engine.accounting import raw_as
from .frozen_ops import bind_args

_aten = torch.ops.aten

#: ``(forward, weights)`` of one comparison: ``forward(*inputs)`` gives the output and the
#: masks to save; ``weights(masks, dtype)`` gives each input's share of the gradient.
Route = tuple[Callable[..., tuple[torch.Tensor, list]], Callable[..., list]]


def _pair_masks(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    return [a < b, a == b, a > b]


def _pair_weights(masks: tuple, dtype: torch.dtype, larger: bool) -> list[torch.Tensor]:
    """``maximum``'s backward: the winner takes the gradient, a tie halves it, and where a
    NaN compares false both ways each input takes all of it."""
    lt, eq, gt = (m.to(dtype) for m in masks)
    a_loses, b_loses = (lt, gt) if larger else (gt, lt)
    half = eq.mul(0.5)
    return [1 - a_loses - half, 1 - b_loses - half]


_PAIRS: dict[str, Route] = {
    "maximum": (
        lambda a, b: (_aten.maximum.default(a, b), _pair_masks(a, b)),
        lambda m, dtype: _pair_weights(m, dtype, larger=True),
    ),
    "minimum": (
        lambda a, b: (_aten.minimum.default(a, b), _pair_masks(a, b)),
        lambda m, dtype: _pair_weights(m, dtype, larger=False),
    ),
}
_PAIRS["max"], _PAIRS["min"] = _PAIRS["maximum"], _PAIRS["minimum"]


def _clamp_route(has_min: bool, has_max: bool) -> Route:
    """PyTorch's ``clamp`` backward with tensor bounds. With both: the input's gradient
    passes where ``min <= x <= max``; ``min`` takes it where ``x < min`` (and ``min < max``),
    ``max`` where ``x > max`` (or the bounds cross, which gives ``max``). With one bound it
    is ``maximum``'s (``minimum``'s) backward: a tie halves it, a NaN gives it to both."""

    def forward(x, lo, hi):
        out = _aten.clamp.Tensor(x, lo, hi)
        if has_min and has_max:
            inside = (x >= lo) & (x <= hi)
            return out, [inside, (x < lo) & (lo < hi), (x > hi) | (hi < lo)]
        return out, _pair_masks(x, lo if has_min else hi)

    def weights(masks, dtype):
        if has_min and has_max:
            return [m.to(dtype) for m in masks]
        w_x, w_bound = _pair_weights(masks, dtype, larger=has_min)
        return [w_x, w_bound, None] if has_min else [w_x, None, w_bound]

    return forward, weights


_CLAMPS = {
    (lo, hi): _clamp_route(lo, hi) for lo, hi in ((True, True), (True, False), (False, True))
}


class _Routed(torch.autograd.Function):
    """Runs a :data:`Route`'s forward and saves its masks; backward gives each tensor input
    its share of the gradient, summed back to its own (unbroadcast) shape."""

    @staticmethod
    def forward(ctx, route, *inputs):
        out, masks = route[0](*inputs)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        # raw: PyTorch's op saves its tensor inputs (the other masks stand in for nothing)
        ctx.save_for_backward(raw_as(masks[0], *tensors), *(raw_as(m) for m in masks[1:]))
        ctx.route = route
        ctx.shapes = [t.shape if isinstance(t, torch.Tensor) else None for t in inputs]
        return out

    @staticmethod
    def backward(ctx, grad):
        weights = ctx.route[1](ctx.saved_tensors, grad.dtype)
        grads = [
            None if w is None or shape is None or not needed else (grad * w).sum_to_size(shape)
            for w, shape, needed in zip(weights, ctx.shapes, ctx.needs_input_grad[1:], strict=True)
        ]
        return None, *grads


def _plain_float(t: Any) -> bool:
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and t.is_floating_point()
    )


def _worth_it(tensors: list) -> bool:
    """Plain real floating tensors of one dtype, one of them needing a gradient: what the
    rewrite keeps exact (mixed dtypes promote, and run as they are)."""
    return (
        all(_plain_float(t) for t in tensors)
        and len({t.dtype for t in tensors}) == 1
        and any(t.requires_grad for t in tensors)
        and torch.is_grad_enabled()
    )


def routed_pair(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``torch.maximum``/``torch.minimum`` and two-tensor ``max``/``min`` (and
    the tensor methods); in place, ``out=`` and other forms run as they are."""
    name = getattr(func, "__name__", "")
    bound = bind_args(args, kwargs, ("input", "other"), {})
    if name not in _PAIRS or bound is None:
        return NotImplemented
    a, b = bound["input"], bound["other"]
    if not _worth_it([a, b]):
        return NotImplemented
    return _Routed.apply(_PAIRS[name], a, b)


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
    return _Routed.apply(_CLAMPS[lo is not None, hi is not None], x, lo, hi)


COMPARE_REWRITES = {
    **dict.fromkeys(("maximum", "minimum"), routed_pair),
    **dict.fromkeys(("clamp", "clip", "clamp_min", "clamp_max"), routed_clamp),
}
