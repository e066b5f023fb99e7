"""Max pooling that keeps a one-byte window offset per output instead of its input.

PyTorch's ``max_pool2d`` keeps its whole input plus an int64 index per output for backward;
only the argmax position is needed. Storing it as an offset inside the pooling window (at most
``kh * kw`` values, one byte) keeps 1/8 of the index bytes and none of the input. Backward
scatters the gradient back to the same positions, so it equals PyTorch's to float rounding
(overlapping windows sum in a different order).
"""

from __future__ import annotations

from typing import Any

import torch

from .frozen_ops import bind_args, expand_ints


def _window_origins(out_h: int, out_w: int, stride: tuple, padding: tuple, device) -> tuple:
    rows = torch.arange(out_h, device=device).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(out_w, device=device).view(1, -1) * stride[1] - padding[1]
    return rows, cols


class _CompactMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, index = torch.ops.aten.max_pool2d_with_indices(
            x, kernel, stride, padding, dilation, ceil_mode
        )
        width = x.shape[-1]
        rows, cols = _window_origins(out.shape[-2], out.shape[-1], stride, padding, x.device)
        local = ((index // width - rows) // dilation[0]) * kernel[1]
        local += (index % width - cols) // dilation[1]
        ctx.save_for_backward(local.to(torch.uint8))
        ctx.geometry = (x.shape, kernel, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad):
        (local,) = ctx.saved_tensors
        shape, kernel, stride, padding, dilation = ctx.geometry
        local = local.long()
        rows, cols = _window_origins(grad.shape[-2], grad.shape[-1], stride, padding, grad.device)
        index = (rows + (local // kernel[1]) * dilation[0]) * shape[-1]
        index += cols + (local % kernel[1]) * dilation[1]
        # Out of place, with reshape: under vmap (batched gradients, a vectorized jacobian)
        # the in-place scatter into fresh zeros and flatten's view failed ("Batching rule
        # not implemented for aten::flatten.using_ints"), compress=False included.
        flat = grad.new_zeros(*shape[:-2], shape[-2] * shape[-1])
        n = grad.shape[-2] * grad.shape[-1]
        flat = flat.scatter_add(
            -1, index.reshape(*index.shape[:-2], n), grad.reshape(*grad.shape[:-2], n)
        )
        return flat.reshape(shape), None, None, None, None, None


_POOL_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
_POOL_DEFAULTS: dict[str, Any] = {
    "stride": None,
    "padding": 0,
    "dilation": 1,
    "ceil_mode": False,
    "return_indices": False,
}


def _pool_geometry(
    args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict[str, Any]
) -> tuple[dict[str, Any], tuple, tuple, tuple] | None:
    """``(bound arguments, kernel, stride, padding)`` of a 2-D pooling call the rewrites can
    take (a plain 4-D input that needs a gradient, grad mode on, integer geometry), else
    None."""
    bound = bind_args(args, kwargs, names, defaults)
    if bound is None:
        return None
    x = bound["input"]
    if (
        not isinstance(x, torch.Tensor)
        or type(x) is not torch.Tensor
        or x.dim() != 4
        or not x.requires_grad
        or not torch.is_grad_enabled()
    ):
        return None
    kernel = expand_ints(bound["kernel_size"], 2)
    stride = expand_ints(bound["stride"] or bound["kernel_size"], 2)
    padding = expand_ints(bound["padding"], 2)
    if None in (kernel, stride, padding):
        return None
    return bound, kernel, stride, padding


def compact_max_pool2d(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``max_pool2d`` storing one-byte window offsets; declines what it can't do."""
    found = _pool_geometry(args, kwargs, _POOL_ARGS, _POOL_DEFAULTS)
    if found is None or found[0]["return_indices"]:
        return NotImplemented
    bound, kernel, stride, padding = found
    dilation = expand_ints(bound["dilation"], 2)
    if dilation is None or kernel[0] * kernel[1] > 256:
        return NotImplemented
    return _CompactMaxPool2d.apply(
        bound["input"], kernel, stride, padding, dilation, bool(bound["ceil_mode"])
    )


class _ShapeOnlyAvgPool2d(torch.autograd.Function):
    """``avg_pool2d`` that keeps nothing for backward: its backward reads the input's shape
    only, and PyTorch's kept the whole input (coded: 28.7% of a ResNet-D's stored bytes, the
    average pools of its downsampling shortcuts)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
        ctx.geometry = (x.shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
        return torch.ops.aten.avg_pool2d(
            x, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )

    @staticmethod
    def backward(ctx, grad):
        shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor = ctx.geometry
        # The backward reads only the input's sizes: a zero-stride placeholder stands in.
        placeholder = grad.new_empty(1).expand(shape)
        grad_input = torch.ops.aten.avg_pool2d_backward(
            grad, placeholder, kernel, stride, padding, ceil_mode, count_include_pad, divisor
        )
        return grad_input, None, None, None, None, None, None


_AVG_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
_AVG_DEFAULTS: dict[str, Any] = {
    "stride": None,
    "padding": 0,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}


def shape_only_avg_pool2d(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite of ``avg_pool2d`` keeping nothing for backward; declines what it can't do."""
    found = _pool_geometry(args, kwargs, _AVG_ARGS, _AVG_DEFAULTS)
    if found is None:
        return NotImplemented
    bound, kernel, stride, padding = found
    divisor = bound["divisor_override"]
    if not (divisor is None or isinstance(divisor, int)):
        return NotImplemented
    return _ShapeOnlyAvgPool2d.apply(
        bound["input"],
        kernel,
        stride,
        padding,
        bool(bound["ceil_mode"]),
        bool(bound["count_include_pad"]),
        divisor,
    )
