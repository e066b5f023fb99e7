"""Checks of where S2A goes in a LightningModule: the backbone the callback names (or the
whole module) and the head inside or outside it. A wrong guess here trains the wrong part,
without error: a classifier frozen inside the backbone, a head named where it is not looked
up, a "backbone" that is the head while the encoder beside it trains in full.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parameter import is_lazy

from ..api import get_handle
from ..config import S2AConfig
from ..structure.head import head_guess


def check_head_outside(pl_module: nn.Module, target: nn.Module, name: str) -> None:
    """Raise if no weight outside the backbone ``target`` trains: its head would be frozen.
    A weight is a matrix or a kernel (``dim() > 1``): a CLIP-style ``logit_scale`` or a
    norm's vectors outside passed for a head, and the classifier inside stayed frozen."""
    inside = {id(p) for p in target.parameters()}
    outside = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in inside]
    if any(is_lazy(p) or p.dim() > 1 for p in outside):  # a LazyLinear head: not built yet
        return
    guess, what = head_guess(target)
    hint = f"head={guess!r} ({what})" if guess else "head='...'"
    raise ValueError(
        f"S2ACallback(backbone={name!r}): {type(target).__name__} has no timm "
        f"get_classifier() to find its head, and no weight in {type(pl_module).__name__} "
        "outside it trains (scalars and vectors only, if anything), so the model's classifier "
        "is inside the backbone and would stay frozen. "
        f"Name it: S2ACallback(backbone={name!r}, {hint}); or, to train no head at all, "
        "head=None."
    )


def check_head_inside(pl_module: nn.Module, target: nn.Module, name: str, head: str | None) -> None:
    """Raise where a named head is no module of the backbone ``target`` but one of the
    LightningModule's: the head is looked up inside the backbone, and a head of your own
    beside it trains as you built it. The error said only that the backbone has no such
    submodule (``--s2a.backbone encoder --s2a.head classifier``)."""
    if head is None or head == "auto":
        return
    names = [h.strip() for h in head.split(",") if h.strip()]
    for h in names:
        inner = h.removeprefix(f"{name}.")
        if inner != h and not _has(target, h) and _has(target, inner):
            raise ValueError(
                f"S2ACallback(backbone={name!r}, head={head!r}): the head is looked up inside "
                f"the backbone {name!r}, so name it from there: {inner!r} (not {h!r})."
            )
    outside = [h for h in names if not _has(target, h) and _has(pl_module, h)]
    if outside:
        raise ValueError(
            f"S2ACallback(backbone={name!r}, head={head!r}): the head is looked up inside "
            f"the backbone {name!r}, and {type(pl_module).__name__}.{outside[0]} is outside it, "
            "where it trains as you built it (it is no part of S2A's model). Leave head at "
            "'auto' (a backbone without timm's get_classifier() then trains no head of its "
            "own), or name a module inside the backbone."
        )


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_whole_module_head(pl_module: nn.Module, config: Any) -> None:
    """Raise, for a callback with no backbone named on a module with neither a ``backbone``
    attribute nor timm's ``get_classifier()``, an error that names both ways out: the
    backbone attribute (your head outside it trains as you built it) or the head inside.
    The engine's own error named only the head, for a module laid out as ``self.encoder``
    plus ``self.classifier``, where ``backbone="encoder"`` is what the user needs."""
    if config.head != "auto" or callable(getattr(pl_module, "get_classifier", None)):
        return
    children = [(n, m) for n, m in pl_module.named_children() if any(True for _ in m.parameters())]
    if not children:
        return  # nothing to name; the engine's own error says what is missing
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in children}
    backbone = max(sizes, key=sizes.__getitem__)
    guess, what = head_guess(pl_module)
    head = f"S2ACallback(S2AConfig(head={guess!r})) ({what})" if guess else ""
    listed = ", ".join(f"{n} ({type(m).__name__}, {sizes[n]:,} parameters)" for n, m in children)
    raise ValueError(
        f"S2A: {type(pl_module).__name__} has no `backbone` attribute and no timm "
        "get_classifier(), so S2A cannot tell its backbone from its head (its parts: "
        f"{listed}). Name the backbone: S2ACallback(backbone={backbone!r}) or "
        f"Trainer(strategy=S2AStrategy(backbone={backbone!r})); your head outside it trains "
        "as you built it. Or apply S2A to the whole module and name the head inside it"
        + (f": {head}" if head else ": S2ACallback(S2AConfig(head='...'))")
        + ", or head=None to train no head."
    )


def warn_small_backbone(pl_module: nn.Module, target: nn.Module, name: str) -> None:
    """Warn where what trains in full outside the named backbone outweighs the backbone
    itself: most likely the head was named (``--s2a.backbone classifier``), and the encoder
    beside it trains in full, with none of S2A's savings, said only by the summary's share."""
    inside = {id(p) for p in target.parameters()}
    if any(is_lazy(p) for p in pl_module.parameters()):
        return  # sizes not known yet
    size = sum(p.numel() for p in target.parameters())
    parts, seen = [], set(inside)  # a parameter under two children counts once
    for child_name, child in pl_module.named_children():
        trained = 0
        for p in child.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                trained += p.numel()
        if trained:
            parts.append((trained, child_name))
    if sum(n for n, _ in parts) <= size:
        return
    trained, largest = max(parts)
    rank_zero_warn(
        f"S2ACallback(backbone={name!r}): {type(pl_module).__name__}.{name} holds "
        f"{size:,} parameters, and {sum(n for n, _ in parts):,} outside it train in full "
        f"({largest}: {trained:,}). S2A freezes and compresses only the backbone; the rest "
        "trains and saves its activations as it would without S2A. If the backbone is "
        f"{largest!r}, name it: S2ACallback(backbone={largest!r}) (CLI: --s2a.backbone "
        f"{largest})."
    )


def find_target(
    pl_module: nn.Module, backbone: str | None, config: S2AConfig
) -> tuple[nn.Module, S2AConfig]:
    """The module S2A goes on (the attribute ``backbone`` names, else ``pl_module.backbone``,
    else the whole module) and the config it gets there (``head=None`` where a backbone
    without ``get_classifier()`` leaves the task head outside it), after the checks above."""
    name = backbone or ("backbone" if hasattr(pl_module, "backbone") else None)
    if name is None:
        if get_handle(pl_module) is None:  # (S2A'd already: its handle is reused)
            check_whole_module_head(pl_module, config)
        return pl_module, config
    target = getattr(pl_module, name, None)
    if not isinstance(target, nn.Module):
        what = f"is a {type(target).__name__}" if hasattr(pl_module, name) else "does not exist"
        children = [n for n, _ in pl_module.named_children()]
        raise ValueError(
            f"S2ACallback(backbone={name!r}): {type(pl_module).__name__}.{name} {what}, not "
            "an nn.Module, when S2A is applied (in setup, or right after configure_model "
            "when the module defines one); name the attribute that holds the backbone "
            f"(CLI: --s2a.backbone NAME), one of its modules {children}."
        )
    check_head_inside(pl_module, target, name, config.head)
    if config.head == "auto" and not callable(getattr(target, "get_classifier", None)):
        # No timm head to find: the task head is taken to be the module's own, outside the
        # backbone. If nothing trains there, the backbone's own last layer is the head,
        # and freezing it with the rest would train a random classifier's bias only.
        check_head_outside(pl_module, target, name)
        config = config.replace(head=None)
    if get_handle(target) is None:
        warn_small_backbone(pl_module, target, name)
    return target, config
