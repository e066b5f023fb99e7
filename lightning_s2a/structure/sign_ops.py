"""``abs`` and vector norms of order 1, saving the sign of their input in two exact bits.

PyTorch's backward of both is ``grad * sgn(x)`` from the saved input. Coded in 4 bits, an
element near zero decodes to the other side of it, or onto it: its sign flips, and with it
the whole of its gradient, however small the element (a bias before ``abs`` came out 34% off
at 4 bits). Only the sign is needed, so these rewrites save it: ``x > 0`` and ``x < 0``, two
bools the engine packs to one exact bit each (a zero or a NaN is neither: its gradient is 0,
as PyTorch's). The gradient is PyTorch's exactly, and a second derivative is right too: the
sign is constant wherever it is defined. Installed whenever the engine compresses, as the
extremum rewrites.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine.accounting import raw_as
from .frozen_ops import plain_grad_input


def save_sign(ctx: Any, x: torch.Tensor, *originals: torch.Tensor) -> None:
    """Save the sign of ``x`` as two masks; raw bytes count ``originals``, what PyTorch's op
    would have saved."""
    ctx.save_for_backward(raw_as(x > 0, *originals), raw_as(x < 0))


def saved_sign(ctx: Any, dtype: torch.dtype) -> torch.Tensor:
    """``sgn(x)`` from the masks :func:`save_sign` saved: 1, -1, or 0 (zero and NaN)."""
    positive, negative = ctx.saved_tensors
    return positive.to(dtype) - negative.to(dtype)


class _SignedAbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        save_sign(ctx, x, x)  # raw: PyTorch's abs saves x
        return torch.ops.aten.abs.default(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * saved_sign(ctx, grad.dtype)


def signed_abs(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``torch.abs``/``torch.absolute`` (and the tensor methods) on a real floating
    tensor that needs a gradient; in place, ``out=``, complex input and subclasses run as they
    are."""
    if getattr(func, "__name__", "") not in ("abs", "absolute") or len(args) != 1 or kwargs:
        return NotImplemented
    (x,) = args
    if not plain_grad_input(x):
        return NotImplemented
    return _SignedAbs.apply(x)


class SignedL1Norm(torch.autograd.Function):
    """``sum |x|`` over ``dims`` (all for ``[]``), saving the sign of ``x``."""

    @staticmethod
    def forward(ctx, x, dims, keepdim):
        out = torch.ops.aten.linalg_vector_norm.default(x, 1, dims or None, keepdim)
        save_sign(ctx, x, x, out)  # raw: PyTorch's norm saves x and its result
        ctx.reduced = sorted(d % x.dim() for d in dims) if dims else list(range(x.dim()))
        ctx.keepdim = keepdim
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.keepdim:
            for d in ctx.reduced:
                grad = grad.unsqueeze(d)
        return grad * saved_sign(ctx, grad.dtype), None, None


SIGN_REWRITES = {"abs": signed_abs, "absolute": signed_abs}
