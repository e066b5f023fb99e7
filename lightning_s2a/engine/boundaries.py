"""Where a forward starts and ends: the module hooks of :class:`.hooks.SavedTensorEngine`,
in a file of their own (the engine mixes them in).

The outermost module call with autograd on installs the saved-tensor hooks and the operator
mode and opens an account; its end removes them. The model's public ``forward_*`` methods
(``forward_features``, ``forward_head``) called on the model itself are such calls too
(:class:`.entry_methods.EntryMethod`): the ops written in their own bodies, between
submodule calls, ran with nothing installed. A forward that never returned (a
``KeyboardInterrupt`` skips PyTorch's always-called forward hooks) is found by its frame no
longer executing and ended at the next module call.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .accounting import ForwardAccount
from .calibration import check_calibrated_shape
from .compile_guard import check_not_compiling, check_not_jit_traced, check_not_traced
from .contexts import foreign_autograd_context, functorch_transform, redirected_call
from .entry_methods import rebind_entry_methods
from .ops import is_bias
from .packed import in_backward
from .recognition import OperatorMode


class BoundariesMixin:
    """The engine's forward boundaries (see :class:`.hooks.SavedTensorEngine` for the state
    they read)."""

    def _end_interrupted(self, failed: bool = False) -> None:
        """Uninstall what a forward that never returned left installed: a
        ``KeyboardInterrupt`` (or ``SystemExit``) skips the always-called forward hooks
        (torch runs them for ``Exception`` only), which left the saved-tensor hooks and the
        operator mode on the thread, coding every later forward of any module."""
        if self._active:
            self._deactivate(failed)
        self._depth = 0
        self._redirects.clear()
        self._frames = []
        self._entry_frame = self._entry_exception = None

    # -- forward boundaries ------------------------------------------------------------
    def _enter(self, name: str, is_root: bool, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of module ``name`` (bound with ``functools.partial``)."""
        if self.model is None:  # the inert engine of a copied part (see __deepcopy__)
            if is_root:
                raise RuntimeError(
                    f"This copy of the S2A model ({self._inert_root}) was made through one "
                    "of its parts: copy.deepcopy reached a submodule registered under a "
                    "second name before the model itself, and the copy's engine knows no "
                    "model, so its saved tensors would be neither compressed nor counted. "
                    "Copy the model S2A was applied to (or the object that registers it "
                    "first), or apply_s2a to a copy made before."
                )
            return
        if is_root and module is not self.model:
            rebind_entry_methods(module)  # a shallow copy of the model (a replica)
        if is_root and redirected_call(module):
            # Lightning's DDP step through the model's call: no forward (the loss, the
            # metrics); the real one runs inside it. Its post-hook finds this depth again.
            self._redirects.append(self._depth)
            return
        if self.end_interrupted():  # the open forward was interrupted
            warnings.warn(
                f"S2A: an earlier forward of {type(self.model).__name__} never returned (a "
                "KeyboardInterrupt or SystemExit inside it skips PyTorch's forward hooks); "
                "what it left installed is removed now. Until this forward, everything run "
                "with autograd had its saved tensors coded by S2A.",
                stacklevel=3,
            )
        if not self._depth:
            self._entry_frame = sys._getframe(1)
            # the exception being handled where it began, if any (a retry in an except
            # block): at its end, another one being handled is one this forward raised
            self._entry_exception = sys.exc_info()[1]
        # Depth first: if activating raises, the always-called forward hook still pops
        # this level, so the count never goes negative.
        self._depth += 1
        check_not_traced(self.config.compress)
        if self._depth == 1:
            self._began_without_grad = not torch.is_grad_enabled()
        if self._depth == 1 and torch.is_grad_enabled():
            check_not_jit_traced()
            check_not_compiling(self.model, self.config.compress)  # before any change
            stay_out = foreign_autograd_context() or functorch_transform()
            if stay_out:  # (in backward too: a reentrant checkpoint's recomputation)
                self.forwards_out += 1
                if not in_backward():
                    self._warn_staying_out()
            if not stay_out:
                self._activate(is_root)
                # The model's input is what a statistic is smaller than before anything is
                # saved (a gate saved ahead of its feature map: see ``reduced``).
                inputs = [a for a in args if isinstance(a, torch.Tensor)]
                for a in inputs:
                    self._remember(a)
                check_calibrated_shape(self, tuple(inputs[0].shape) if inputs else None)
                # no "weight in another form", whatever its size (see ``constant``); only
                # codes need it (compress=False may run under torch.compile, which cannot
                # trace storage reads)
                self._input_ptrs = set()
                if self.config.compress:
                    for a in inputs:
                        if a.layout == torch.strided:
                            self._input_ptrs.add(a.untyped_storage().data_ptr())
        if self._active and name == "" and not is_root:
            # An entry method's body (EntryMethod): one count of its ops per account, as
            # in the model's own forward. Counted per entry, forward_head's GELU took the
            # site, and the codebook, of forward_features' first GELU.
            self._frames.append(["", self._entry_counts, 0])
        elif self._active:
            # A module called more than once in a forward (one nn.GELU shared by every
            # block) sees other inputs each time: each call has codebooks of its own.
            occurrence = self._entries.get(name, 0)
            self._entries[name] = occurrence + 1
            self._frames.append([name, {}, occurrence])

    def end_interrupted(self) -> bool:
        """End a forward that never returned (a ``KeyboardInterrupt`` inside it), if one is
        open, and say whether there was one: at the next module call, and between steps
        (the Lightning callback's teardown), so that what it left installed comes off."""
        if self._depth and not _running(self._entry_frame):
            self._end_interrupted(failed=True)
            return True
        return False

    def _warn_staying_out(self) -> None:
        """Say once that a forward ran with autograd but uncompressed, uncounted."""
        if self._warned_out:
            return
        self._warned_out = True
        warnings.warn(
            f"S2A stays out of this forward of {type(self.model).__name__}: other saved-"
            "tensor hooks are installed (torch.autograd.graph.save_on_cpu, or the whole "
            "model inside torch.utils.checkpoint) or a torch.func transform (grad, vmap) "
            "runs it, so its saved tensors are neither compressed nor counted, and stats() "
            "still shows an earlier forward (said once).",
            stacklevel=3,
        )

    def _warn_grad_inside(self, output: Any) -> None:
        """Say once that a forward begun without autograd turned it on inside (and returned
        something with a gradient): the engine, which starts where a forward begins, was
        not running, so what that forward saved is neither compressed nor counted."""
        # (a tensor, the usual output of every no-grad evaluation forward, read directly)
        leaves = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            return
        self._warned_grad_inside = True
        warnings.warn(
            f"S2A stays out of this forward of {type(self.model).__name__}: it began without "
            "autograd (under torch.no_grad()) and turned autograd on inside "
            "(torch.enable_grad), so what it saved for backward is neither compressed nor "
            "counted, and stats() still shows an earlier forward. Call the model with "
            "autograd on to compress it (said once).",
            stacklevel=3,
        )

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.model is None:  # the inert engine of a copied part
            return
        if self._redirects and self._redirects[-1] == self._depth and module is self.model:
            self._redirects.pop()  # the redirected call's own end
            return
        if self._active and self._frames:
            self._frames.pop()
        self._depth -= 1
        if self._depth == 0:
            self._entry_frame = None  # it holds the forward's locals
            raised = sys.exc_info()[1]  # torch calls this hook in its except block
            failed = raised is not None and raised is not self._entry_exception
            self._entry_exception = None
            if self._active:
                self._deactivate(failed)
            elif self._began_without_grad and not self._warned_grad_inside:
                self._warn_grad_inside(output)

    def begin_step(self) -> None:
        """Mark a training step's start: from now on every forward until the next step adds
        to one account (two views of a batch through the model are alive together), not only
        forwards of submodules. The Lightning callback calls it before each batch."""
        self._settle()  # the last step's account, whole, before its peak is forgotten
        self._per_step = True
        self._fresh = True
        self._step_peak = None

    def end_steps(self) -> None:
        """Back to per-forward accounting after a run that marked steps (:meth:`begin_step`),
        as :meth:`detach` does for an engine that stays attached."""
        self._per_step = self._fresh = False

    def _activate(self, is_root: bool) -> None:
        # A forward of the whole model starts a new account (outside steps marked by
        # begin_step). Forwards of submodules (the model driven through its parts) add up
        # until a backward has run, because all of their saved tensors are alive together.
        fresh, self._fresh = self._fresh, False
        if fresh or self._account is None or self._unpacked or (is_root and not self._per_step):
            self._open_account()
        self._account.begin()  # what a forward that raises gives back (see _deactivate)
        self._peak_before = self._step_peak
        self.forwards += 1
        self._frames = []
        self._entries = {}
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        mode = OperatorMode(self)
        hooks.__enter__()
        mode.__enter__()
        self._contexts = [hooks, mode]
        self._active = True

    def _open_account(self) -> None:
        """Start a new account: a forward of the whole model, the first save of a marked
        step, or the first after a backward."""
        self._settle()  # the account ending: what other modules added to it counts
        self._refresh_parameters()
        for check in self.step_checks:
            check()
        self.step += 1
        self._account = ForwardAccount()
        self._copies: dict = {}  # kept views' copies in this account (see compact)
        self._largest = 0
        self._shapes = set()
        self._unpacked = False
        self._entry_counts: dict[str, int] = {}  # see _enter

    def outside_account(self) -> ForwardAccount:
        """The account that what the step's other modules save joins (:mod:`.outside`):
        the open one, or a new one at a marked step's start or after a backward. The
        summaries are brought up to date when next read (:meth:`_settle`)."""
        if self._fresh or self._account is None or self._unpacked:
            self._fresh = False
            self._open_account()
        self._outside_added = True
        assert self._account is not None
        return self._account

    def _settle(self) -> None:
        """Sum up the open account again after other modules added to it since a forward
        of the model ended (``stats()`` and the step's peak include them)."""
        if not self._outside_added or self._account is None:
            return
        self._outside_added = False
        self._last = self._account.summary()
        peak = self._step_peak
        if self._per_step and (peak is None or self._last["stored_bytes"] >= peak["stored_bytes"]):
            self._step_peak = self._last

    def _deactivate(self, failed: bool = False) -> None:
        """End a forward: hooks and mode off, its batches coded, its account summed up. A
        forward that raised (``failed``) adds nothing to the account: what it saved is freed
        with the exception, and a retry in the same step (a smaller batch after an
        out-of-memory error) was counted twice."""
        self._active = False
        for ctx in reversed(self._contexts):
            ctx.__exit__(None, None, None)
        self._contexts = []
        self._call = None
        assert self._account is not None
        try:
            self._batches.code()  # the forward's small tensors, coded together
            self._deferred.flush()  # every saved tensor is counted before the summary
        finally:  # (under memory pressure, coding a failed forward's batches may raise too)
            if failed:
                self._account.undo()
                self._step_peak = self._peak_before
        if failed:  # stats() stays the last forward that returned
            self.forwards_failed += 1
            return
        self._account.end()
        self._outside_added = False  # summed up here, other modules' saves included
        self._last = self._account.summary()
        peak = self._step_peak
        if self._per_step and (peak is None or self._last["stored_bytes"] >= peak["stored_bytes"]):
            self._step_peak = self._last

    def _refresh_parameters(self) -> None:
        # Parameters may have moved device since apply_s2a (Lightning moves the model after
        # setup), so their storages are collected per forward. Views of a parameter (W.t())
        # share its storage; that is how they are recognised. The module dicts are read
        # directly: named_parameters() builds every name, several times slower.
        storages, ids, weights = set(), set(), set()
        trained_storages, trained_numels = set(), set()
        numels = set(self.extra_weight_numels())
        for module in self._modules:
            for leaf, p in module._parameters.items():
                if p is None:
                    continue
                storage = p.untyped_storage().data_ptr()
                storages.add(storage)
                ids.add(id(p))
                numels.add(p.numel())
                if p.requires_grad and not is_bias(leaf):
                    weights.add(id(p))
                    trained_storages.add(storage)
                    trained_numels.add(p.numel())
            for b in module._buffers.values():
                if b is not None:
                    storages.add(b.untyped_storage().data_ptr())
        # Parameters from outside the model that its forward takes (frozen class embeddings
        # passed in, a teacher's weights): no activations either, kept as they are. (Fake
        # tensors noted while torch.compile traced the model have no storage.)
        for p in list(self._outside_ids.keys()):
            with contextlib.suppress(RuntimeError):
                storages.add(p.untyped_storage().data_ptr())
        self._param_storages, self._param_ids, self._weight_ids = storages, ids, weights
        self._weight_numels = numels
        self._trained_storages, self._trained_numels = trained_storages, trained_numels


# Modules whose forward hands its input back untouched when ``p == 0`` (timm builds its
# disabled dropouts this way) or always (``nn.Identity``). Exact classes: a subclass may do more.
_PASS_THROUGH_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def passes_through(module: nn.Module) -> bool:
    """Whether ``module`` returns its input and saves nothing in any forward, so that the
    engine's boundary hooks can stay off it: ``nn.Identity``, and a dropout of ``p == 0``
    (half of a timm ViT's modules are one or the other; each call cost two Python hooks for
    nothing). A dropout whose ``p`` is raised after ``apply_s2a`` still has its mask coded
    and counted, in the frame and part of the model's module (or ``forward_*`` method) that
    calls it; called on its own, outside any forward of the model, it is not seen."""
    kind = type(module)
    if kind is nn.Identity:
        return True
    return kind in _PASS_THROUGH_DROPOUTS and module.p == 0


def _running(entry: Any) -> bool:
    """True if frame ``entry`` is still executing, in any thread (a DataParallel replica's
    forward is no interrupted one), in one step: CPython refuses to clear an executing
    frame, and clearing a finished one only drops the locals it kept alive."""
    if entry is None:
        return False
    try:
        entry.clear()
    except RuntimeError:
        return True
    return False
