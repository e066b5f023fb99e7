"""Elementwise nonlinearities: what each saves for backward and its derivative in terms of
that saved value (:class:`ElementwiseSpec`), keyed by function name in :data:`ELEMENTWISE`.

The derivative-aware codes approximate ``derivative``; ops whose derivative takes at most two
values (ReLU, LeakyReLU, ReLU6, hardsigmoid, threshold, clamp, hard- and softshrink, PReLU
with a frozen slope, RReLU in eval) carry an exact 1-bit ``mask``. Part of the operator
table of :mod:`.ops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Derivative = Callable[[torch.Tensor], torch.Tensor]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class ElementwiseSpec:
    """How an elementwise op's backward uses its saved tensor ``s``: ``grad_in = grad * d(s)``.

    ``name`` identifies the function *and* its hyper-parameters, so codebooks fitted for
    ``gelu`` and ``gelu(tanh)`` never mix. Either ``derivative`` is set (smooth: approximated by
    a fitted derivative-aware code) or ``mask`` and ``mask_points`` are (exact 1-bit code:
    ``mask(s)`` says which side of the step ``s`` is on, and unpack returns
    ``mask_points[mask]``, a value with the same derivative).
    """

    name: str
    derivative: Derivative | None = None
    mask: Callable[[torch.Tensor], torch.Tensor] | None = None
    mask_points: tuple[float, float] = (0.0, 0.0)
    #: Where ``derivative`` jumps (Hardswish at +-3, ELU with alpha != 1 at 0): codebooks may
    #: put an interval boundary exactly there, so no interval straddles a jump.
    jumps: tuple[float, ...] = ()

    @property
    def exact(self) -> bool:
        """True if the op's derivative is a two-valued step, stored exactly in one bit."""
        return self.mask is not None


def _gelu_d(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / _SQRT2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh_d(x: torch.Tensor) -> torch.Tensor:
    inner = _TANH_K * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _TANH_K * (1.0 + 3 * 0.044715 * x * x)


def _silu_d(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _mish_d(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(torch.nn.functional.softplus(x))
    return t + x * torch.sigmoid(x) * (1.0 - t * t)


def _hardswish_d(x: torch.Tensor) -> torch.Tensor:
    # As PyTorch's backward: 0 at and below -3, 1 at and above 3.
    mid = x / 3.0 + 0.5
    return torch.where(
        x <= -3.0, torch.zeros_like(x), torch.where(x < 3.0, mid, torch.ones_like(x))
    )


#: The float32 just below 3: an element equal to a boundary counts below it, and Hardswish's
#: derivative at exactly 3 is the upper side's (1), at exactly -3 the lower side's (0).
_BELOW_3 = float(torch.nextafter(torch.tensor(3.0), torch.tensor(0.0)))


def call_arg(args: tuple, kwargs: Mapping[str, Any], pos: int, name: str, default: Any) -> Any:
    """A call's argument, given by keyword or at its position, else ``default``."""
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


def _is_inplace(name: str, args: tuple, kwargs: Mapping[str, Any], pos: int) -> bool:
    return name.endswith("_") or bool(call_arg(args, kwargs, pos, "inplace", False))


def _gelu(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec:
    if call_arg(a, k, 1, "approximate", "none") == "tanh":
        return ElementwiseSpec("gelu(tanh)", derivative=_gelu_tanh_d)
    return ElementwiseSpec("gelu", derivative=_gelu_d)


def _elu_family(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec:
    base = n.rstrip("_")
    if base == "selu":
        alpha, scale, in_scale = 1.6732632423543772, 1.0507009873554805, 1.0
    elif base == "celu":
        alpha = float(call_arg(a, k, 1, "alpha", 1.0))
        scale, in_scale = 1.0, 1.0 / alpha
    else:
        alpha, scale, in_scale = float(call_arg(a, k, 1, "alpha", 1.0)), 1.0, 1.0
    pos_inplace = 1 if base == "selu" else 2
    # At 0 the derivative goes from scale * alpha * in_scale (left) to scale (right).
    jump = () if alpha * in_scale == 1.0 else (0.0,)
    if _is_inplace(n, a, k, pos_inplace):
        # In-place variants save the result y; for y <= 0: d = in_scale * (y + scale * alpha).
        def d_out(y: torch.Tensor) -> torch.Tensor:
            return torch.where(y > 0, torch.full_like(y, scale), in_scale * (y + scale * alpha))

        return ElementwiseSpec(
            f"{base}_out({alpha:g},{scale:g},{in_scale:g})", derivative=d_out, jumps=jump
        )

    def d_in(x: torch.Tensor) -> torch.Tensor:
        neg = scale * alpha * in_scale * torch.exp(torch.clamp(x, max=0.0) * in_scale)
        return torch.where(x > 0, torch.full_like(x, scale), neg)

    return ElementwiseSpec(f"{base}({alpha:g},{scale:g},{in_scale:g})", derivative=d_in, jumps=jump)


def _softplus(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec:
    beta = float(call_arg(a, k, 1, "beta", 1.0))
    threshold = float(call_arg(a, k, 2, "threshold", 20.0))

    def d(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(x * beta))

    # Above the threshold the derivative is 1, below sigmoid(threshold): a jump.
    return ElementwiseSpec(
        f"softplus({beta:g},{threshold:g})", derivative=d, jumps=(threshold / beta,)
    )


def _hardtanh(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec:
    if n.rstrip("_") == "relu6":
        lo, hi = 0.0, 6.0
    else:
        lo = float(call_arg(a, k, 1, "min_val", -1.0))
        hi = float(call_arg(a, k, 2, "max_val", 1.0))
    # Backward passes the gradient where lo < s < hi (s is the input, or the clamped output).
    # At a NaN, PyTorch's own kernel disagrees with itself (its vectorized loop zeroes the
    # gradient, its scalar loop passes it): the code follows the vectorized loop.
    return ElementwiseSpec(
        f"hardtanh({lo:g},{hi:g})",
        mask=lambda s: (s > lo) & (s < hi),
        mask_points=(hi + 1.0, (lo + hi) / 2.0),
    )


def _threshold(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec:
    th = float(call_arg(a, k, 1, "threshold", 0.0))
    # Backward zeroes the gradient where s <= th and passes it elsewhere, NaN included, so
    # the code marks "at or below" (a NaN is not), as ReLU's does.
    return ElementwiseSpec(
        f"threshold({th:g})",
        mask=lambda s: s <= th,
        mask_points=(th + 1.0 + abs(th), th - 1.0 - abs(th)),
    )


def _clamp(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec | None:
    """``clamp``/``clip``/``clamp_min``/``clamp_max`` with number bounds (with tensor bounds
    a rewrite saves the comparison: :mod:`..structure.compare_ops`): backward passes the
    gradient strictly inside the bounds, NaN not, so a 1-bit mask of the saved input (or, in
    place, the clamped output) is exact."""
    name = n.rstrip("_")
    lo = None if name == "clamp_max" else call_arg(a, k, 1, "min", None)
    hi = (
        None
        if name == "clamp_min"
        else call_arg(a, k, 1 if name == "clamp_max" else 2, "max", None)
    )
    if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
        return None
    low = -math.inf if lo is None else float(lo)
    high = math.inf if hi is None else float(hi)

    # Decode points well inside and outside, by a margin that low precision keeps apart from
    # the bound (a 16th of it: float16's clamp(max=65504) would round 65503 onto it); the
    # quantizer checks them in the tensor's dtype and keeps the tensor exact where they fail.
    def margin(b: float) -> float:
        return max(1.0, abs(b) / 16.0)

    if math.isfinite(low) and math.isfinite(high):
        points = (high + margin(high), low / 2.0 + high / 2.0)
    elif math.isfinite(high):
        points = (high + margin(high), high - margin(high))
    elif math.isfinite(low):
        points = (low - margin(low), low + margin(low))
    else:
        points = (math.nan, 0.0)  # nothing is outside (-inf, inf) but NaN
    # One bound compares once (an infinity on the open side passes its gradient); two
    # compare both ways, an infinite one included, as PyTorch's backward does.
    if lo is None:
        mask = lambda s: s < high  # noqa: E731
    elif hi is None:
        mask = lambda s: s > low  # noqa: E731
    else:
        mask = lambda s: (s > low) & (s < high)  # noqa: E731
    return ElementwiseSpec(
        f"clamp({low:g},{high:g},{lo is None},{hi is None})", mask=mask, mask_points=points
    )


def _shrink(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec:
    """Hardshrink and softshrink: backward zeroes the gradient where ``-lambd <= s <= lambd``
    (s the saved input) and passes it elsewhere. At a NaN PyTorch disagrees with itself (its
    CUDA kernel and CPU scalar loop pass the gradient, its vectorized CPU loop zeroes it):
    the code follows CUDA."""
    lambd = float(call_arg(a, k, 1, "lambd", 0.5))
    return ElementwiseSpec(
        f"shrink({lambd:g})",
        mask=lambda s: ~((s >= -lambd) & (s <= lambd)),
        mask_points=(0.0, lambd + 1.0 + abs(lambd)),
    )


def _prelu(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec | None:
    """PReLU with a frozen slope: backward scales the gradient by 1 or the slope, by the sign
    of the saved input, as leaky ReLU does. A slope that trains needs the input's values."""
    weight = call_arg(a, k, 1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        return None
    return _LEAKY


def _rrelu(n: str, a: tuple, k: Mapping[str, Any]) -> ElementwiseSpec | None:
    """RReLU in eval: leaky ReLU with the mean slope. In training its backward reads the
    random slopes it saved, and the input is coded as any other tensor."""
    return None if call_arg(a, k, 3, "training", False) else _LEAKY


def _fixed(spec: ElementwiseSpec) -> Callable[[str, tuple, Mapping[str, Any]], ElementwiseSpec]:
    return lambda n, a, k: spec


# ReLU's backward zeroes the gradient where its output is <= 0 and passes it elsewhere, NaN
# included: the code marks "<= 0", so a NaN decodes to 1 and its gradient passes as in PyTorch.
_RELU = ElementwiseSpec("relu", mask=lambda s: s <= 0, mask_points=(1.0, 0.0))
_LEAKY = ElementwiseSpec("leaky_relu", mask=lambda s: s > 0, mask_points=(-1.0, 1.0))
_HARDSIGMOID = ElementwiseSpec(
    "hardsigmoid", mask=lambda s: (s > -3.0) & (s < 3.0), mask_points=(4.0, 0.0)
)

#: Elementwise nonlinearities: function name -> factory ``(name, args, kwargs) -> spec``.
ELEMENTWISE: dict[str, Callable[[str, tuple, Mapping[str, Any]], ElementwiseSpec]] = {
    "gelu": _gelu,
    "silu": _fixed(ElementwiseSpec("silu", derivative=_silu_d)),
    "mish": _fixed(ElementwiseSpec("mish", derivative=_mish_d)),
    "hardswish": _fixed(
        ElementwiseSpec("hardswish", derivative=_hardswish_d, jumps=(-3.0, _BELOW_3))
    ),
    # tanh and sigmoid save their *output* y; the derivative is written in terms of y.
    "tanh": _fixed(ElementwiseSpec("tanh", derivative=lambda y: 1.0 - y * y)),
    "sigmoid": _fixed(ElementwiseSpec("sigmoid", derivative=lambda y: y * (1.0 - y))),
    "elu": _elu_family,
    "selu": _elu_family,
    "celu": _elu_family,
    "softplus": _softplus,
    "relu": _fixed(_RELU),
    "leaky_relu": _fixed(_LEAKY),
    "relu6": _hardtanh,
    "hardtanh": _hardtanh,
    "hardsigmoid": _fixed(_HARDSIGMOID),
    "threshold": _threshold,
    "_threshold": _threshold,  # F.threshold's __name__
    "hardshrink": _shrink,
    "softshrink": _shrink,
    "prelu": _prelu,
    "rrelu": _rrelu,
    **{n: _clamp for n in ("clamp", "clip", "clamp_min", "clamp_max")},
}
