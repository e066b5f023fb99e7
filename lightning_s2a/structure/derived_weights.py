"""Weights computed from frozen parameters in every forward, rebuilt in backward instead of kept.

timm's ``StdConv2d`` and ``ScaledStdConv2d`` (NF-ResNet, NFNet, BiT, the ViT-hybrids) standardize
their weight on each forward, ``F.batch_norm(self.weight.reshape(1, out, -1), None, None,
training=True, ...)``, and convolve with the result. A frozen conv's backward still needs that
weight, and kept as it is, it costs every layer's weight in bytes per step, whatever the batch:
at batch 2, most of what NF-ResNet-26 kept. Its recipe is known, and its inputs are frozen
parameters, so the frozen conv (:mod:`.frozen_ops`) keeps the recipe and runs it again in
backward: the same op on the same values, so the same weight, bit for bit.

:func:`standardized_weight` is the ``batch_norm`` rewrite for that pattern: batch statistics,
no running statistics, nothing requiring grad, and an input that is a frozen parameter or a
view of one. It notes the recipe under the output's storage while the output lives;
:func:`rebuild_of` finds it again from the weight the conv receives (a view of that output).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

#: Storage address -> (weak reference to the standardized weight, its version then, its
#: recipe). An entry lives exactly as long as the weight it describes (a finalizer removes
#: it), so an address reused by another tensor never finds a stale recipe.
_RECIPES: dict[int, tuple[weakref.ref, int, Callable[[], torch.Tensor]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _RECIPES.get(key)
    if entry is not None and entry[0] is ref:
        del _RECIPES[key]


def _frozen_parameter_view(t: Any) -> bool:
    base = t._base if isinstance(t, torch.Tensor) and t._base is not None else t
    return isinstance(base, nn.Parameter) and not base.requires_grad


def standardized_weight(func: Any, args: tuple, kwargs: dict, bound: dict[str, Any]) -> Any:
    """Run a weight-standardizing ``batch_norm`` and note how to run it again (see module
    docstring); ``NotImplemented`` for any other batch norm."""
    x, weight, bias = bound["input"], bound["weight"], bound["bias"]
    if (
        not bool(bound["training"])
        or bound["running_mean"] is not None
        or bound["running_var"] is not None
        or not _frozen_parameter_view(x)
        or any(t is not None and t.requires_grad for t in (weight, bias))
    ):
        return NotImplemented
    out = func(*args, **kwargs)
    if isinstance(out, torch.Tensor) and out._base is None:
        ref = weakref.ref(out)
        key = out.untyped_storage().data_ptr()
        sources = [t for t in (x, weight, bias) if t is not None]
        recipe = partial(_run_unchanged, func, args, kwargs, sources, [t._version for t in sources])
        _RECIPES[key] = (ref, out._version, recipe)
        weakref.finalize(out, _forget, key, ref)
    return out


def _run_unchanged(
    func: Any, args: tuple, kwargs: dict, sources: list[torch.Tensor], versions: list[int]
) -> torch.Tensor:
    """Run the recipe again; refuse, as autograd refuses a saved tensor changed in place, if
    the parameter or the affine tensors changed since forward (a reloaded or swapped-in
    weight would otherwise give another weight's gradient)."""
    if [t._version for t in sources] != versions:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            "inplace operation: a frozen parameter of a weight-standardized convolution "
            "(StdConv2d) changed between forward and backward, so S2A cannot rebuild its "
            "weight; change frozen weights only between training steps."
        )
    return func(*args, **kwargs)


def rebuild_of(weight: torch.Tensor) -> Callable[[torch.dtype], torch.Tensor] | None:
    """For a weight that is (a view of) a standardized weight still alive: a function that
    computes it again in a given dtype, with the same shape and strides. Else ``None``, also
    for one changed in place after it was computed (the conv then keeps it)."""
    entry = _RECIPES.get(weight.untyped_storage().data_ptr())
    base = weight._base if weight._base is not None else weight
    if entry is None or entry[0]() is not base or base._version != entry[1]:
        return None  # not a recorded weight, or changed in place since: saved as usual
    geometry = (tuple(weight.shape), weight.stride(), weight.storage_offset())
    return partial(_rebuild, entry[2], geometry)


def _rebuild(
    recipe: Callable[[], torch.Tensor], geometry: tuple, dtype: torch.dtype
) -> torch.Tensor:
    shape, stride, offset = geometry
    with torch.no_grad():
        return recipe().as_strided(shape, stride, offset).to(dtype)
