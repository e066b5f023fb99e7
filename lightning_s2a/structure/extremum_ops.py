"""Extremum reductions (``amax``, ``amin``, full ``max``/``min``) that keep a 1-bit mask.

PyTorch's backward of these compares its saved input with its saved output
(``grad * (x == out) / count``). Quantizing either breaks that equality: ``count`` becomes 0
and the gradient NaN (timm's Hiera pools tokens this way). Only the mask ``x == out`` is needed,
so these rewrites save that, a bool the engine packs to one exact bit per element: the
gradient is PyTorch's exactly, and the input and output are not kept at all.

The engine installs them whenever it compresses, with or without the structural surgery,
because without them compression gives a wrong gradient. ``torch.max(x, dim)`` saves indices,
not values, and is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine.accounting import raw_as
from .frozen_ops import bind_args
from .sign_ops import SignedL1Norm

_REDUCE_ARGS = ("input", "dim", "keepdim")
_REDUCE_DEFAULTS: dict[str, Any] = {"dim": (), "keepdim": False}
_ATEN = {
    "amax": torch.ops.aten.amax.default,
    "amin": torch.ops.aten.amin.default,
    "max": torch.ops.aten.amax.default,  # a full reduction: its value is amax over all dims
    "min": torch.ops.aten.amin.default,
}


def _reduced(x: torch.Tensor, dims: list[int]) -> list[int]:
    """The dimensions a reduction over ``dims`` removes, sorted and non-negative (all for
    ``dims == []``)."""
    return sorted(d % x.dim() for d in dims) if dims else list(range(x.dim()))


def _unreduce(t: torch.Tensor, reduced: list[int], keepdim: bool) -> torch.Tensor:
    """``t`` (a reduction's output, or its gradient) with the reduced dimensions back as 1s."""
    if not keepdim:
        for d in reduced:
            t = t.unsqueeze(d)
    return t


class _MaskedExtremum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, dims, keepdim, nan_hits):
        out = op(x, dims, keepdim)
        reduced = _reduced(x, dims)
        full = _unreduce(out, reduced, keepdim)
        mask = torch.ops.aten.eq.Tensor(x, full)
        if nan_hits:  # as PyTorch's full max/min: a NaN result's gradient goes to the NaNs
            mask |= x.isnan() & full.isnan()
        ctx.save_for_backward(raw_as(mask, x, out))  # raw: PyTorch's op saves x and out
        ctx.reduced, ctx.keepdim = reduced, keepdim
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grad = _unreduce(grad, ctx.reduced, ctx.keepdim)
        hits = mask.to(grad.dtype)
        count = hits.sum(dim=ctx.reduced, keepdim=True) if ctx.reduced else hits
        return hits * (grad / count), None, None, None, None


def masked_extremum(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``amax``/``amin`` (and argument-less ``max``/``min``) saving ``x == out``."""
    name = getattr(func, "__name__", "")
    if name in ("max", "min"):
        if len(args) != 1 or kwargs:  # max(x, dim), max(x, other): not a full reduction
            return NotImplemented
        bound: dict[str, Any] | None = {"input": args[0], "dim": (), "keepdim": False}
    else:
        bound = bind_args(args, kwargs, _REDUCE_ARGS, _REDUCE_DEFAULTS)
    if bound is None:
        return NotImplemented
    x, dim = bound["input"], bound["dim"]
    dims = (dim,) if isinstance(dim, int) else dim
    if (
        type(x) is not torch.Tensor
        or x.layout != torch.strided
        or not x.is_floating_point()
        or x.dim() == 0
        or not x.requires_grad
        or not torch.is_grad_enabled()
        or not isinstance(dims, (tuple, list, torch.Size))
        or not all(isinstance(d, int) for d in dims)
        or not isinstance(bound["keepdim"], bool)
    ):
        return NotImplemented
    full = name in ("max", "min")
    return _MaskedExtremum.apply(x, _ATEN[name], list(dims), bound["keepdim"], full)


class _MaskedInfNorm(torch.autograd.Function):
    """``max |x|`` or ``min |x|`` over ``dims``, saving two exact bits per element: where
    ``|x|`` is the norm (and not 0), and the sign of ``x`` there."""

    @staticmethod
    def forward(ctx, x, op, dims, keepdim):
        out = op(x.abs(), dims, keepdim)
        reduced = _reduced(x, dims)
        full = _unreduce(out, reduced, keepdim)
        hits = torch.ops.aten.eq.Tensor(x.abs(), full) & (x != 0)  # sgn(0) = 0, as PyTorch
        ctx.save_for_backward(raw_as(hits, x, out), raw_as(x > 0))
        ctx.reduced, ctx.keepdim = reduced, keepdim
        return out

    @staticmethod
    def backward(ctx, grad):
        hits, positive = ctx.saved_tensors
        grad = _unreduce(grad, ctx.reduced, ctx.keepdim)
        weights = hits.to(grad.dtype)
        count = weights.sum(dim=ctx.reduced, keepdim=True).clamp_min(1)
        sign = positive.to(grad.dtype).mul_(2).sub_(1)
        return weights * sign * (grad / count), None, None, None


_NORM_ARGS = {
    "linalg_vector_norm": ("input", "ord", "dim", "keepdim", "out", "dtype"),
    "linalg_norm": ("input", "ord", "dim", "keepdim", "out", "dtype"),
    "norm": ("input", "p", "dim", "keepdim", "out", "dtype"),
}
_NORM_DEFAULTS: dict[str, Any] = {"dim": None, "keepdim": False, "out": None, "dtype": None}


def masked_norm(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of a vector norm of order +-inf (``linalg.vector_norm(x, ord=inf)``,
    ``x.norm(p=inf)``, ``torch.norm(x, p=inf, dim=...)``): the largest or smallest ``|x|``;
    and of order 1 (``sum |x|``).

    Its backward compares ``|x|`` with the saved norm just as ``amax`` does, and takes the
    sign of ``x`` there: coded, the two no longer met (every gradient through it was NaN), and
    near zero the sign flips (the element that sets a ``-inf`` norm is the smallest). Two
    exact bits per element are saved instead: where ``|x|`` is the norm, and its sign. Order
    1's backward is the sign of ``x`` alone, saved in two exact bits
    (:class:`.sign_ops.SignedL1Norm`).
    """
    name = getattr(func, "__name__", "")
    names = _NORM_ARGS.get(name)
    bound = bind_args(args, kwargs, names, _NORM_DEFAULTS) if names else None
    if bound is None or bound["out"] is not None:
        return NotImplemented
    x, order, dim, dtype = bound["input"], bound[names[1]], bound["dim"], bound["dtype"]
    if (
        type(x) is not torch.Tensor
        or x.layout != torch.strided
        or not x.requires_grad
        or not isinstance(order, (int, float))
        or abs(order) not in (1, float("inf"))
        or not isinstance(bound["keepdim"], bool)
    ):
        return NotImplemented
    dims = () if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
    if not all(isinstance(d, int) for d in dims):
        return NotImplemented
    if name == "linalg_norm" and (len(dims) > 1 or (not dims and x.dim() > 1)):
        return NotImplemented  # a matrix norm
    if dtype is not None:
        x = x.to(dtype)  # as the norm does first (saves nothing)
    if not x.is_floating_point() or x.dim() == 0:
        return NotImplemented
    if order == 1:
        return SignedL1Norm.apply(x, list(dims), bound["keepdim"])
    if order == -1:  # a harmonic mean of |x|: its backward needs the values
        return NotImplemented
    reduce = torch.ops.aten.amax.default if order > 0 else torch.ops.aten.amin.default
    return _MaskedInfNorm.apply(x, reduce, list(dims), bound["keepdim"])


def normalize_masked(func: Any, args: tuple, kwargs: dict) -> Any:
    """``F.normalize(x, p=+-inf)`` and ``p=1``: ``x`` over its norm (from
    :func:`masked_norm`) clamped to ``eps``, as ``F.normalize`` computes it; other orders
    run as they are."""
    bound = bind_args(
        args,
        kwargs,
        ("input", "p", "dim", "eps", "out"),
        {"p": 2.0, "dim": 1, "eps": 1e-12, "out": None},
    )
    if bound is None or bound["out"] is not None:
        return NotImplemented
    x, p, dim = bound["input"], bound["p"], bound["dim"]
    if not isinstance(p, (int, float)) or p not in (1, float("inf"), -float("inf")):
        return NotImplemented
    if not isinstance(dim, int):
        return NotImplemented
    norm = masked_norm(torch.linalg.vector_norm, (x,), {"ord": p, "dim": dim, "keepdim": True})
    if norm is NotImplemented:
        return NotImplemented
    return x / norm.clamp_min(bound["eps"]).expand_as(x)


#: Rewrites the engine needs for a correct gradient whenever it compresses.
EXTREMUM_REWRITES = {
    **{name: masked_extremum for name in _ATEN},
    **{name: masked_norm for name in _NORM_ARGS},
    "normalize": normalize_masked,
}
