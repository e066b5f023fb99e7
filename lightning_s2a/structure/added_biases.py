"""``S2AConfig(add_bias=True)``: zero-initialised biases for frozen layers built without one,
so that bias tuning reaches them too; none where the model's forward never reads it."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import S2AConfig
from ..messages import some_names
from .families import default_input_size
from .layouts import tensors_read

#: Linear and conv layers: given a ``bias`` by ``add_bias``, and the layers whose weight
#: ``frozen_dtype="nf4"`` holds in 4 bits (see :mod:`.surgery`). A subclass that computes
#: with its weight in its own way (timm's StdConv2d standardizes it first) reads the
#: dequantized values; the engine then keeps what it derives exact, whole until backward.
CONVS_AND_LINEARS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def add_biases(
    model: nn.Module, config: S2AConfig, head_ids: set[int]
) -> list[tuple[nn.Module, str]]:
    """Give every layer outside the head (``head_ids``: its parameters' ids) that lacks a
    bias a zero-initialised one; returns the (module, attribute) of each, for the undo."""
    added = []
    for module in model.modules():
        slot = _bias_slot(module)
        if slot is None or any(id(p) in head_ids for p in module.parameters()):
            continue
        attr, size, like = slot
        zeros = torch.zeros(size, device=like.device, dtype=like.dtype)
        module.register_parameter(attr, nn.Parameter(zeros))
        added.append((module, attr))
    _drop_unread(model, config, added)
    return added


def _bias_slot(module: nn.Module) -> tuple[str, int, torch.Tensor] | None:
    """Where ``add_bias`` gives ``module`` a bias it lacks: (attribute, size, a weight whose
    device and dtype it takes), or None. ``nn.MultiheadAttention(bias=False)`` computes its
    q, k and v projections with ``in_proj_bias`` (its ``out_proj`` is a Linear)."""
    if isinstance(module, CONVS_AND_LINEARS) and module.bias is None:
        return "bias", module.weight.shape[0], module.weight
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_bias is None:
        weight = module.in_proj_weight
        if weight is None:  # separate q, k and v weights (kdim or vdim differ)
            weight = module.q_proj_weight
        return "in_proj_bias", 3 * module.embed_dim, weight
    return None


def _drop_unread(model: nn.Module, config: S2AConfig, added: list[tuple[nn.Module, str]]) -> None:
    """Take out the added biases that the model's forward never reads where it reads the
    layer's weight (EVA's and BEiT's attention compute ``F.linear(x, qkv.weight, qkv_bias)``
    with a bias built from ``q_bias`` and ``v_bias``, which train as biases already): they
    would be trainable parameters that train nothing. A layer whose weight the dry forward
    (eval mode, zeros) does not read either keeps its bias: it may run in training only (an
    auxiliary head) or for other inputs (an expert not routed to). Said, with the first
    names. Where no dry forward can run (no input size known), all stay."""
    if not added:
        return
    try:
        size = default_input_size(model, config.input_size)
    except ValueError:
        return
    read = tensors_read(model, size)
    if read is None:
        return
    unread = [
        (m, attr)
        for m, attr in added
        if id(getattr(m, attr)) not in read and any(id(w) in read for w in _weights(m))
    ]
    for module, attr in unread:
        module.register_parameter(attr, None)
        added.remove((module, attr))
    if unread:
        names = [next(n for n, x in model.named_modules() if x is m) for m, _ in unread]
        shown = some_names(names)
        warnings.warn(
            f"add_bias: {len(unread)} layers' forwards never read a bias ({shown}: their "
            "module computes with a bias of its own, as EVA's and BEiT's attention build "
            "qkv's from q_bias and v_bias, which train as biases already); none was added "
            "there.",
            stacklevel=6,  # the caller of apply_s2a
        )


def _weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights a module with an added bias computes with (read in the dry forward)."""
    names = ("weight", "in_proj_weight", "q_proj_weight")
    return [w for w in (getattr(module, n, None) for n in names) if w is not None]
