"""``sin`` and ``cos`` that save their derivative instead of their input.

PyTorch's backward of ``sin(x)`` computes ``cos(x)`` from the saved input. Coded in 4 bits over
a span of many radians (SIREN's ``sin(30 W x)``, Fourier features), the input's step is a
radian or more, and ``cos`` of the decoded value is noise: a SIREN's gradient fell to cosine
0.86 against PyTorch's. These rewrites save the derivative itself (``cos(x)``, or ``-sin(x)``
for ``cos``), bounded in [-1, 1], which codes like any activation; the gradient is
``grad * derivative``, PyTorch's formula. A backward with ``create_graph=True`` is refused, as
for derivative codes: the saved derivative is a constant to autograd, so a second derivative
through it would be silently missing. Installed whenever the engine compresses, as the
extremum rewrites.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine.accounting import raw_as
from ..engine.packed import SECOND_ORDER_ERROR
from .frozen_ops import plain_grad_input

_ATEN = {"sin": torch.ops.aten.sin.default, "cos": torch.ops.aten.cos.default}


def _derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "sin":
        return torch.ops.aten.cos.default(x)
    return torch.ops.aten.neg.default(torch.ops.aten.sin.default(x))


class _SavedDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name):
        ctx.save_for_backward(raw_as(_derivative(name, x), x))  # raw: PyTorch's saves x
        return _ATEN[name](x)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(SECOND_ORDER_ERROR.replace("(tanh,", "(sin, cos, tanh,"))
        (derivative,) = ctx.saved_tensors
        return grad * derivative, None


def periodic(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``torch.sin``/``torch.cos`` (and the tensor methods) on a real floating
    tensor that needs a gradient; anything else (in place, ``out=``, complex, subclasses) runs
    as it is."""
    name = getattr(func, "__name__", "")
    if name not in _ATEN or len(args) != 1 or kwargs:
        return NotImplemented
    (x,) = args
    if not plain_grad_input(x):
        return NotImplemented
    return _SavedDerivative.apply(x, name)


PERIODIC_REWRITES = {name: periodic for name in _ATEN}
