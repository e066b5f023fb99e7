"""Which parameters train: freezing the backbone, finding the task head, BitFit biases."""

from __future__ import annotations

from torch import nn

from ..config import S2AConfig


def find_head(model: nn.Module, head: str | None) -> nn.Module | None:
    """The head that stays trainable: timm's ``get_classifier()``, a named submodule, or None."""
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
        return found
    try:
        return model.get_submodule(head)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(
            f"head={head!r}: {type(model).__name__} has no submodule of that name; "
            f"its top-level children are {names}."
        ) from None


def is_bias(name: str) -> bool:
    """True for a bias parameter (``*.bias``), the parameters BitFit trains."""
    return name.rsplit(".", 1)[-1] == "bias"


def select_trainable(model: nn.Module, config: S2AConfig) -> dict[str, bool]:
    """Freeze ``model`` except the config's trainable parameters.

    Returns the original ``requires_grad`` flags by parameter name, so they can be restored.
    """
    if "prompt" in config.modules or "side" in config.modules:
        raise NotImplementedError(
            f"modules={config.modules}: only 'bias' is implemented in this version; "
            "'prompt' and 'side' are not available yet."
        )
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    head = find_head(model, config.head)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in head_ids or ("bias" in config.modules and is_bias(name)))
    if not any(p.requires_grad for p in model.parameters()):
        restore_flags(model, original)
        raise ValueError(
            f"nothing left to train: {type(model).__name__} has no bias parameters and no head "
            f"(head={config.head!r}). Name a head with S2AConfig(head='...')."
        )
    return original


def restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Put back ``requires_grad`` flags recorded by :func:`select_trainable`."""
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
