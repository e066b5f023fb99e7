"""The task head that stays trainable, and which parameters are biases (BitFit)."""

from __future__ import annotations

from torch import nn

from ..engine.ops import is_bias

__all__ = ["find_head", "is_bias"]


def find_head(model: nn.Module, head: str | None) -> nn.Module | None:
    """The head that stays trainable: timm's ``get_classifier()``, a named submodule, or None.

    A ``get_classifier()`` without parameters (timm's ``num_classes=0`` Identity) is no head.
    """
    if head is None:
        return None
    if head == "auto":
        get = getattr(model, "get_classifier", None)
        if not callable(get):
            raise ValueError(
                f"head='auto' needs a model with timm's get_classifier(); "
                f"{type(model).__name__} has none. Name the head, e.g. S2AConfig(head='fc'), "
                "or pass head=None to train no head."
            )
        found = get()
        if not isinstance(found, nn.Module):
            raise ValueError(
                f"{type(model).__name__}.get_classifier() returned {type(found).__name__}, "
                "not a module; name the head with S2AConfig(head='...')."
            )
        # timm's num_classes=0 leaves an Identity there: the model has no head of its own.
        return found if any(True for _ in found.parameters()) else None
    try:
        return model.get_submodule(head)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"head={head!r}: {type(model).__name__} has no submodule of that name; "
            f"its top-level children are {names}."
        ) from None
