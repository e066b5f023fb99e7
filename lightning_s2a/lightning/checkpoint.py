"""Load a Lightning checkpoint of an S2A run into a fresh LightningModule, in one call.

A checkpoint of a prompt or side run holds the injected modules' weights
(``...s2a_prompt.A``), which a freshly built module does not have, so the ordinary
``MyModule.load_from_checkpoint(path)`` stops at torch's "Unexpected key(s)" error. The
checkpoint also holds the S2A config and which attribute was S2A'd (the callback's state):
:func:`load_from_checkpoint` builds the module as Lightning does, applies S2A the same way
and then loads every weight strictly.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..api import apply_s2a, get_handle
from ..config import S2AConfig
from ..structure.surgery import STATE_DICT_MARKER

M = TypeVar("M", bound=pl.LightningModule)


#: Top-level checkpoint entry with the S2A config and target of a weights-only checkpoint
#: (``ModelCheckpoint(save_weights_only=True)`` saves no callback state).
WEIGHTS_ONLY_KEY = "lightning_s2a"


def s2a_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The S2A callback's state in a loaded checkpoint (config, target, engine), or of a
    weights-only checkpoint (config, target), or None."""
    found = [
        v for v in checkpoint.get("callbacks", {}).values() if isinstance(v, dict) and "config" in v
    ]
    if len(found) > 1:
        raise ValueError(
            "the checkpoint holds the state of several S2A callbacks; load it by hand."
        )
    return found[0] if found else checkpoint.get(WEIGHTS_ONLY_KEY)


def marked_prefixes(checkpoint: dict[str, Any]) -> list[str]:
    """Attributes whose S2A-injected weights the checkpoint holds (from the marker keys)."""
    keys = checkpoint.get("state_dict", {})
    return [k[: -len(STATE_DICT_MARKER)].rstrip(".") for k in keys if k.endswith(STATE_DICT_MARKER)]


def load_from_checkpoint(
    cls: type[M],
    checkpoint_path: str | os.PathLike,
    map_location: Any = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> M:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a module trained with S2A.

    Builds ``cls`` from the checkpoint's hyperparameters (and ``kwargs``) as Lightning does,
    applies S2A with the checkpoint's config to the attribute that was S2A'd, then loads every
    weight strictly unless told otherwise (``strict``; by default the module's own
    ``strict_loading``, as Lightning's): the trained outputs come back exactly. A checkpoint
    without S2A state is loaded as Lightning would.
    """
    if strict is not None:
        kwargs["strict"] = strict  # only where given: Lightning refuses one that contradicts
        # the module's strict_loading
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    state = s2a_state(checkpoint)
    marked = marked_prefixes(checkpoint)
    if state is None and marked:
        where = marked[0] or "the module itself"
        raise ValueError(
            f"{os.fspath(checkpoint_path)!r} holds weights S2A added or held in 4 bits (in "
            f"{where}) but not the S2A config they trained with: a weights-only checkpoint "
            "saved without "
            "S2ACallback's record (after fit, or by an older version). Build the module, "
            "apply_s2a(<that attribute>, <the config it trained with>), then "
            "module.load_state_dict(torch.load(path)['state_dict']); or save checkpoints "
            "during fit."
        )
    if state is None:
        return cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)
    with warnings.catch_warnings():
        # The first pass builds the module and loads what it already has; the S2A keys it
        # reports as unexpected are loaded below, strictly.
        warnings.simplefilter("ignore")
        first = {**kwargs, "strict": False}
        model = cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **first)
    target_name = state["target"]
    try:
        target = model.get_submodule(target_name) if target_name else model
    except AttributeError as err:
        raise ValueError(
            f"the checkpoint's S2A'd module is {cls.__name__}.{target_name}, which the "
            f"rebuilt {cls.__name__} does not have; build it with the same arguments."
        ) from err
    handle = get_handle(target) or apply_s2a(target, S2AConfig.from_saved(state["config"]))
    handle.stop_engine(watch=True)  # hooks on when a Trainer fits it with S2A again
    if "engine" in state:  # a weights-only checkpoint has none (codebooks, forward count)
        handle.engine.load_state_dict(state["engine"])
    load_other_engines(model, handle, state.get("other_engines", {}))
    if strict is None:
        strict = bool(getattr(model, "strict_loading", True))
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model


def other_handles(module: nn.Module | None, own: Any) -> list[tuple[str, Any]]:
    """(path, handle) of every S2A'd module under ``module`` other than ``own``'s: models
    the user S2A'd with ``apply_s2a`` beside the callback's (a second encoder)."""
    if module is None:
        return []
    found = [(path, get_handle(m)) for path, m in module.named_modules()]
    return [(path, h) for path, h in found if h is not None and h is not own and not h.removed]


def load_other_engines(module: nn.Module, own: Any, states: dict[str, Any]) -> None:
    """Restore the engines of the other S2A'd modules under ``module`` (a checkpoint's
    ``other_engines``: their codebooks, widths and forward counts)."""
    found = dict(other_handles(module, own))
    for path, state in states.items():
        if path in found:
            found[path].engine.load_state_dict(state)
        else:
            rank_zero_warn(
                f"the checkpoint holds the S2A engine state of {path or 'the module'}, which "
                "has no S2A applied here: its codes start afresh."
            )


__all__ = [
    "WEIGHTS_ONLY_KEY",
    "load_from_checkpoint",
    "load_other_engines",
    "marked_prefixes",
    "other_handles",
    "s2a_state",
]
