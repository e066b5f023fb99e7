"""How ``S2ACallback`` takes part in a LightningModule's own hooks: a per-instance wrapper
that runs S2A's step before or after the module's ``setup``, ``configure_model`` or
checkpoint hooks (a deep copy made meanwhile runs its own), and what a module's own ``setup``
may change."""

from __future__ import annotations

import types
from typing import Any

import lightning.pytorch as pl
from torch import nn

_WRAPPED = "_s2a_wrapped_{}"


def wrap_hook(
    pl_module: pl.LightningModule,
    hook: str,
    before: Any = None,
    after: Any = None,
    once: bool = True,
) -> None:
    """Make the module's ``hook`` run ``before(*args)`` first and ``after()`` last: on its next
    call only (``once``), or until :func:`unwrap_hook` (teardown)."""
    unwrap_hook(pl_module, hook)
    original = getattr(pl_module, hook)

    def wrapped(module: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
        if module is not pl_module:  # a deep copy made meanwhile (EMA): its own hook only
            return getattr(type(module), hook)(module, *args, **kwargs)
        if once:
            unwrap_hook(pl_module, hook)
        if before is not None:
            before(*args)
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result

    pl_module.__dict__[_WRAPPED.format(hook)] = True
    # Bound, so that a deep copy's attribute binds to the copy (copy.deepcopy rebinds methods)
    pl_module.__dict__[hook] = types.MethodType(wrapped, pl_module)


def unwrap_hook(pl_module: pl.LightningModule, hook: str) -> None:
    """Give the module its own ``hook`` back, if :func:`wrap_hook` wrapped it."""
    if pl_module.__dict__.pop(_WRAPPED.format(hook), False):
        pl_module.__dict__.pop(hook, None)


def parameter_layout(model: nn.Module) -> list[tuple[str, int]]:
    """Every parameter of ``model``, and every module that holds one, by name and identity:
    what a module's own setup may have added or replaced since S2A was applied (a module
    replaced around the same parameters, ``SyncBatchNorm.convert_sync_batchnorm``, counts; a
    metric or a loss added there holds none)."""
    params = [(n, id(p)) for n, p in model.named_parameters()]
    return params + [(n, id(m)) for n, m in model.named_modules() if m._parameters]
