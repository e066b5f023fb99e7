"""Where the modules S2A adds live: prompts, the side network.

A module added as a child of a module whose forward runs its children (an ``nn.Sequential``,
a ``ModuleDict`` subclass such as timm's DenseNet blocks, timm's ``RegStage`` looping over
``self.children()``) would run as one of its layers: a prompt added twice, or called with a
list of features. :func:`home` picks the nearest module that does neither; containers are
known by class, loops are found by a :class:`Probe` child during the dry forward that sizes
the blocks (:func:`~.families.block_output_shapes`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: The attribute a probe takes on a module during the dry forward (see :class:`Probe`).
PROBE_NAME = "s2a_probe"


class Probe(nn.Module):
    """Added to a module that is to hold an injected module, for the dry forward only: if it
    runs, the module's forward runs its children (timm's ``RegStage`` loops over
    ``self.children()``), and a prompt added there would run as one of its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.ran = False

    def forward(self, *args: object, **kwargs: object) -> object:
        self.ran = True
        return args[0] if args else None


#: Modules whose forward runs their children (``Sequential``; subclasses of ``ModuleList`` and
#: ``ModuleDict``, such as timm's DenseNet blocks): a module added to one would run too.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def home(
    model: nn.Module, name: str, attr: str, what: str, runners: set[str]
) -> tuple[nn.Module, str, str]:
    """Where a module added for submodule ``name`` lives: ``(owner, owner's name, attribute)``.

    The submodule itself (``blocks.3.s2a_prompt``), unless its forward runs its children: a
    container, or a module the dry forward found doing so (``runners``), would run an added
    child as one of its layers (a prompt added twice, or a DenseNet block calling it with
    its list of features). Then the nearest ancestor that does not, under an attribute that
    spells the path (``s2a_prompt_encoder_0``).
    """
    path = name.split(".") if name else []
    for i in range(len(path), -1, -1):
        owner_name = ".".join(path[:i])
        owner = model.get_submodule(owner_name)
        if not isinstance(owner, CONTAINERS) and owner_name not in runners:
            rest = "_".join(path[i:])
            return owner, owner_name, attr + (f"_{rest}" if rest else "")
    raise ValueError(
        f"{what} needs a module to hold its weights, but the forward of "
        f"{type(model).__name__}, and of every module down to {name or 'it'}, runs its "
        "children (a Sequential, or a loop over its children), so an added module would run "
        "as one of its layers. Wrap the model in an nn.Module whose forward calls it, and "
        "apply S2A to that, naming the blocks inside it (S2AConfig(blocks=...), e.g. "
        "'model.stages.*'): the wrapper has no block table or feature_info of its own."
    )


def like_parameters(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of ``module``'s first parameter (none: empty), to make an added
    module like it."""
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def add_module(
    added: list[tuple[nn.Module, str]], parent: nn.Module, name: str, child: nn.Module, like: dict
) -> None:
    """Add ``child`` to ``parent`` as ``name``, made ``like`` it, noted in ``added`` for the
    undo; a name already taken is an error (never overwritten)."""
    if hasattr(parent, name):
        raise RuntimeError(
            f"{type(parent).__name__} already has an attribute {name!r}: the model has one of "
            "that name, or two blocks whose names spell the same one (a.b and a_b). Name the "
            "blocks with S2AConfig(blocks=[...])."
        )
    parent.add_module(name, child.to(**like))
    added.append((parent, name))
