"""``torch.compile`` and saved-activation compression do not mix: say so, never crash inside it.

The engine compresses what autograd saves through ``saved_tensors_hooks`` and recognises the
operator that saves each tensor with a ``TorchFunctionMode``. Under ``torch.compile`` neither
works as intended: the hooks of a compiled region only see its saved tensors after the whole
region's forward has run (so the peak is not reduced), the operator mode sees no operator
inside compiled code (every tensor would get the generic code, including the exact ones), and
Inductor's compiled backward expects the exact strides of the tensors it saved, which a
quantized copy does not have: training crashes inside Inductor.

So compression refuses compilation, early and clearly:

* :func:`check_not_compiled` at setup (``apply_s2a``): the model, or one of its submodules, is
  a ``torch.compile`` result, was compiled in place with ``module.compile()``, had its
  ``forward`` replaced by a compiled one, or is a LightningModule that Lightning compiled;
* :func:`check_not_jit_traced` when a forward with autograd starts: ``torch.jit.trace``
  cannot record the engine's hooks;
* :func:`check_not_compiling` when a forward starts, and :func:`check_not_traced` when any
  module is entered: the engine is being traced by Dynamo (compiled after ``apply_s2a``), or
  runs eagerly inside a compiled call (after a graph break).

With ``S2AConfig(compress=False)`` (only the structural part, e.g. plain BitFit) compilation
is left alone: nothing is packed.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

MESSAGE = (
    "S2A's saved-activation compression cannot run under torch.compile (compiled code bypasses "
    "the hooks that compress saved tensors, and Inductor's backward cannot take the "
    "compressed ones). Either don't compile the model (drop torch.compile / module.compile() "
    "and pass the uncompiled module), or keep compiling and turn compression off with "
    "S2AConfig(compress=False). To export a trained model (torch.export, torch.jit), call "
    "handle.stop_engine() on it first (handle.remove() takes trained prompts and side "
    "networks out). A copy of an S2A'd model (copy.deepcopy, torch.save/torch.load of the "
    "whole model) runs its engine but has no handle: export the original after its "
    "stop_engine(), or build the model afresh and load an adapter or checkpoint into it."
)

#: Said when ``torch.jit.trace`` records a forward with autograd on (:func:`check_not_jit_traced`).
TRACE_MESSAGE = (
    "torch.jit.trace is recording a forward with autograd on, in which S2A's engine installs "
    "saved-tensor hooks and an operator mode that the tracer cannot record (PyTorch failed "
    "with an internal assert on aten::view, or a failed sanity check). Trace under "
    "torch.no_grad() (the engine stays out of forwards without autograd), or call "
    "handle.stop_engine() first, after training (torch.export too)."
)


class S2ACompileError(RuntimeError):
    """Raised when saved-activation compression meets ``torch.compile``."""


def _optimized_module_type() -> type | None:
    # torch._dynamo is imported by torch.compile itself; if it never was, nothing is compiled
    # (and importing it here would cost a second per apply_s2a).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def _how_compiled(module: nn.Module, optimized: type | None) -> str | None:
    # Instance attributes are read from __dict__: nn.Module.__getattr__ is slow on a miss.
    attrs = module.__dict__
    if optimized is not None and isinstance(module, optimized):
        return "is a torch.compile(...) result"
    if attrs.get("_compiled_call_impl") is not None:
        return "was compiled in place with .compile()"
    if attrs.get("_compiler_ctx"):
        return "is a LightningModule compiled by Lightning (a torch.compile result given to fit)"
    if hasattr(attrs.get("forward"), "_torchdynamo_orig_callable"):
        return "has its forward replaced by torch.compile(module.forward)"
    return None


def compiled_part(module: nn.Module) -> str | None:
    """Where ``module`` is compiled, in words (``"Net.blocks.0 was compiled ..."``), or None."""
    optimized = _optimized_module_type()
    stack = [module]
    while stack:  # a plain walk: named_modules() builds every name, several times slower
        sub = stack.pop()
        stack.extend(m for m in sub._modules.values() if m is not None)
        how = _how_compiled(sub, optimized)
        if how is not None:
            name = next(n for n, m in module.named_modules() if m is sub)
            where = f"{type(module).__name__}.{name}" if name else type(module).__name__
            return f"{where} {how}"
    return None


def check_not_compiled(module: nn.Module, compress: bool = True) -> None:
    """Raise :class:`S2ACompileError` if ``compress`` and any part of ``module`` is compiled,
    or, whatever ``compress``, if ``module`` itself is a ``torch.compile(...)`` wrapper: its
    engine's hooks, on the wrapper and on the module it wraps, made Dynamo fail inside the
    first forward with an error that named neither S2A nor the fix (``AssertionError: ...
    is already tracked for mutation``); a compiled part inside the model trains."""
    optimized = _optimized_module_type()
    if optimized is not None and isinstance(module, optimized):
        raise S2ACompileError(
            f"apply_s2a got a torch.compile(...) result (wrapping "
            f"{type(module._orig_mod).__name__}): S2A's hooks on the wrapper and on the module "
            "it wraps make torch.compile fail in the first forward. Apply S2A to the module "
            "itself; to compile it with S2AConfig(compress=False), compile it after apply_s2a, "
            "or in place with module.compile() (in a LightningModule: "
            "self.encoder.compile() rather than self.encoder = torch.compile(self.encoder))."
        )
    if not compress:
        return
    where = compiled_part(module)
    if where is not None:
        raise S2ACompileError(f"{MESSAGE} Found: {where}.")


def _raise_compiling() -> None:
    raise S2ACompileError(MESSAGE)


# Dynamo does not trace a disabled function: it breaks the graph there and calls it eagerly,
# so the error reaches the user as it is (a `raise` traced by Dynamo would only make it fall
# back to eager and run on). With fullgraph=True, Dynamo refuses instead, quoting the reason.
try:
    _raise_when_traced = torch.compiler.disable(_raise_compiling, reason=MESSAGE)
except TypeError:  # pragma: no cover - torch < 2.7 has no `reason`
    _raise_when_traced = torch.compiler.disable(_raise_compiling)


#: Said when compiled autograd traces the engine's unpack hooks.
BACKWARD_MESSAGE = (
    "S2A's saved-tensor hooks cannot run under compiled autograd (torch._dynamo's "
    "compiled_autograd traces the backward, and with it the hooks' Python: it failed with a "
    "false in-place error, 'version 1; expected version 1'). Run the backward eagerly (turn "
    "compiled autograd off), or stop the engine before the forward (handle.stop_engine()) "
    "for a step without S2A."
)


def _raise_compiled_backward() -> None:
    raise S2ACompileError(BACKWARD_MESSAGE)


try:
    raise_in_compiled_backward = torch.compiler.disable(
        _raise_compiled_backward, reason=BACKWARD_MESSAGE
    )
except TypeError:  # pragma: no cover - torch < 2.7 has no `reason`
    raise_in_compiled_backward = torch.compiler.disable(_raise_compiled_backward)


def _inside_compiled_call() -> bool:
    """True while eager code runs inside a ``torch.compile``d call (after a graph break)."""
    eval_frame = getattr(torch._C, "_dynamo", None)
    get = getattr(getattr(eval_frame, "eval_frame", None), "get_eval_frame_callback", None)
    return get is not None and get() not in (None, False)


def check_not_compiling(model: nn.Module | None = None, compress: bool = True) -> None:
    """Raise :class:`S2ACompileError` if ``compress`` and this forward runs under torch.compile.

    Called when the engine is about to install its hooks, once per forward, so it must be
    cheap (about a microsecond): besides Dynamo tracing this very call, or eager code running
    inside a compiled call, it looks at ``model`` itself (``model.forward =
    torch.compile(model.forward)`` or ``model.compile()`` after ``apply_s2a``). A submodule
    compiled after ``apply_s2a`` is caught by :func:`check_not_traced` in its entry hook.
    """
    if not compress:
        return
    if torch.compiler.is_compiling():
        _raise_when_traced()
    elif _inside_compiled_call():
        raise S2ACompileError(MESSAGE)
    elif model is not None:
        how = _how_compiled(model, _optimized_module_type())
        if how is not None:
            raise S2ACompileError(f"{MESSAGE} Found: {type(model).__name__} {how}.")


def check_not_jit_traced() -> None:
    """Raise :class:`S2ACompileError` if ``torch.jit.trace`` records this forward (called when
    a forward with autograd starts, compressing or not): until 2026-12-07 the trace failed
    inside PyTorch with an internal assert that named neither S2A nor the fix, and left the
    forward open (the next one warned of an interrupted forward)."""
    if torch._C._is_tracing():
        raise S2ACompileError(TRACE_MESSAGE)


def check_not_traced(compress: bool = True) -> None:
    """Raise :class:`S2ACompileError` if ``compress`` and Dynamo is tracing this call.

    Every module's entry hook calls it (0.1 microseconds): a submodule compiled after
    ``apply_s2a`` (``model.blocks[1] = torch.compile(model.blocks[1])``) runs its hooks under
    Dynamo while the engine is already open.
    """
    if compress and torch.compiler.is_compiling():
        _raise_when_traced()
