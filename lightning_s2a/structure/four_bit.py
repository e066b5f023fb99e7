"""Frozen weights held in 4 bits, as QST does: ``S2AConfig(frozen_dtype="nf4")`` or ``"fp4"``.

bitsandbytes quantizes each frozen Linear and Conv weight in blocks of 64 (one absmax scale per
block, nf4 or fp4 codes, two to a byte). Blocks never straddle two output channels: each row
(one output channel's weights) is padded with zeros to a multiple of 64 first. Channels of one
layer can differ in scale by orders of magnitude (a CNN's conv weights with BatchNorm behind
them), and a block shared across channels would flatten the small ones: on ImageNet
EfficientNet-Lite0, flat blocks gave logits cosine 0.64 to the fp32 model. A layer is held only
where this saves bytes (a 3x3 depthwise kernel, 9 weights a row, would not). The codes and
scales become non-persistent buffers of the module, so they follow ``model.to(device)`` and never
enter a checkpoint, and the module's ``weight`` becomes a property that dequantizes on every
read. Whatever reads it (``nn.Linear``'s forward, timm's ``Conv2dSame``, EVA's
``F.linear(x, self.qkv.weight, ...)``) computes with the 4-bit weights' values, in the module's
dtype.

While a training forward runs, the engine's rewrites (``four_bit_linear`` here, and the frozen
conv in :mod:`.frozen_ops`) see that the weight came from 4 bits and save nothing for backward:
backward dequantizes it again. So a layer's full-precision weight exists only while that layer
computes, never for all layers at once. Double quantization of the scales is not offered.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..config import FOUR_BIT_DTYPES
from ..messages import some_names

BLOCK_SIZE = 64
_CODES, _ABSMAX, _META = "s2a_weight_codes", "s2a_weight_absmax", "_s2a_four_bit"
#: A 0-element buffer in the weight's dtype: it follows ``model.half()`` / ``.to(dtype)``, so
#: the weight comes back in whatever dtype the model was converted to. The absmax scales are
#: stored as int32 bits, which dtype conversions leave alone (they stay exact fp32).
_DTYPE = "s2a_weight_dtype"
#: Dtypes bitsandbytes quantizes and dequantizes; others go through float32.
_BNB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SOURCE = "_s2a_four_bit_source"
#: Names of the buffers 4-bit holding adds to a layer.
MADE_NAMES = (_CODES, _ABSMAX, _DTYPE)


@dataclass(frozen=True)
class _Meta:
    shape: torch.Size
    quant_type: str
    #: The module's own weight Parameter (its values dropped while held) and the order of
    #: its parameters, so release gives back the same object in the same place: optimizers
    #: and EMA copies that hold it, and state-dict order, stay as they were.
    original: nn.Parameter | None = None
    order: tuple[str, ...] = ()

    @property
    def row(self) -> int:
        """Weights per output channel."""
        return self.shape[1:].numel()

    @property
    def padded_row(self) -> int:
        """Weights per output channel, padded to whole blocks."""
        return _whole_blocks(self.row)


def _whole_blocks(n: int) -> int:
    return -(-n // BLOCK_SIZE) * BLOCK_SIZE


def held_size(shape: torch.Size) -> int:
    """Bytes a weight of ``shape`` takes in 4 bits: padded rows of codes plus fp32 scales."""
    padded = shape[0] * _whole_blocks(shape[1:].numel())
    return padded // 2 + padded // BLOCK_SIZE * 4


def worth_holding(weight: torch.Tensor) -> bool:
    """True where 4 bits (with padded rows) take fewer bytes than the weight as it is."""
    return weight.dim() >= 2 and held_size(weight.shape) < weight.numel() * weight.element_size()


#: ``torch.jit.trace`` of a 4-bit weight: refused, naming what works instead.
TRACE_4BIT = (
    "torch.jit.trace cannot record a weight held in 4 bits (frozen_dtype='nf4'/'fp4'): "
    "bitsandbytes' dequantization failed inside the tracer with an internal assert on "
    "aten::view. Export with torch.export after handle.stop_engine() (it matches eager), or "
    "trace after handle.remove() (exact weights: another model than the one trained)."
)


class FourBitWeight:
    """Mixin put in front of a module's class while its weight is held in 4 bits."""

    @property
    def weight(self) -> torch.Tensor:
        """The 4-bit weight, dequantized in the module's dtype (a fresh tensor every read)."""
        if torch._C._is_tracing():
            raise RuntimeError(TRACE_4BIT)
        w = dequantize(self)
        setattr(w, _SOURCE, self)  # lets the engine's rewrites save the codes, not ``w``
        return w

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # a new Parameter, torch.func.functional_call, an init
            raise AttributeError(
                f"{type(self).__name__}.weight is held in 4 bits by S2A (frozen_dtype='nf4' or "
                "'fp4'): it is read from its codes and cannot be set while held (a new "
                "Parameter was a KeyError, torch.func.functional_call an AttributeError). Call "
                "handle.remove() first, or apply S2A with frozen_dtype=None."
            )
        super().__setattr__(name, value)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The held class is made at run time under the original's name, which pickle would
        # find instead (``torch.save(model)`` failed); it is rebuilt from the original.
        return (_rebuild_held, (_original_class(type(self)),), self.__dict__)


def _original_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not FourBitWeight)


def _rebuild_held(cls: type) -> nn.Module:
    """An empty held module of class ``cls`` (unpickling fills in its state)."""
    return object.__new__(_held_class(cls))


_CLASSES: dict[type, type] = {}


def _held_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (FourBitWeight, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def is_held(module: nn.Module) -> bool:
    """True while ``module``'s weight is held in 4 bits."""
    return isinstance(module, FourBitWeight)


def hold(
    module: nn.Module, weight: torch.Tensor, quant_type: str, dtype: torch.dtype | None = None
) -> None:
    """Quantize ``weight`` (the module's frozen weight values) and hold the module's weight in
    4 bits, on the device ``weight`` is on. Holding again re-quantizes from ``weight``.

    The codes are quantized from ``weight`` in its own dtype; pass it in the dtype of the
    weight as built (the stored original), so the same weight always gets the same codes and
    scales. ``dtype`` is the dtype the weight comes back in (default: ``weight``'s), the
    module's current one where the model was converted since (``"bf16-true"``, ``.half()``).
    """
    import bitsandbytes.functional as bnbf

    if quant_type not in FOUR_BIT_DTYPES:
        raise ValueError(f"4-bit weights: {quant_type!r} is not one of {FOUR_BIT_DTYPES}.")
    w = weight.detach()
    dtype = dtype or w.dtype
    meta = _Meta(w.shape, quant_type)
    rows = F.pad(w.reshape(w.shape[0], meta.row), (0, meta.padded_row - meta.row))
    rows = rows.to(w.dtype if w.dtype in _BNB_DTYPES else torch.float32).contiguous()
    codes, state = bnbf.quantize_4bit(rows, blocksize=BLOCK_SIZE, quant_type=quant_type)
    if is_held(module):
        previous: _Meta = getattr(module, _META)
        original, order = previous.original, previous.order
    else:
        order = tuple(module._parameters)
        original = module._parameters.pop("weight", None)
        if original is not None:  # its values are the codes' now; a frozen weight's stale
            original.data, original.grad = original.data.new_empty(0), None  # grad goes too
        module.__class__ = _held_class(type(module))
    meta = _Meta(w.shape, quant_type, original, order)
    module.register_buffer(_CODES, codes, persistent=False)
    module.register_buffer(_ABSMAX, state.absmax.float().view(torch.int32), persistent=False)
    module.register_buffer(_DTYPE, w.new_empty(0, dtype=dtype), persistent=False)
    setattr(module, _META, meta)


def release(module: nn.Module, weight: torch.Tensor) -> None:
    """Give the module back a plain frozen ``weight`` parameter (the original values)."""
    if not is_held(module):
        return
    dtype = dtype_of(module)  # the model may have been converted meanwhile
    meta: _Meta = getattr(module, _META)
    module.__class__ = _original_class(type(module))
    for name in (_CODES, _ABSMAX, _DTYPE):
        delattr(module, name)
    delattr(module, _META)
    param = meta.original if meta.original is not None else nn.Parameter(weight.new_empty(0))
    param.data = weight.to(dtype)
    param.requires_grad_(False)
    params = {**module._parameters, "weight": param}
    module._parameters.clear()
    for name in (*meta.order, *params):  # its own place first, then any added since
        if name in params:
            module._parameters[name] = params.pop(name)


def parameter_order(module: nn.Module) -> tuple[str, ...]:
    """The names of a held module's parameters in the order it had them, ``weight`` included."""
    return getattr(module, _META).order


def device_of(module: nn.Module) -> torch.device:
    """The device a held weight's codes are on."""
    return getattr(module, _CODES).device


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a held weight comes back in (the module's, after any conversion)."""
    return getattr(module, _DTYPE).dtype


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The held weight's values, in ``dtype`` (default: the module's dtype)."""
    return rebuild_from(module)(dtype or dtype_of(module))


def rebuild_from(module: nn.Module) -> Callable[[torch.dtype], torch.Tensor]:
    """A function that dequantizes the weight ``module`` holds now, in a given dtype, for a
    backward: it keeps these codes, so a backward after ``remove()`` (the module released)
    or after the weight was quantized again still gets the weight its forward computed with
    (it failed with an AttributeError)."""
    codes, absmax, meta = getattr(module, _CODES), getattr(module, _ABSMAX), getattr(module, _META)
    return partial(_dequantize, codes, absmax, meta)


def _dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, meta: _Meta, dtype: torch.dtype
) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState(
        absmax=absmax.view(torch.float32),
        shape=torch.Size((meta.shape[0], meta.padded_row)),
        blocksize=BLOCK_SIZE,
        quant_type=meta.quant_type,
        dtype=dtype if dtype in _BNB_DTYPES else torch.float32,
    )
    rows = bnbf.dequantize_4bit(codes, state)
    if meta.padded_row != meta.row:
        rows = rows[:, : meta.row]
    return rows.reshape(meta.shape).to(dtype)


def source_of(weight: Any) -> nn.Module | None:
    """The module whose 4-bit weight ``weight`` was dequantized from, if it was."""
    return getattr(weight, _SOURCE, None) if isinstance(weight, torch.Tensor) else None


def _held(model: nn.Module) -> Iterator[tuple[nn.Module, _Meta]]:
    for module in model.modules():
        if is_held(module):
            yield module, getattr(module, _META)


def held_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes held, bytes in the module's dtype)`` of every 4-bit weight in ``model``."""
    held = original = 0
    for module, meta in _held(model):
        codes, absmax = getattr(module, _CODES), getattr(module, _ABSMAX)
        held += codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
        original += meta.shape.numel() * dtype_of(module).itemsize
    return held, original


def held_numels(model: nn.Module) -> list[int]:
    """Element counts of the weights held in 4 bits in ``model``."""
    return [meta.shape.numel() for _, meta in _held(model)]


def is_buffer_name(name: str) -> bool:
    """True for the state-dict-free buffers that hold 4-bit codes and scales."""
    return name.rpartition(".")[2] in (_CODES, _ABSMAX, _DTYPE)


def named_held(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """``(parameter name, shape)`` of every weight held in 4 bits in ``model``: parameters to
    the user, though not to ``named_parameters()`` while they are held."""
    return [
        (f"{n}.weight" if n else "weight", getattr(m, _META).shape)
        for n, m in model.named_modules()
        if is_held(m)
    ]


class FrozenNames(WeakIdKeyDictionary):
    """Frozen parameters and their names, held weakly. A deep copy of the model (an EMA
    copy) gets one of the copy's parameters: a weak dictionary is copied as it is, and the
    copy's checks watched the original's (an unfrozen copy went unsaid; an unfrozen
    original was said of the copy)."""

    def __deepcopy__(self, memo: dict) -> FrozenNames:
        clone = FrozenNames()
        for p, name in self.items():
            clone[copy.deepcopy(p, memo)] = name
        return clone


def frozen_names(model: nn.Module) -> FrozenNames:
    """``model``'s frozen parameters and their names, held weakly (for :func:`check_unfrozen`
    and the surgery's ``UnfrozenCheck``: a parameter freed since cannot be mistaken for a new
    one at its address)."""
    frozen = FrozenNames()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen[p] = name
    return frozen


def check_unfrozen(model: nn.Module, frozen: WeakIdKeyDictionary, quant_type: str) -> None:
    """Warn about parameters frozen at apply that train now while weights are held in 4 bits.

    Unfreezing part of the backbone (``for p in block.parameters(): p.requires_grad_(True)``)
    reaches its norms but not its held Linear and Conv weights, which are no parameters: the
    rest of the block would train around weights that stay frozen, silently. Tuning only the
    norms looks the same from here, so it is a warning, once per parameter. ``frozen`` holds
    the parameters frozen at apply (:func:`frozen_names`)."""
    unfrozen = [p for p in model.parameters() if p.requires_grad and p in frozen]
    if not unfrozen or not held_numel(model):
        return
    names = [frozen.pop(p) for p in unfrozen]
    shown = some_names(names)
    warnings.warn(
        f"{shown} were frozen by S2A and train now, but the frozen Linear and Conv weights are "
        f"held in 4 bits (frozen_dtype={quant_type!r}): they are no parameters, so unfreezing "
        "cannot reach them, and they stay frozen while these train. Where that is what you "
        "want (norm tuning), ignore this; to unfreeze whole blocks, train with "
        "frozen_dtype=None (or 'bfloat16'), or give the model its weights back first with "
        "handle.remove().",
        stacklevel=2,
    )


def held_numel(model: nn.Module) -> int:
    """Number of weights held in 4 bits in ``model`` (they are no longer parameters)."""
    return sum(held_numels(model))


class _FourBitLinear(torch.autograd.Function):
    """``F.linear`` with a 4-bit frozen weight: saves nothing; backward dequantizes again.
    (``forward(ctx, ...)`` for the reason :class:`.frozen_ops._FrozenWeightConv` gives.)"""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, source: Any
    ):
        ctx.rebuild, ctx.dtype = rebuild_from(source), weight.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        need_x, _, need_bias, _ = ctx.needs_input_grad
        grad_x = grad @ ctx.rebuild(ctx.dtype) if need_x else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None
        return grad_x, None, grad_bias, None


def four_bit_linear(func: Any, args: tuple, kwargs: dict) -> Any:
    """Rewrite ``linear`` whose weight comes from 4 bits so backward keeps only the codes.

    Declines (``NotImplemented``) for any other weight, without grad mode, and where nothing
    needs a gradient (then nothing is saved anyway). Under autocast the input, weight and bias
    are cast as autocast would cast them, before the Function.
    """
    from .frozen_ops import autocast_inputs, bind_args

    bound = bind_args(args, kwargs, ("input", "weight", "bias"), {"bias": None})
    if bound is None or not torch.is_grad_enabled():
        return NotImplemented
    x, weight, bias = bound["input"], bound["weight"], bound["bias"]
    source = source_of(weight)
    if source is None or not isinstance(x, torch.Tensor):
        return NotImplemented
    if not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return NotImplemented
    x, weight, bias = autocast_inputs(x, weight, bias)
    return _FourBitLinear.apply(x, weight, bias, source)
