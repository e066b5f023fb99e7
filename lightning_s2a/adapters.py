"""Per-task adapter files: everything that trained in one model, and nothing else.

S2A trains well under 1-2% of a backbone, so one frozen backbone can serve many tasks, each
stored as a small safetensors file. :func:`save_adapter` writes every trainable parameter
(the S2A modules, and a head that sits outside the backbone) with the S2A config and a
fingerprint of the frozen backbone (its architecture and a few values of each frozen weight:
:mod:`.identity`); :func:`load_adapter` checks the fingerprint, applies S2A with the saved
config (or reuses the matching one already applied) and copies the tensors in, so adapters
can be swapped on one backbone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .api import S2AHandle, apply_s2a, get_handle
from .config import S2AConfig, model_differences
from .identity import (
    backbone_identity,
    check_prompt_size,
    describe,
    frozen_weight_sample,
    weights_differ,
)
from .structure.head import head_modules

FORMAT = "lightning_s2a.adapter"
VERSION = 1


def find_applied(module: nn.Module) -> tuple[str, S2AHandle]:
    """The one S2A'd submodule of ``module`` (itself included): its name and its handle."""
    handles = [(name, get_handle(m)) for name, m in module.named_modules()]
    found = [(name, h) for name, h in handles if h is not None]
    if not found:
        raise ValueError(
            f"{type(module).__name__} has no S2A applied, on itself or any submodule; call "
            "apply_s2a(model, config) on the backbone (and train it) before saving an adapter."
        )
    if len(found) > 1:
        names = [n or "<root>" for n, _ in found]
        raise ValueError(
            f"S2A is applied to several submodules {names}; pass the handle to save, or save "
            "from the submodule itself."
        )
    return found[0]


def adapter_tensors(module: nn.Module, handle: S2AHandle) -> dict[str, torch.Tensor]:
    """What an adapter of ``module`` holds: every parameter that trains, and the buffers that
    training may change, keyed by their names in ``module``.

    Parameters count wherever they sit under ``module``, so a LightningModule's own head
    outside the S2A'd backbone is part of the adapter. Buffers are those of modules that own
    a trainable parameter, of norms with running statistics that may change (BatchNorms in
    train mode, tracking InstanceNorms), and of the parts :func:`_trained_parts` names (the
    head, the wrappers holding the S2A'd model, trained branches off them: a prototype
    head's class centres, kept in a buffer of a module whose only parameters are its child
    Linear's, were left out until 2026-12-07, a loaded model's logits 1.1 off); BatchNorms
    that S2A holds in eval mode never change and are left out.
    """
    held = {id(bn) for bn in handle.held_batch_norms()}
    parts = _trained_parts(module, handle)
    found: dict[str, torch.Tensor] = {}
    for name, m in module.named_modules():
        dot = f"{name}." if name else ""
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        found.update((dot + n, p) for n, p in own)
        # Any norm with running statistics (BatchNorm; InstanceNorm with track_running_stats,
        # which S2A does not hold and which updates them in training as without S2A).
        norm = isinstance(m, nn.modules.batchnorm._NormBase)
        if (own or norm or id(m) in parts) and id(m) not in held:
            skip = m._non_persistent_buffers_set
            found.update((dot + n, b) for n, b in m.named_buffers(recurse=False) if n not in skip)
    return found


def _trained_parts(module: nn.Module, handle: S2AHandle) -> set[int]:
    """``id``s of the modules whose buffers an adapter holds beyond the usual ones: the
    head's; the modules holding the S2A'd model (``module`` itself, wrappers on the way: a
    buffer the LightningModule registers); and the branches off that path with a trainable
    parameter (the user's head, with its child Linear), not frozen ones (a teacher)."""
    target = next(n for n, m in module.named_modules() if m is handle.model)
    inside = {id(m) for m in handle.model.modules()}
    parts = {id(m) for h in head_modules(handle.structure.head) for m in h.modules()}
    for name, m in module.named_modules():
        if id(m) in inside or not (name == "" or target.startswith(f"{name}.")):
            continue  # not on the path from module to the S2A'd model
        parts.add(id(m))
        for child_name, child in m.named_children():
            path = f"{name}.{child_name}" if name else child_name
            on_path = target == path or target.startswith(f"{path}.")
            if not on_path and any(p.requires_grad for p in child.parameters()):
                parts |= {id(x) for x in child.modules()}
    return parts


def save_adapter(
    module: nn.Module, path: str | os.PathLike, handle: S2AHandle | None = None
) -> None:
    """Write everything that trained under ``module`` to a safetensors file at ``path``.

    ``module`` is the S2A'd model or a parent of it (e.g. a LightningModule holding it, with
    its own head outside the backbone); keys are names relative to ``module``. The file also
    holds the S2A config and a fingerprint of the frozen backbone, so that
    :func:`load_adapter` on a fresh ``module`` reproduces the trained outputs exactly.
    """
    if handle is None:
        prefix, handle = find_applied(module)
    else:
        prefix = next((n for n, m in module.named_modules() if m is handle.model), None)
        if prefix is None or handle.removed:
            raise ValueError("the given handle's model is not (or no longer) S2A'd under module.")
    tensors = {
        k: t.detach().cpu().clone().contiguous() for k, t in adapter_tensors(module, handle).items()
    }
    if not any(t.is_floating_point() for t in tensors.values()):
        raise ValueError(f"nothing trains under {type(module).__name__}: nothing to save.")
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "s2a_config": json.dumps(dataclasses.asdict(handle.config)),
        "backbone": json.dumps(backbone_identity(handle.model, handle)),
        # a few values of each frozen tensor: the adapter means nothing on other weights
        "frozen_weights": json.dumps(frozen_weight_sample(handle.model, handle)),
        "prefix": prefix,
        # the size prompts were sized for: another with as many positions loads by shape
        "input_size": json.dumps(list(handle.structure.input_size)),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a safetensors file ({err}); not an S2A adapter.") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not an S2A adapter (metadata format="
            f"{metadata.get('format')!r}, expected {FORMAT!r}); write one with save_adapter."
        )
    if metadata.get("version") != str(VERSION):
        raise ValueError(f"{path}: adapter version {metadata.get('version')!r} is not {VERSION}.")
    return metadata, load_file(os.fspath(path))


def load_adapter(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> S2AHandle:
    """Load an adapter written by :func:`save_adapter` into ``module`` and return its handle.

    Applies S2A with the saved config if the target has none; reuses the handle if a config
    that computes the same function is already applied (swapping adapters on one backbone;
    fields that only store saved tensors otherwise, such as ``bits``, stay as applied).
    ``strict`` requires the file's keys to be exactly what :func:`adapter_tensors` lists for
    ``module`` (a head outside the backbone included); shapes must always match.
    """
    metadata, tensors = _read(path)
    prefix = metadata.get("prefix", "")
    try:
        target = module.get_submodule(prefix) if prefix else module
    except AttributeError as err:
        raise ValueError(
            f"the adapter was saved from a module whose S2A'd submodule is {prefix!r}, but "
            f"{type(module).__name__} has no such submodule; load into the same wrapper type, "
            "or into that submodule after renaming its keys."
        ) from err
    try:
        config = S2AConfig.from_saved(json.loads(metadata["s2a_config"]))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: the adapter's S2A config cannot be read: {err}") from err
    handle = get_handle(target)
    saved, here = json.loads(metadata["backbone"]), backbone_identity(target, handle)
    required = ("class", "num_params", "shape_sha256")
    # Absent from adapters written before 2026-12-06 (buffers) or of non-timm models.
    optional = ("architecture", "buffer_sha256")
    differs = [k for k in required if saved.get(k) != here[k]] + [
        k for k in optional if None not in (saved.get(k), here[k]) and saved[k] != here[k]
    ]
    if differs:
        raise ValueError(
            f"adapter was trained on {describe(saved)}, this backbone is {describe(here)} "
            f"(differs in {', '.join(differs)}). Build the same architecture with the same "
            "constructor arguments (num_classes, depth, img_size, ...) as the adapter's backbone."
        )
    sample = json.loads(metadata.get("frozen_weights", "{}"))  # absent before 2026-12-07
    differ = weights_differ(target, sample, handle)
    if differ:
        shown = ", ".join(f"{n} ({rel:.2g} off)" for n, rel in differ[:3])
        raise ValueError(
            f"adapter was trained on other frozen weights: {len(differ)} of {len(sample)} "
            f"frozen tensors of this {describe(here)} hold other values ({shown}"
            f"{', ...' if len(differ) > 3 else ''}), and its trained modules would compute "
            "another function on them. Build the backbone with the weights it was trained on "
            "(timm: the same pretrained=True checkpoint; the same frozen head), or load its "
            "weights first."
        )
    created = handle is None
    if created:
        handle = apply_s2a(target, config)
    elif model_differences(config, handle.config):
        # Only what changes the function the model computes: the fields that change how saved
        # tensors are stored (bits, backend, calibration) may differ, as on a resumed fit.
        fields = model_differences(config, handle.config)
        raise ValueError(
            f"this backbone already has S2A applied with a different config (fields {fields} "
            "differ from the adapter's); call handle.remove() first, then load_adapter applies "
            "the adapter's config."
        )
    sized = json.loads(metadata.get("input_size", "[]"))  # absent before 2026-12-07
    try:
        check_prompt_size(
            config.modules,
            sized,
            handle,
            "the adapter's",
            f"Apply S2A with S2AConfig(input_size={tuple(sized)}) before loading (or load into "
            "a fresh model).",
        )
    except ValueError:
        if created:
            handle.remove()
        raise
    expected = adapter_tensors(module, handle)
    everything = dict(module.named_parameters()) | dict(module.named_buffers())
    # Adapters saved before 2026-12-06 with bn_mode="eval" hold no running statistics of a
    # BatchNorm in the head (then held in eval mode on those of the model as built): where all
    # of one BatchNorm's are absent, the model's own stay.
    legacy = _absent_statistics(module, tensors.keys(), config.bn_mode == "eval")
    legacy |= _absent_part_buffers(module, handle, tensors.keys())
    # add_bias gave nn.MultiheadAttention(bias=False) no in_proj_bias before 2026-12-07:
    # absent, it stays zero, the function that adapter trained with.
    added = {id(getattr(m, attr)) for m, attr in handle.structure.added_biases}
    legacy |= {
        k
        for k, t in expected.items()
        if k.endswith("in_proj_bias") and id(t) in added and k not in tensors
    }
    missing = sorted(expected.keys() - tensors.keys() - legacy)
    unexpected = sorted(tensors.keys() - everything.keys())
    mismatched = [
        f"{k}: file {tuple(t.shape)} vs model {tuple(everything[k].shape)}"
        for k, t in sorted(tensors.items())
        if k in everything and t.shape != everything[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        if created:
            handle.remove()  # leave the model as it was found
        moved = any("s2a_prompt_" in k for k in missing) and any(
            ".s2a_prompt." in k for k in unexpected
        )
        raise ValueError(
            f"adapter {path} does not fit {type(module).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches {mismatched}. "
            + (
                "Its prompts sit inside blocks that run their children, where a prompt ran "
                "twice; this version holds them outside such blocks (docs/structure.md), so "
                "an adapter saved before that cannot be loaded: train it again."
                if moved
                else "Load it into the same LightningModule or model class it was saved from."
            )
        )
    # What remove() puts back: the model's own values this load writes over, whether it
    # applied S2A or found it applied (by the user or a fit: until 2026-12-07 those kept the
    # adapter's values after remove()); a later load (a swap) updates what they are compared
    # with (see undo_structure).
    overwritten = handle.structure.overwritten
    added = handle.structure.added_tensor_ids()
    if strict:  # strict=False loads what the file holds and touches nothing else
        _revert_absent(module, overwritten, [k for k in tensors if k in everything])
    index = {(owner, leaf): i for i, (owner, leaf, _, _) in enumerate(overwritten)}
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key not in everything:
                continue
            current = everything[key]
            owner, _, leaf = key.rpartition(".")
            place = (module.get_submodule(owner), leaf)
            own = id(current) not in added
            old = current.detach().clone() if own else None
            current.copy_(tensor)
            if own:
                overwritten.append((*place, old, current.detach().clone()))
            elif place in index:
                _, _, old, _ = overwritten[index[place]]
                overwritten[index[place]] = (*place, old, current.detach().clone())
    return handle


def _revert_absent(module: nn.Module, overwritten: list, keys: list[str]) -> None:
    """A swap: the model's own tensors an earlier adapter wrote that this one does not hold
    (a norm task A unfroze and trained) go back to their values as built, as in a fresh
    model; until 2026-12-07 they kept task A's (a reviewer's swapped ViT: logits 0.04 off
    task B's)."""
    places = set()
    for key in keys:
        owner, _, leaf = key.rpartition(".")
        places.add((id(module.get_submodule(owner)), leaf))
    stale = [e for e in overwritten if (id(e[0]), e[1]) not in places]
    with torch.no_grad():
        for owner, leaf, before, _ in reversed(stale):  # back to the first value: as built
            tensor = owner._parameters.get(leaf, owner._buffers.get(leaf))
            if tensor is not None and tensor.shape == before.shape:
                tensor.copy_(before)
    overwritten[:] = [e for e in overwritten if (id(e[0]), e[1]) in places]


def _absent_part_buffers(module: nn.Module, handle: S2AHandle, present: Any) -> set[str]:
    """Buffers of head and outside parts that own no trainable parameter, absent from an
    adapter: adapters saved before 2026-12-07 left them out (see :func:`adapter_tensors`);
    those keep the model's values, as then."""
    parts, present, absent = _trained_parts(module, handle), set(present), set()
    for name, m in module.named_modules():
        if id(m) not in parts or any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        dot = f"{name}." if name else ""
        absent |= {dot + n for n, _ in m.named_buffers(recurse=False)} - present
    return absent


def _absent_statistics(module: nn.Module, present: Any, batch_norms: bool) -> set[str]:
    """Names of the running-statistics buffers of the norms under ``module`` of which
    ``present`` (an adapter's keys) holds none at all: tracking InstanceNorms (adapters saved
    before 2026-12-06 left them out), and BatchNorms where ``batch_norms``."""
    present, absent = set(present), set()
    kinds = (
        (nn.modules.batchnorm._NormBase,)
        if batch_norms
        else (nn.modules.instancenorm._InstanceNorm,)
    )
    for name, m in module.named_modules():
        if isinstance(m, kinds):
            keys = {f"{name}.{leaf}" if name else leaf for leaf, _ in m.named_buffers()}
            if not keys & present:
                absent |= keys
    return absent


__all__ = [
    "adapter_tensors",
    "backbone_identity",
    "find_applied",
    "get_handle",
    "load_adapter",
    "save_adapter",
]
