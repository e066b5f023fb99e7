"""Activation-free replacements for operators whose weights are frozen.

With a frozen backbone, several operators save tensors for backward that backward never needs:

* a convolution with a frozen weight saves its *input*, yet the input's gradient only needs the
  weight (it is a transposed convolution of the output gradient), and the bias' gradient is a
  plain sum of the output gradient;
* batch norm with running statistics (eval mode) is the affine map ``x * scale + shift``, yet
  ``F.batch_norm`` saves its input;
* dropout with ``p == 0`` or ``training=False`` is the identity.

The engine's ``TorchFunctionMode`` looks up a *rewrite* here by the intercepted function's
``__name__`` and calls it with ``(func, args, kwargs)`` exactly as the caller passed them. A
rewrite returns the replacement result, or ``NotImplemented`` to decline, in which case the
original call runs. Rewrites are called while the mode is disabled, so plain torch calls inside
them are not intercepted again. Every rewrite computes the same values and gradients as the
call it replaces, up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .derived_weights import rebuild_of, standardized_weight
from .four_bit import rebuild_from, source_of

Rewrite = Callable[[Any, tuple, dict], Any]
"""``rewrite(func, args, kwargs)`` returns the replacement result or ``NotImplemented``."""

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
}
_CONV_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}

# ``F.batch_norm`` and the ATen ``torch.batch_norm`` it calls share a ``__name__`` but not an
# argument order; when the engine declines the first it sees the second.
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}
_ATEN_BN_ARGS = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)

_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_DROPOUT_DEFAULTS: dict[str, Any] = {"p": 0.5, "training": True, "inplace": False}


def bind_args(
    args: tuple, kwargs: dict, names: Sequence[str], defaults: dict[str, Any]
) -> dict[str, Any] | None:
    """Map positional and keyword arguments onto ``names``; ``None`` when they do not fit."""
    if len(args) > len(names):
        return None
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names or names.index(key) < len(args):
            return None  # unknown name, or given twice
        bound[key] = value
    if any(name not in bound for name in names):
        return None
    return bound


def plain_tensor(t: Any) -> bool:
    """True for a dense tensor that is not a subclass (subclasses keep their own semantics)."""
    return type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided


def plain_grad_input(t: Any) -> bool:
    """True for a :func:`plain_tensor` of a real floating dtype that needs a gradient here:
    the input the compression rewrites (``sin``, ``abs``, ...) replace PyTorch's op for."""
    return plain_tensor(t) and t.is_floating_point() and t.requires_grad and torch.is_grad_enabled()


def expand_ints(value: Any, n: int) -> tuple[int, ...] | None:
    """``int`` or length-1/length-``n`` sequence as an ``n``-tuple of ints; else ``None``."""
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, n):
        if not all(isinstance(v, int) for v in value):
            return None
        return tuple(value) * (n // len(value)) if len(value) == 1 else tuple(value)
    return None


def autocast_inputs(x: torch.Tensor, *others: torch.Tensor | None) -> tuple[Any, ...]:
    """``x`` and ``others`` cast as autocast casts the arguments of a lower-precision op on
    ``x``'s device (unchanged when autocast is off there)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *others)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_autocast_cast(t, device_type, dtype) for t in (x, *others))


def _autocast_cast(t: torch.Tensor | None, device_type: str, dtype: torch.dtype) -> Any:
    """Cast ``t`` the way autocast casts an argument of a lower-precision op (no-op otherwise)."""
    if (
        t is None
        or not t.is_floating_point()
        or t.dtype == torch.float64
        or t.device.type != device_type
    ):
        return t
    return t.to(dtype)


def _channels_last_format(t: torch.Tensor) -> torch.memory_format | None:
    """The channels-last format ``t`` is laid out in, if any (and it is not also contiguous)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats.get(t.dim())
    if fmt is None or t.is_contiguous() or not t.is_contiguous(memory_format=fmt):
        return None
    return fmt


def _channels_last_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a dense channels-last (NHWC / NDHWC) tensor of ``t``'s shape."""
    shape = t.shape
    strides = [0] * t.dim()
    step = 1
    for d in (1, *range(t.dim() - 1, 1, -1), 0):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


@dataclass(frozen=True)
class _ConvGeometry:
    """Everything about a convolution except its tensors, as plain Python values."""

    func: Any
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


class _FrozenWeightConv(torch.autograd.Function):
    """Convolution that saves only its (frozen) weight for backward, not its input. A weight
    that can be computed again (``rebuild``: dequantized from 4 bits, see :mod:`.four_bit`, or
    standardized, see :mod:`.derived_weights`) is not even saved.

    Written with ``forward(ctx, ...)``, not ``setup_context``: torch binds a ``setup_context``
    Function's arguments through ``inspect.signature`` on every call (75 us on CPU, more than
    a small convolution). Under ``torch.func`` transforms, which need ``setup_context``, the
    engine stays out and this rewrite does not run.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        geom: _ConvGeometry,
        rebuild: Callable[[torch.dtype], torch.Tensor] | None,
    ) -> torch.Tensor:
        if rebuild is None:
            ctx.save_for_backward(weight)  # the only tensor kept: no activation
        ctx.rebuild, ctx.weight_dtype = rebuild, weight.dtype
        ctx.geom = geom
        ctx.input_shape = tuple(input.shape)
        ctx.memory_format = _channels_last_format(input)
        return geom.func(input, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if ctx.rebuild is not None:
            weight = ctx.rebuild(ctx.weight_dtype)
        else:
            (weight,) = ctx.saved_tensors
        geom: _ConvGeometry = ctx.geom
        need_input, _, need_bias = ctx.needs_input_grad[:3]
        # convolution_backward reads only the shape of ``input`` when the weight's gradient is
        # not requested, so a zero-stride placeholder stands in for the activation.
        placeholder = grad_output.new_empty(1).expand(ctx.input_shape)
        if ctx.memory_format is not None and weight.stride() != _channels_last_strides(weight):
            # The placeholder has no layout; a channels-last weight makes the backend pick the
            # channels-last kernels that the default backward picks from the real input.
            # (empty_like sets channels-last strides even where ``contiguous`` would keep
            # ambiguous ones, as for a depthwise weight's size-1 dim.)
            weight = torch.empty_like(weight, memory_format=ctx.memory_format).copy_(weight)
        grad_input, _, grad_bias = torch.ops.aten.convolution_backward(
            grad_output,
            placeholder,
            weight,
            [weight.shape[0]] if need_bias else None,
            list(geom.stride),
            list(geom.padding),
            list(geom.dilation),
            False,
            [0] * len(geom.stride),
            geom.groups,
            [need_input, False, need_bias],
        )
        return grad_input, None, grad_bias, None, None


def _conv_padding(
    padding: Any, kernel: Sequence[int], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Integer padding equivalent to ``padding``; ``None`` for asymmetric or invalid ``"same"``."""
    n = len(kernel)
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        if any(s != 1 for s in stride):
            return None  # torch rejects this; let the original call raise
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        if any(t % 2 for t in total):
            return None  # torch pads one extra element on one side: not a plain convolution
        return tuple(t // 2 for t in total)
    return expand_ints(padding, n)


def frozen_conv(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite ``conv1d``/``conv2d``/``conv3d`` with a frozen weight so the input is not saved.

    Applies when grad mode is on, the weight does not require grad, and the input or the bias
    does; the replacement saves only the weight. Declines (``NotImplemented``) for unbatched
    inputs, tensor subclasses, asymmetric ``padding="same"``, and arguments it cannot parse.

    Autocast: the intercepted call sees the un-cast (fp32) tensors and autocast would cast them
    inside the ATen op. Here the same casts are made explicitly, before the autograd Function,
    exactly as autocast makes them (floating, non-float64 tensors on the autocast device go to
    the autocast dtype); the Function then runs entirely in that dtype, and the casts' own
    backward returns the input gradient in the input's dtype. This matches the default path,
    which also saves the low-precision copy of the weight.
    """
    ndim = _CONV_DIMS.get(getattr(func, "__name__", ""))
    bound = bind_args(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
    if ndim is None or bound is None or not torch.is_grad_enabled():
        return NotImplemented
    x, weight, bias = bound["input"], bound["weight"], bound["bias"]
    if not (plain_tensor(x) and plain_tensor(weight) and (bias is None or plain_tensor(bias))):
        return NotImplemented
    if weight.requires_grad or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return NotImplemented
    if x.dim() != ndim + 2 or weight.dim() != ndim + 2 or not isinstance(bound["groups"], int):
        return NotImplemented
    stride = expand_ints(bound["stride"], ndim)
    dilation = expand_ints(bound["dilation"], ndim)
    if stride is None or dilation is None:
        return NotImplemented
    padding = _conv_padding(bound["padding"], weight.shape[2:], stride, dilation)
    if padding is None:
        return NotImplemented
    # Read before autocast makes a copy that is neither marked nor a view of the original.
    source = source_of(weight)
    rebuild = rebuild_from(source) if source is not None else rebuild_of(weight)
    x, weight, bias = autocast_inputs(x, weight, bias)
    geom = _ConvGeometry(func, stride, padding, dilation, bound["groups"])
    return _FrozenWeightConv.apply(x, weight, bias, geom, rebuild)


def frozen_batch_norm(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite eval-mode ``batch_norm`` as ``x * scale + shift`` so the input is not saved
    (and hand a weight-standardizing one to :func:`.derived_weights.standardized_weight`).

    Applies when ``training`` is False, both running statistics are present and frozen, the
    weight is absent or frozen, and the input or the bias requires grad. ``scale`` and the
    ``running_mean * scale`` part of ``shift`` are computed without autograd, so the product
    saves only ``scale`` (``C`` elements) and the bias still receives its gradient (the sum of
    the output gradient over all but the channel dim). Handles both ``F.batch_norm`` and the
    ATen ``torch.batch_norm`` argument orders. A low-precision input (fp32 parameters under
    autocast, or low-precision ones) is computed in fp32 and rounded back, as the native
    kernel does.
    """
    if func is torch.batch_norm:
        bound = bind_args(args, kwargs, _ATEN_BN_ARGS, {})
    elif func is torch.nn.functional.batch_norm:
        bound = bind_args(args, kwargs, _BN_ARGS, _BN_DEFAULTS)
    else:
        return NotImplemented
    if bound is None or not torch.is_grad_enabled():
        return NotImplemented
    if bool(bound["training"]):
        return standardized_weight(func, args, kwargs, bound)
    x, mean, var = bound["input"], bound["running_mean"], bound["running_var"]
    weight, bias = bound["weight"], bound["bias"]
    tensors = [t for t in (x, mean, var, weight, bias) if t is not None]
    if x is None or mean is None or var is None or not all(plain_tensor(t) for t in tensors):
        return NotImplemented
    if any(t.requires_grad for t in (mean, var)) or (weight is not None and weight.requires_grad):
        return NotImplemented
    if not (x.requires_grad or (bias is not None and bias.requires_grad)) or x.dim() < 2:
        return NotImplemented
    param_dtype = var.dtype
    if any(t.dtype != param_dtype for t in tensors[1:]) or not param_dtype.is_floating_point:
        return NotImplemented
    low = (torch.float16, torch.bfloat16)
    if x.dtype != param_dtype and not (x.dtype in low and param_dtype == torch.float32):
        return NotImplemented
    # Low-precision input (autocast, or a model converted to bf16/fp16 as a whole) is
    # computed in fp32 and rounded once, as the native kernel does: in bf16 the scale, the
    # shift and the product each rounded (a bf16 ResNet-18's loss error to fp64 3.4x PyTorch's).
    compute = torch.float32 if x.dtype in low else x.dtype
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        scale = torch.sqrt(var.to(compute) + float(bound["eps"])).reciprocal()
        if weight is not None:
            scale = scale * weight.to(compute)
        shift = -(mean.to(compute) * scale)
    shift = shift if bias is None else bias.to(compute) + shift
    out = x.to(compute) * scale.view(shape) + shift.view(shape)
    return out.to(x.dtype)


def dropout_identity(func: Any, args: tuple, kwargs: dict) -> Any:
    """Return the input itself for dropout that cannot drop (``p == 0`` or not training).

    Covers ``dropout``, ``dropout1d/2d/3d``, ``alpha_dropout`` and ``feature_alpha_dropout``,
    in both their ``F`` form and the ATen form (whose third argument is named ``train``).
    ``nn.Dropout`` in eval mode also returns its input, so no copy is made. Declines when
    dropout is active, or when ``p`` is outside ``[0, 1]`` (so the original call raises).
    """
    if "train" in kwargs:
        kwargs = {("training" if k == "train" else k): v for k, v in kwargs.items()}
    bound = bind_args(args, kwargs, _DROPOUT_ARGS, _DROPOUT_DEFAULTS)
    if bound is None or not isinstance(bound["input"], torch.Tensor):
        return NotImplemented
    try:
        p, training = float(bound["p"]), bool(bound["training"])
    except (TypeError, ValueError, RuntimeError):
        return NotImplemented
    if not 0.0 <= p <= 1.0 or (training and p != 0.0):
        return NotImplemented
    return bound["input"]


FROZEN_REWRITES: dict[str, Rewrite] = {
    "conv1d": frozen_conv,
    "conv2d": frozen_conv,
    "conv3d": frozen_conv,
    "batch_norm": frozen_batch_norm,
    "dropout": dropout_identity,
    "dropout1d": dropout_identity,
    "dropout2d": dropout_identity,
    "dropout3d": dropout_identity,
    "alpha_dropout": dropout_identity,
    "feature_alpha_dropout": dropout_identity,
}
"""Rewrites keyed by the intercepted torch function's ``__name__``."""
