"""Frozen weights held in another dtype while S2A runs: ``S2AConfig(frozen_dtype=...)``.

``"bfloat16"``/``"float16"`` cast the Linear and Conv weights (what autocast would hand those
ops anyway); ``"nf4"``/``"fp4"`` hold them in 4 bits (:mod:`.four_bit`). The exact originals
stay on the CPU: checkpoints hold them, a load replaces them, and the end of fit (or
``remove()``) puts them back.
"""

from __future__ import annotations

import warnings
import weakref
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import FOUR_BIT_DTYPES, S2AConfig
from ..messages import some_names
from . import four_bit
from .model_hooks import HeldLayerHooks, NeedsAutocast, OriginalsHooks, moved

if TYPE_CHECKING:
    from .surgery import StructureState


def hold_frozen(
    model: nn.Module, config: S2AConfig, state: StructureState, layer_types: tuple[type, ...]
) -> None:
    """Note the originals of the frozen weights ``config.frozen_dtype`` holds, hold them so,
    and put hooks on each layer so state dicts hold and load the originals."""
    in_four_bits = config.frozen_dtype in FOUR_BIT_DTYPES
    tied = _tied(model)
    layers = {
        f"{n}.weight" if n else "weight"
        for n, m in model.named_modules()
        # the registered parameter, not m.weight: reading that runs a parametrization
        # (spectral_norm's power iteration moved its buffers) or dequantizes a held weight
        if isinstance(m, layer_types) and id(m._parameters.get("weight")) not in tied
    }
    not_held = []  # 4 bits: frozen weights of the layer kinds they do not hold
    for name, p in model.named_parameters():
        # Linear and Conv weights only. Cast, they are what autocast would hand the op
        # anyway, so the model computes the same during fit as after it (with the
        # originals back); position embeddings, class tokens and bias tables are added
        # or indexed in full precision, and norms run there. 4 bits: where they take
        # fewer bytes; the engine rewrites these calls.
        frozen = not p.requires_grad and p.is_floating_point()
        if in_four_bits:
            worth = frozen and four_bit.worth_holding(p)
            frozen = worth and name in layers
            if worth and not frozen and _other_layer_weight(name, model):
                not_held.append(name)
        else:
            frozen = frozen and (name in layers or _autocast_weight(name, model))
        if frozen:
            state.cast_originals[name] = p.detach().to("cpu", copy=True)
            layer = model.get_submodule(name.rpartition(".")[0])
            state.cast_layers[name] = weakref.ref(layer)
    if not_held:
        _warn_not_held(not_held, str(config.frozen_dtype))
    cast_frozen(model, state, config.frozen_dtype)
    if not in_four_bits and state.cast_originals:
        dtype = getattr(torch, str(config.frozen_dtype))
        check = NeedsAutocast(dtype, next(iter(state.cast_originals)))
        state.hooks.append(model.register_forward_pre_hook(check, with_kwargs=True))
    # Checkpoints hold the weights as the user built them, and a loaded state dict
    # becomes the new original: a resumed run's weights are never replaced by stale ones.
    # On each layer: a submodule's own state dict, and a layer under two names, hold
    # the originals too.
    for name in state.cast_originals:
        layer = model.get_submodule(name.rpartition(".")[0])
        if in_four_bits:
            held = HeldLayerHooks(state.cast_originals, name, str(config.frozen_dtype))
        else:
            held = OriginalsHooks(state.cast_originals, name)
        # partial: torch marks the hook with an attribute, which a method cannot take
        state.hooks.append(layer.register_state_dict_post_hook(partial(held.state_dict)))
        state.hooks.append(layer.register_load_state_dict_pre_hook(held.load))


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class WidenedCheck:
    """A step check of ``frozen_dtype="bfloat16"``/``"float16"``: warn once where the model
    was converted to a wider dtype since (``model.float()``, ``model.double()``): the
    frozen weights S2A holds take that dtype's memory again (their values stay rounded), and
    ``weight_bytes()`` shows more held than built."""

    def __init__(self, model: nn.Module, names: list[str], dtype: torch.dtype) -> None:
        # held weakly, as found at apply: a layer replaced or parametrized since is not
        # looked up by name (that failed at every forward)
        self.weights = [weakref.ref(model.get_parameter(n)) for n in names]
        self.size = torch.empty((), dtype=dtype).element_size()
        self.dtype, self.said = dtype, False

    def __call__(self) -> None:
        if self.said:
            return
        weights = (ref() for ref in self.weights)
        wide = {
            p.dtype
            for p in weights
            if p is not None and not p.requires_grad and p.element_size() > self.size
        }
        if not wide:
            return
        self.said = True
        held = str(self.dtype).removeprefix("torch.")
        now = ", ".join(sorted(str(d).removeprefix("torch.") for d in wide))
        warnings.warn(
            f"S2AConfig(frozen_dtype={held!r}) holds the frozen weights in {held}, but the "
            f"model was converted to {now} since apply_s2a (model.to(...), .float(), "
            f".double()): they take {now}'s memory again (their values "
            f"stay rounded to {held}). Convert the model before applying S2A, or train "
            "with frozen_dtype=None; said once.",
            stacklevel=4,
        )


def _warn_not_held(names: list[str], quant_type: str) -> None:
    """Say which frozen weights of layer kinds 4 bits do not hold (transposed convolutions,
    Hugging Face's ``Conv1D``) keep their full size: the summary's weight bytes showed it,
    nothing said it."""
    warnings.warn(
        f"frozen_dtype={quant_type!r} holds Linear and Conv1d/2d/3d weights in 4 bits; "
        f"{some_names(names)} (transposed convolutions, Hugging Face Conv1D) keep their full "
        "size (handle.summary() shows the weight bytes held).",
        stacklevel=5,
    )


def _autocast_weight(name: str, model: nn.Module) -> bool:
    """True for the other weights autocast hands its ops in low precision: those of
    transposed convolutions, ``nn.MultiheadAttention``'s input projections (``F.linear``),
    and Hugging Face's ``Conv1D`` (GPT-2's linear layers, an ``addmm``)."""
    owner, _, leaf = name.rpartition(".")
    projections = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    if isinstance(model.get_submodule(owner), nn.MultiheadAttention):
        return leaf in projections
    return _other_layer_weight(name, model)


def _other_layer_weight(name: str, model: nn.Module) -> bool:
    """True for the weight of a layer that computes like a Linear or Conv but is none:
    a transposed convolution, Hugging Face's ``Conv1D``."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    return leaf == "weight" and (
        isinstance(module, _TRANSPOSED) or type(module).__name__ == "Conv1D"
    )


def _tied(model: nn.Module) -> set[int]:
    """Ids of parameters that more than one module owns (weight tying). Such a weight is not
    held in 4 bits: giving it back would untie it."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    return {i for i, o in owners.items() if len(o) > 1}


def cast_frozen(model: nn.Module, state: StructureState, frozen_dtype: str | None) -> None:
    """Hold the frozen weights in ``frozen_dtype`` (cast, or 4 bits); None puts the exact
    originals back (after fit, so a plain fp32 forward works again), in the dtype the model
    has now where it was converted while they were held in 4 bits.

    4 bits are always quantized from the original in its own dtype, as at apply, so a model
    converted since (``"bf16-true"``) gets the same codes; the weight comes back in the
    layer's dtype. A weight that requires grad now was unfrozen: casting leaves it as it is.
    One whose value moved since (:func:`moved`: it trained, also if frozen again since) keeps
    it when the originals are put back, converted to the original's dtype, which becomes its
    original; one that did not move gets its exact original back.
    """
    converted: list[torch.dtype | None] = []  # the model's dtype, looked up where needed
    for name, original in list(state.cast_originals.items()):
        found = _layer_now(state, name)
        if found is None:  # gone since apply, or its weight deleted: nothing to put back
            del state.cast_originals[name]
            continue
        module, current = found
        if current is None:  # held in 4 bits
            if frozen_dtype not in FOUR_BIT_DTYPES:
                four_bit.release(module, original.to(four_bit.device_of(module)))
            continue
        if frozen_dtype is None and moved(current, original):  # what it learned stays
            current.data = current.data.to(original.dtype)
            state.cast_originals[name] = current.detach().to("cpu", copy=True)
        elif current.requires_grad and frozen_dtype is not None:
            continue  # unfrozen: it trains as it is
        elif frozen_dtype in FOUR_BIT_DTYPES:
            weight = original.to(current.device)
            four_bit.hold(module, weight, frozen_dtype, current.dtype)
        else:
            # Put back: in the original's dtype, or in the one the model was converted to
            # since (``model.double()``, ``.half()``, "bf16-true": not a cast of its own).
            held = current.dtype in (torch.bfloat16, torch.float16)
            if held and not converted:
                converted.append(_model_dtype(model, state))
            dtype = (converted[0] or original.dtype) if held else current.dtype
            dtype = getattr(torch, frozen_dtype) if frozen_dtype else dtype
            current.data = original.to(current.device, dtype)


def _layer_now(state: StructureState, name: str) -> tuple[nn.Module, torch.Tensor | None] | None:
    """The layer that owned the weight ``name`` at apply, wherever it is now (the user may
    have wrapped it, ``nn.Sequential(layer)``, moved or swapped it: its weight goes back to
    it, not to whatever holds its name), and that weight (None: held in 4 bits; a
    parametrization's ``original`` where one was registered since). None where the layer
    is gone or holds no such weight (``remove()`` failed there with a bare AttributeError)."""
    module = state.cast_layers[name]()
    if module is None:
        return None
    if four_bit.is_held(module):
        return module, None
    leaf = name.rpartition(".")[2]
    weight = module._parameters.get(leaf)
    if weight is None and parametrize.is_parametrized(module, leaf):
        weight = module.parametrizations[leaf].original
    return None if weight is None else (module, weight)


def _model_dtype(model: nn.Module, state: StructureState) -> torch.dtype | None:
    """The one floating dtype of the model's tensors that ``frozen_dtype`` did not cast, or
    None where they have several: a model converted while its weights were held
    (``.half()`` after a bf16 cast) gets its weights back in its dtype, not the original's."""
    cast = {id((_layer_now(state, n) or (None, None))[1]) for n in state.cast_originals}
    dtypes = {
        t.dtype
        for t in (*model.parameters(), *model.buffers())
        if t.is_floating_point() and id(t) not in cast
    }
    return dtypes.pop() if len(dtypes) == 1 else None
