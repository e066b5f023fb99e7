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

from .frozen_ops import bind_args

_REDUCE_ARGS = ("input", "dim", "keepdim")
_REDUCE_DEFAULTS: dict[str, Any] = {"dim": (), "keepdim": False}
_ATEN = {
    "amax": torch.ops.aten.amax.default,
    "amin": torch.ops.aten.amin.default,
    "max": torch.ops.aten.amax.default,  # a full reduction: its value is amax over all dims
    "min": torch.ops.aten.amin.default,
}


class _MaskedExtremum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, dims, keepdim, nan_hits):
        out = op(x, dims, keepdim)
        reduced = sorted(d % x.dim() for d in dims) if dims else list(range(x.dim()))
        full = out
        if not keepdim:
            for d in reduced:
                full = full.unsqueeze(d)
        mask = torch.ops.aten.eq.Tensor(x, full)
        if nan_hits:  # as PyTorch's full max/min: a NaN result's gradient goes to the NaNs
            mask |= x.isnan() & full.isnan()
        ctx.save_for_backward(mask)
        ctx.reduced, ctx.keepdim = reduced, keepdim
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if not ctx.keepdim:
            for d in ctx.reduced:
                grad = grad.unsqueeze(d)
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


_NORM_ARGS = {
    "linalg_vector_norm": ("input", "ord", "dim", "keepdim"),
    "linalg_norm": ("input", "ord", "dim", "keepdim"),
    "norm": ("input", "p", "dim", "keepdim"),
}


def masked_inf_norm(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of a vector norm of order +-inf (``linalg.vector_norm(x, ord=inf)``,
    ``x.norm(p=inf)``): the largest or smallest ``|x|``, with the same 1-bit mask.

    Its backward compares ``|x|`` with the saved norm just as ``amax`` does, and coded, the
    two no longer met: every gradient through it was NaN.
    """
    name = getattr(func, "__name__", "")
    names = _NORM_ARGS.get(name)
    kwargs = {k: v for k, v in kwargs.items() if not (k == "dtype" and v is None)}
    bound = bind_args(args, kwargs, names, {"dim": None, "keepdim": False}) if names else None
    if bound is None:
        return NotImplemented
    x, order, dim = bound["input"], bound[names[1]], bound["dim"]
    if (
        not isinstance(x, torch.Tensor)
        or not x.requires_grad
        or not isinstance(order, (int, float))
        or abs(order) != float("inf")
    ):
        return NotImplemented
    dims = () if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
    if name == "linalg_norm" and (len(dims) > 1 or (not dims and x.dim() > 1)):
        return NotImplemented  # a matrix norm
    reduce = torch.amax if order > 0 else torch.amin
    return masked_extremum(reduce, (x.abs(), dims, bound["keepdim"]), {})


#: Rewrites the engine needs for a correct gradient whenever it compresses.
EXTREMUM_REWRITES = {
    **{name: masked_extremum for name in _ATEN},
    **{name: masked_inf_norm for name in _NORM_ARGS},
}
