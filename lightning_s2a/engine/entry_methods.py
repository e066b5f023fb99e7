"""The model's public ``forward_*`` methods as entries of the engine's boundaries: called on
the model itself (``model.forward_features(x)``), such a method runs like a call of a
submodule, so what its own body saves between submodule calls is coded and counted
(:class:`EntryMethod`). Set on the model by :class:`.hooks.SavedTensorEngine` when it
attaches, taken off when it detaches."""

from __future__ import annotations

import inspect
import types
from typing import Any

from torch import nn


class EntryMethod:
    """A public ``forward_*`` method of the S2A'd model, set on the model instance: called
    as ``model.forward_features(x)`` it runs inside the engine's boundaries like a call of
    a submodule, so what the method's own body saves between its submodule calls
    (``F.gelu(self.conv(x))`` in a hand-written ``forward_features``) is coded and counted.
    Until 2026-12-07 such ops ran with no hooks installed: kept full-size, uncounted, with no
    warning (a reviewer's CNN: 10.6 MB kept, 4 KB reported). Inside a forward already open
    (``forward`` calling ``self.forward_features``) it is a plain call."""

    def __init__(self, engine: Any, owner: nn.Module, name: str) -> None:
        self.engine, self.owner, self.name = engine, owner, name
        self._find()

    def _find(self) -> None:
        # the class's function itself, found once (looked up per call under torch.compile,
        # dynamo's re-run found this object again and recursed)
        self.function = inspect.getattr_static(type(self.owner), self.name)
        self.__doc__ = self.function.__doc__

    def __getstate__(self) -> dict[str, Any]:
        # Pickled without the function (a decorated method's wrapper cannot be pickled by
        # name), found again on the owner's class.
        return {"engine": self.engine, "owner": self.owner, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._find()

    @property
    def __signature__(self) -> inspect.Signature:
        """The method's own signature (``inspect.signature(model.forward_head)``)."""
        return inspect.signature(self.function.__get__(self.owner, type(self.owner)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner, engine, function = self.owner, self.engine, self.function
        if engine._depth or engine.model is not owner:
            return function(owner, *args, **kwargs)
        # Not the root's own call (no new account): like the model driven through its parts,
        # forward_features then forward_head add up until a backward runs.
        try:
            engine._enter("", False, owner, args)
        except BaseException:
            engine._leave(owner, args, None)  # as PyTorch's always-called forward hooks do
            raise
        out = None
        try:
            out = function(owner, *args, **kwargs)
            return out
        finally:
            engine._leave(owner, args, out)


def entry_methods(engine: Any) -> list[str]:
    """Set an :class:`EntryMethod` on ``engine.model`` for each public ``forward_*``
    function its class defines (none the instance has set itself); returns their names."""
    model = engine.model
    cls = type(model)
    names = [
        n
        for n in dir(cls)
        if n.startswith("forward_")
        and n not in vars(model)
        and inspect.isfunction(inspect.getattr_static(cls, n))
    ]
    for name in names:
        vars(model)[name] = EntryMethod(engine, model, name)
    return names


def rebind_entry_methods(module: nn.Module) -> None:
    """A shallow copy of the S2A'd model's ``__dict__`` (``nn.DataParallel``'s replicas,
    ``copy.copy``) holds the model's :class:`EntryMethod` objects, which run the model
    itself: called as the copy's root, its entries become the class's methods bound to the
    copy (a replica's ``forward`` calling ``self.forward_features`` ran the original, its
    weights and device). Such copies are not compressed (see the engine docs)."""
    state = vars(module)
    for name, value in list(state.items()):
        if isinstance(value, EntryMethod) and value.owner is not module:
            state[name] = types.MethodType(value.function, module)


def remove_entry_methods(engine: Any, names: list[str]) -> None:
    """Take the engine's :class:`EntryMethod` objects off its model (the class's own methods
    are found again)."""
    model = vars(engine.model) if engine.model is not None else {}
    for name in names:
        method = model.get(name)
        if isinstance(method, EntryMethod) and method.engine is engine:
            del model[name]
