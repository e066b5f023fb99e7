"""The one verb: ``apply_s2a(model, config) -> S2AHandle``."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import nn

from .config import S2AConfig
from .engine.compile_guard import check_not_compiled
from .engine.hooks import SavedTensorEngine
from .structure.rewrites import rewrites_for
from .structure.surgery import StructureState, apply_structure, cast_frozen, undo_structure

_APPLIED: weakref.WeakKeyDictionary[nn.Module, S2AHandle] = weakref.WeakKeyDictionary()


class S2AHandle:
    """What :func:`apply_s2a` returns: statistics of the last forward, and ``remove()``."""

    def __init__(self, model: nn.Module, config: S2AConfig, structure: StructureState) -> None:
        self.model = model
        self.config = config
        self.structure = structure
        self.engine = SavedTensorEngine(
            model,
            config,
            rewrites=rewrites_for(config.surgery, config.compress),
            parts=structure.parts,
        )
        self.engine.attach()
        self.removed = False

    def stats(self) -> dict[str, Any]:
        """Saved-activation bytes of the most recent forward that recorded autograd.

        Keys: ``raw_bytes`` (what an uncompressed run keeps), ``stored_bytes`` (what was kept),
        ``ratio`` (stored / raw), ``by_kind`` (per operator kind) and ``by_part`` (per part of
        the model: "backbone", "prompt", "side", "head").
        """
        return self.engine.stats()

    def trainable_parameters(self) -> tuple[int, float]:
        """Number of trainable parameters and their fraction of all parameters."""
        return count_trainable(self.model)

    def stop_engine(self) -> None:
        """Stop compressing saved tensors; the structural modules stay (e.g. after fit).

        Frozen weights held in ``frozen_dtype`` get their original values and dtype back, so
        a plain full-precision forward works after training.
        """
        self.engine.detach()
        cast_frozen(self.model, self.structure, None)

    def start_engine(self) -> None:
        """Resume compressing saved tensors (and ``frozen_dtype``) after :meth:`stop_engine`."""
        if self.removed:
            raise RuntimeError("this S2A handle was removed; call apply_s2a again.")
        if self.config.frozen_dtype is not None:
            cast_frozen(self.model, self.structure, getattr(torch, self.config.frozen_dtype))
        self.engine.attach()

    def summary(self) -> str:
        """A readable table: per part, trainable parameters and the last forward's bytes."""
        from .summary import format_summary

        return format_summary(self)

    def remove(self) -> None:
        """Undo everything: hooks off, injected modules out, ``requires_grad`` flags back."""
        if self.removed:
            return
        self.engine.detach()
        undo_structure(self.model, self.structure)
        _APPLIED.pop(self.model, None)
        self.removed = True

    def __enter__(self) -> S2AHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_trainable(module: nn.Module) -> tuple[int, float]:
    """Number of parameters of ``module`` that train, and their fraction of all parameters."""
    total = sum(p.numel() for p in module.parameters())
    train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return train, (train / total if total else 0.0)


def config_differences(a: S2AConfig, b: S2AConfig) -> list[str]:
    """Names of the fields in which two configs differ (for errors that say what differs)."""
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def get_handle(module: nn.Module) -> S2AHandle | None:
    """The live :class:`S2AHandle` of ``module`` if ``apply_s2a`` was applied to it, else None."""
    return _APPLIED.get(module)


def apply_s2a(model: nn.Module, config: S2AConfig | None = None, **overrides: Any) -> S2AHandle:
    """Freeze ``model``'s backbone, train only the S2A modules, and compress saved activations.

    ``overrides`` are :class:`S2AConfig` fields (``apply_s2a(model, bits=2)``). The model is
    changed in place; ``handle.remove()`` restores it exactly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_s2a expects an nn.Module, got {type(model).__name__}.")
    config = config if config is not None else S2AConfig()
    if not isinstance(config, S2AConfig):
        raise TypeError(f"config must be an S2AConfig, got {type(config).__name__}.")
    if overrides:
        config = config.replace(**overrides)
    if model in _APPLIED:
        raise RuntimeError(
            "apply_s2a was already applied to this model; call handle.remove() before "
            "applying it again."
        )
    check_not_compiled(model, config.compress)
    structure = apply_structure(model, config)
    handle = S2AHandle(model, config, structure)
    _APPLIED[model] = handle
    return handle
