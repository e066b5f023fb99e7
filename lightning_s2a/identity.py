"""What identifies the frozen backbone an adapter was trained on: its architecture (class,
parameter names and shapes, buffers) and its weights (a few values of every frozen tensor).

An adapter's biases, prompts or side only mean something on top of the frozen weights they
were trained with. Checked by shape alone, an adapter loaded into the same architecture built
with other weights (``pretrained=False``, another checkpoint, a frozen head initialised
differently) gave other outputs, silently (a reviewer's ViT-Ti: argmax agreement 25%).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .api import S2AHandle
from .structure.four_bit import named_held
from .structure.surgery import is_frozen_batch_norm

#: Values read from each frozen tensor, evenly spaced through it.
SAMPLES_PER_TENSOR = 8
#: A tensor's values may differ by this much relative to their norm and still be the same
#: weights, once the saved ones are rounded to the backbone's dtype now (``.half()``).
WEIGHTS_RTOL = 0.01


def backbone_identity(model: nn.Module, handle: S2AHandle | None = None) -> dict[str, Any]:
    """Class, timm architecture, parameter count and a shape hash of the frozen backbone.

    Only parameters that existed before ``apply_s2a`` count (injected ``s2a_*`` modules and
    added biases do not), so the identity is the same with or without S2A applied.
    """
    before = handle.structure.flags if handle is not None else None
    digest, count = hashlib.sha256(), 0
    # Weights held in 4 bits (frozen_dtype="nf4") are parameters of the backbone all the same.
    shapes = [(n, p.shape) for n, p in model.named_parameters()] + named_held(model)
    for name, shape in sorted(shapes, key=lambda item: item[0]):
        if "s2a_" in name or (before is not None and name not in before):
            continue
        digest.update(f"{name}:{tuple(shape)}\n".encode())
        count += shape.numel()
    # Persistent buffers too: a BatchNorm and a GroupNorm backbone share parameter shapes.
    buffers = hashlib.sha256()
    for name, shape in sorted(_persistent_buffers(model)):
        if "s2a_" not in name:
            buffers.update(f"{name}:{shape}\n".encode())
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return {
        "class": type(model).__name__,
        "architecture": arch,
        "num_params": count,
        "shape_sha256": digest.hexdigest(),
        "buffer_sha256": buffers.hexdigest(),
    }


def _persistent_buffers(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the buffers a state dict holds (4-bit codes are not persistent)."""
    return [
        (f"{prefix}.{name}" if prefix else name, tuple(b.shape))
        for prefix, m in model.named_modules()
        for name, b in m._buffers.items()
        if b is not None and name not in m._non_persistent_buffers_set
    ]


def describe(identity: dict[str, Any]) -> str:
    """A backbone identity in words, for errors: architecture, class and parameter count."""
    name = identity.get("architecture") or identity.get("class")
    return f"{name} ({identity.get('class')}, {identity.get('num_params', 0):,} params)"


def frozen_weight_sample(model: nn.Module, handle: S2AHandle) -> dict[str, list[float]]:
    """A few values of every frozen parameter the model had before ``apply_s2a`` (name ->
    values), read from its state dict: the weights as built, also where S2A holds them in 16
    or 4 bits; and of the buffers no training moves: the statistics of the BatchNorms S2A
    holds in eval mode and a ``FrozenBatchNorm2d``'s (until 2026-12-07 unsampled: an adapter
    loaded silently onto statistics that had moved, its logits 0.11 off). Other buffers may
    move in training (a DINO-style centre), so they are not what identifies the backbone."""
    before = handle.structure.flags
    frozen = [
        n
        for n, p in model.named_parameters()
        if not p.requires_grad and "s2a_" not in n and n in before
    ]
    frozen += [n for n, _ in named_held(model) if n in before]
    still = {id(bn) for bn in handle.held_batch_norms()}
    frozen += [
        f"{prefix}.{leaf}" if prefix else leaf
        for prefix, m in model.named_modules()
        if id(m) in still or is_frozen_batch_norm(m)
        for leaf, b in m._buffers.items()
        if b is not None and b.is_floating_point()
    ]
    state = model.state_dict()
    return {n: _sample(state[n]) for n in sorted(set(frozen)) if n in state}


def _sample(t: torch.Tensor) -> list[float]:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return []
    index = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR).round().long()
    return flat[index.to(flat.device)].double().tolist()


def weights_differ(
    model: nn.Module, saved: dict[str, list[float]], handle: S2AHandle | None = None
) -> list[tuple[str, float]]:
    """``(name, relative difference)`` of each tensor of ``saved`` (from
    :func:`frozen_weight_sample`) whose values in ``model``'s state dict are not the same
    weights (beyond :data:`WEIGHTS_RTOL`); a name the model lacks is left to the shape check.
    A tensor an adapter loaded earlier wrote over (a swap) is compared as it was built."""
    state = model.state_dict()
    if handle is not None:
        built = {(id(owner), leaf): old for owner, leaf, old, _ in handle.structure.overwritten}
        for prefix, m in model.named_modules():
            for leaf in (*m._parameters, *m._buffers):
                old = built.get((id(m), leaf))
                if old is not None:
                    state[f"{prefix}.{leaf}" if prefix else leaf] = old
    differ = []
    for name, values in saved.items():
        t = state.get(name)
        if t is None or not values:
            continue
        here = torch.tensor(_sample(t), dtype=torch.float64)
        there = torch.tensor(values, dtype=torch.float64)
        if t.is_floating_point():  # saved in fp32, held now in fp16: rounded as it was
            there = there.to(t.dtype).double()
        same_nan = here.isnan() == there.isnan()
        if bool(same_nan.all()) and torch.equal(here.nan_to_num(0.0), there.nan_to_num(0.0)):
            continue
        finite = same_nan & ~here.isnan()
        err = float(torch.linalg.vector_norm((here - there)[finite]).nan_to_num(float("inf")))
        scale = float(torch.linalg.vector_norm(there[finite]).nan_to_num(0.0))
        if not bool(same_nan.all()) or err > WEIGHTS_RTOL * scale:
            differ.append((name, err / scale if scale else float("inf")))
    return differ


def check_prompt_size(
    modules: Iterable[str], sized: Iterable[int] | None, handle: S2AHandle, what: str, fix: str
) -> None:
    """Raise if prompts trained at input size ``sized`` (an adapter's or a checkpoint's,
    ``what``) would load onto prompts S2A sized here for another: with as many positions
    their shapes match and each row sits on another patch or pixel; with others, PyTorch's
    size-mismatch error named neither size. ``fix`` says what to do instead."""
    sized = list(sized or ())
    now = list(handle.structure.input_size)
    if "prompt" not in modules or not sized or sized == now:
        return
    raise ValueError(
        f"{what} prompts were sized for input {tuple(sized)}, and S2A here for {tuple(now)}: "
        "each prompt row belongs to one patch or pixel at that size (with as many positions "
        f"the shapes match, but each row would sit on another). {fix}"
    )
