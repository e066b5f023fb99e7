"""The task head that stays trainable, which parameters are biases (BitFit), and the checks
that a named head is the whole of it (parallel heads, auxiliary heads named after it)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import nn

from ..engine.ops import is_bias

if TYPE_CHECKING:
    from ..config import S2AConfig

__all__ = [
    "HeadGroup",
    "check_parallel_heads",
    "find_head",
    "head_guess",
    "head_modules",
    "is_bias",
    "warn_named_alike",
]


class HeadGroup(nn.ModuleList):
    """Several heads from one ``get_classifier()``: a distilled model's class and distillation
    heads (timm's DeiT-distilled, LeViT, EfficientFormer). All of them stay trainable."""


def head_modules(head: nn.Module | None) -> list[nn.Module]:
    """The head modules themselves: the members of a :class:`HeadGroup`, else ``[head]``."""
    if head is None:
        return []
    return list(head) if isinstance(head, HeadGroup) else [head]


def find_head(model: nn.Module, head: str | None) -> nn.Module | None:
    """The head that stays trainable: timm's ``get_classifier()``, a named submodule, or None.

    A ``get_classifier()`` without parameters (timm's ``num_classes=0`` Identity) is no head;
    one that returns several modules (distilled models) gives a :class:`HeadGroup`.
    """
    if head is None:
        return None
    if head == "auto":
        get = getattr(model, "get_classifier", None)
        if not callable(get):
            heads = _last_linears(model)
            if hasattr(model, "feature_info"):  # timm's features_only: feature maps out
                raise ValueError(
                    f"head='auto' needs a model with timm's get_classifier(); "
                    f"{type(model).__name__} has none. Pass head=None (its feature maps go "
                    "to your own head outside it)"
                    + ("; its last Linear is a layer of a block, no head." if heads else ".")
                )
            name, what = head_guess(model)
            guess = f"{what}: S2AConfig(head={name!r})" if name else "e.g. S2AConfig(head='fc')"
            raise ValueError(
                f"head='auto' needs a model with timm's get_classifier(); "
                f"{type(model).__name__} has none. Name the head, {guess}, "
                "or pass head=None to train no head."
            )
        found = get()
        if (
            isinstance(found, (tuple, list))
            and found
            and all(isinstance(h, nn.Module) for h in found)
        ):
            heads = [h for h in found if any(True for _ in h.parameters())]
            if len(heads) <= 1:
                return heads[0] if heads else None
            return HeadGroup(heads)
        if not isinstance(found, nn.Module):
            raise ValueError(
                f"{type(model).__name__}.get_classifier() returned {type(found).__name__}, "
                "not a module; name the head with S2AConfig(head='...')."
            )
        # timm's num_classes=0 leaves an Identity there: the model has no head of its own.
        return found if any(True for _ in found.parameters()) else None
    if "," in head:  # several heads by name: a model that combines parallel heads
        return HeadGroup(_named_heads(model, head))
    if not head.strip():
        raise ValueError(
            f"head={head!r} names {type(model).__name__} itself, and all of it would train. "
            "Name the head submodule, S2AConfig(head='fc'), or pass head=None."
        )
    try:
        return model.get_submodule(head)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        if head in dict(model.named_parameters()):  # CLIP's logit_scale
            raise ValueError(
                f"head={head!r} is a parameter of {type(model).__name__}, not a module: a "
                "head is a module whose output S2A knows. S2A freezes such a parameter with "
                f"the backbone; to train it, set model.{head}.requires_grad_(True) after "
                "apply_s2a (in a LightningModule: after the callback's setup, e.g. in "
                "on_fit_start), and name only modules in head=."
            ) from None
        raise ValueError(
            f"head={head!r}: {type(model).__name__} has no submodule of that name; "
            f"its top-level children are {names}."
        ) from None


def _named_heads(model: nn.Module, head: str) -> list[nn.Module]:
    """The heads of ``head='a,b'``: each name once, none empty, none inside another (a head
    named twice had the side's output added twice, an empty one was the whole model)."""
    names = [name.strip() for name in head.split(",")]
    heads = [find_head(model, name) for name in names if name]
    repeated = len(set(names)) != len(names)
    nested = [
        (a, b)
        for a, first in zip(names, heads, strict=False)
        for b, second in zip(names, heads, strict=False)
        if first is not second and any(m is second for m in first.modules())
    ]
    if len(heads) != len(names) or repeated or nested:
        why = (
            "an empty name"
            if len(heads) != len(names)
            else "a name given twice"
            if repeated
            else f"{nested[0][1]!r} inside {nested[0][0]!r}"
        )
        raise ValueError(
            f"head={head!r} has {why}: name each head once, separated by commas "
            "(S2AConfig(head='head,head_dist'))."
        )
    return heads


def head_guess(model: nn.Module) -> tuple[str, str]:
    """The head to suggest for a model without ``get_classifier()``, and what it is: an MLP
    head (an ``nn.Sequential`` of Linears, activations, norms and dropout) that ends in the
    model's last Linear, whole (naming that Linear alone left the MLP's first layers frozen,
    silently); else the last Linear, with the heads beside it; ``("", "")`` for none."""
    dense = _dense_classifier(model)
    if dense:
        return dense
    heads = _last_linears(model)
    if len(heads) > 1:  # parallel heads whose outputs the model combines
        return ",".join(heads), "all of its last Linears"
    if not heads:
        return "", ""
    parent = heads[0].rpartition(".")[0]
    container = model.get_submodule(parent) if parent else None  # the model itself: no head
    layers = list(container.children()) if isinstance(container, nn.Sequential) else []
    mlp = sum(isinstance(m, nn.Linear) for m in layers) > 1 and all(
        isinstance(m, nn.Linear)
        or (not list(m.children()) and all(p.dim() <= 1 for p in m.parameters()))
        for m in layers
    )
    if mlp:
        return parent, "the MLP head that ends in its last Linear"
    return heads[0], "its last Linear"


def _dense_classifier(model: nn.Module) -> tuple[str, str] | None:
    """A dense head, where the model's last weighted layer is a 1x1 convolution: the
    outermost module named as a head or classifier that holds such a convolution (SegFormer's
    ``decode_head``: its ``classifier`` conv came after the per-scale Linear projections, and
    the last of those was suggested, leaving the classifier frozen, random after a
    class-count change). Auxiliary heads (``aux_classifier``, ``auxiliary_head``, registered
    after the main one) are passed over; a body whose 1x1 convolutions sit in no head
    (a ResNet with ``fc = Identity``) has none: None."""
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    if not layers or not _pointwise(layers[-1][1]):
        return None
    for name, module in reversed(layers):
        if not _pointwise(module):
            continue
        parts = name.split(".")
        for depth in range(1, len(parts)):  # outermost first: the whole head
            leaf = parts[depth - 1].lower()
            if "aux" in leaf:
                break
            if "head" in leaf or "classifier" in leaf:
                return ".".join(parts[:depth]), "the dense head that ends in a 1x1 conv"
    return None


def _pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and set(module.kernel_size) == {1}


def _last_linears(model: nn.Module) -> list[str]:
    """The model's last Linear, with the heads beside it (:func:`parallel_heads`: Hugging
    Face's DeiT-with-teacher averages a class and a distillation head), in model order."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return []
    last_name, last = linears[-1]
    heads = {last_name, *parallel_heads(model, last)}
    return [n for n, _ in linears if n in heads]


_LISTS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def parallel_heads(model: nn.Module, head: nn.Module) -> list[str]:
    """Names of Linears beside a named Linear head with its shape: heads the model may
    combine with it (a class and a distillation head), which naming one leaves frozen.
    Linears in one list (``nn.ModuleList``, ``nn.Sequential``) are layers in turn, not
    heads side by side."""
    names = {id(m): n for n, m in model.named_modules()}
    name = names.get(id(head))
    if name is None or not isinstance(head, nn.Linear):
        return []
    parent = name.rpartition(".")[0]
    if isinstance(model.get_submodule(parent), _LISTS):
        return []
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m is not head
        and n.rpartition(".")[0] == parent
        and (m.in_features, m.out_features) == (head.in_features, head.out_features)
    ]


def check_parallel_heads(model: nn.Module, head: nn.Module | None, config: S2AConfig) -> list[str]:
    """Refuse or say a named Linear head with a sibling of its shape (Hugging Face's
    DeiT-with-teacher averages a class and a distillation head): naming one leaves the
    other frozen, and half of each prediction comes from it. An error for 'side' (which
    replaces the named one alone), said otherwise. Returns those siblings."""
    others = parallel_heads(model, head) if head is not None else []
    if not others or config.head in (None, "auto") or "," in str(config.head):
        return others
    get = getattr(model, "get_classifier", None)
    found = get() if callable(get) else None
    if isinstance(found, (tuple, list)) and any(h is head for h in found):
        return others  # timm's distilled models: head='auto' takes both
    both = ",".join([str(config.head), *others])
    text = (
        f"head={config.head!r} has {others} beside it with the same shape: a model that "
        "combines parallel heads (a class and a distillation head) would keep the others "
        f"frozen in its output. Name them all, S2AConfig(head={both!r})"
    )
    if "side" in config.modules:
        raise ValueError(f"'side' with {text}.")
    warnings.warn(f"{text}, unless the model does not combine them.", stacklevel=5)
    return others


def warn_named_alike(model: nn.Module, said: list[str], config: S2AConfig) -> None:
    """Say where a named head has siblings named after it with weights of their own
    (torchvision's ``aux_classifier`` beside ``classifier``, a ``pre_classifier``): they
    stay frozen, biases aside, while the model's outputs (an auxiliary loss) come from them
    (a reviewer's DeepLabV3 trained 2 of its aux head's 5 parameters, silently). ``said``:
    the parallel heads :func:`check_parallel_heads` found, not said twice."""
    if not isinstance(config.head, str) or config.head == "auto":
        return
    named = [h.strip() for h in config.head.split(",") if h.strip()]
    alike = []
    for name in named:
        parent, _, leaf = name.rpartition(".")
        if leaf.isdecimal():  # a Sequential's index: no name to share
            continue
        owner = model.get_submodule(parent) if parent else model
        for child, module in owner.named_children():
            path = f"{parent}.{child}" if parent else child
            if (
                leaf in child.split("_")  # a word of its name: aux_classifier, head_dist
                and child != leaf
                and path not in named
                and path not in said  # said as a parallel head already
                and any(p.dim() > 1 for p in module.parameters())
            ):
                alike.append(path)
    if alike:
        both = ",".join([*named, *alike])
        warnings.warn(
            f"S2A: head={config.head!r} has {alike} beside it, named after it, with weights "
            "of its own (an auxiliary classifier, a layer of the head): they stay frozen, "
            "biases aside. If the model's outputs come from them, name them too: "
            f"S2AConfig(head={both!r}).",
            stacklevel=5,
        )
