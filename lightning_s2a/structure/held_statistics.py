"""Frozen BatchNorms held in eval mode (``bn_mode="eval"``): the pre-hooks that keep them
there, and the copy of their running statistics that lets a re-estimation pass which fails on
a held one put back what it reset. Hook objects, not closures, for the reason
:mod:`.model_hooks` gives: a deep copy of the model gets hooks of its own.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

_HELD_MODE = "_s2a_mode_before_hold"


def is_held(bn: nn.Module) -> bool:
    """True while a BatchNorm that S2A holds in eval mode is frozen: its scale trains in no
    way (a BatchNorm whose weight trains, unfrozen after S2A, keeps its own mode)."""
    weight = getattr(bn, "weight", None)
    return not (isinstance(weight, torch.Tensor) and weight.requires_grad)


class HeldStatistics:
    """Pre-hooks of the frozen BatchNorms S2A holds in eval mode (``bn_mode="eval"``).

    Each BatchNorm keeps a copy of its running statistics as last seen held (small: two
    vectors per layer), so a re-estimation pass that fails on a held one can put back what
    it reset in all of them (:meth:`hold`).
    """

    def __init__(self, model: nn.Module, batch_norms: list[nn.Module]) -> None:
        self.batch_norms = batch_norms
        self.root: weakref.ref | None = weakref.ref(model)
        for bn in batch_norms:
            _save_statistics(bn)

    def __deepcopy__(self, memo: dict) -> HeldStatistics:
        """A copy of the model holds its own BatchNorms; a copy of a part of it (reached
        through one BatchNorm's hook) none: it would copy every held BatchNorm of the model."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        root = self.root() if self.root is not None else None
        if root is not None and id(root) in memo:
            clone.batch_norms = copy.deepcopy(self.batch_norms, memo)
            clone.root = weakref.ref(memo[id(root)])
        else:
            clone.batch_norms, clone.root = [], None
        return clone

    def __getstate__(self) -> dict[str, Any]:
        return {"batch_norms": self.batch_norms, "root": None}  # no weak reference pickles

    def hold(self, module: nn.Module, args: Any) -> None:
        """Eval mode for this call only.

        Decided per call: a BatchNorm whose weight was unfrozen since (``BackboneFinetuning``,
        a second, fully fine-tuned phase) trains as PyTorch would. A re-estimation of its
        statistics (``momentum=None`` after a reset, as ``StochasticWeightAveraging`` and
        ``torch.optim.swa_utils.update_bn`` run it) is an error: held, the statistics would
        stay reset. Before raising, the statistics the pass reset are put back in every held
        BatchNorm, with their momentum (the error left them reset: a notebook that went on
        after it evaluated with mean 0, variance 1). Statistics that were fresh (mean 0,
        variance 1) when last seen and only reset since lose nothing, and one built with
        ``momentum=None`` whose fresh statistics are untouched trains without the error.
        """
        # Each call, because Lightning and users call model.train() at will. The mode is kept
        # on the module itself, so a deep copy of the model (EMA) holds its own.
        if not is_held(module):
            return
        mean = module.running_mean
        saved: _Saved | None = module.__dict__.get(_SAVED)
        if module.training and module.momentum is None and reset_statistics(module):
            untouched = saved is not None and saved.holds(mean) and mean._version == saved.version
            lossless = saved is not None and saved.fresh() and saved.only_reset(mean)
            if not (untouched or lossless):
                kept = self._put_back()
                raise RuntimeError(
                    "a statistics re-estimation pass (momentum=None, statistics reset: "
                    "StochasticWeightAveraging or torch.optim.swa_utils.update_bn) reached a "
                    f"frozen {type(module).__name__} that S2A holds in eval mode "
                    "(bn_mode='eval'): its running statistics were reset and would not be "
                    "re-estimated. "
                    + (
                        f"The statistics of the {kept} held BatchNorms were put back. "
                        if kept == len(self.batch_norms)
                        else f"The statistics of {kept} of the {len(self.batch_norms)} held "
                        "BatchNorms were put back; the others changed since S2A last saw "
                        "them (a load) and stay reset: load them again. "
                    )
                    + "Leave the re-estimation out (the backbone trained with its frozen "
                    "statistics), or train with S2AConfig(bn_mode='train')."
                )
        if isinstance(mean, torch.Tensor) and (
            saved is None or not saved.holds(mean) or saved.version != mean._version
        ):
            _save_statistics(module)  # loaded, moved or trained while unfrozen since
        module.__dict__[_HELD_MODE] = module.training
        module.training = False

    def _put_back(self) -> int:
        """Put back the statistics a reset took from each held BatchNorm, where the reset is
        the only change since they were saved; the number put back."""
        kept = 0
        for bn in self.batch_norms:
            saved: _Saved | None = bn.__dict__.get(_SAVED)
            mean = bn.running_mean
            if saved is None or not isinstance(mean, torch.Tensor) or not is_held(bn):
                continue
            if not reset_statistics(bn):
                kept += 1  # not reset (a pass over part of the model)
            elif saved.only_reset(mean):
                with torch.no_grad():
                    mean.copy_(saved.mean)
                    bn.running_var.copy_(saved.var)
                    if saved.count is not None and bn.num_batches_tracked is not None:
                        bn.num_batches_tracked.copy_(saved.count)
                bn.momentum = saved.momentum
                _save_statistics(bn)
                kept += 1
        return kept


_SAVED = "_s2a_statistics_held"


class _Saved:
    """A BatchNorm's running statistics and momentum as last seen held, with the statistics
    tensor (weakly: a move or conversion makes a new one) and its version then."""

    __slots__ = ("count", "mean", "momentum", "ref", "var", "version")

    def __init__(self, bn: nn.Module, momentum: float | None) -> None:
        mean, count = bn.running_mean, getattr(bn, "num_batches_tracked", None)
        self.ref: weakref.ref | None = weakref.ref(mean)
        self.version, self.mean, self.var = mean._version, mean.clone(), bn.running_var.clone()
        self.count = count.clone() if isinstance(count, torch.Tensor) else None
        self.momentum = momentum

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles hold no weak reference
        return {k: getattr(self, k) for k in self.__slots__ if k != "ref"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.ref = None
        for k, v in state.items():
            setattr(self, k, v)

    def holds(self, mean: torch.Tensor) -> bool:
        """True if ``mean`` is the tensor these statistics were read from."""
        return self.ref is not None and self.ref() is mean

    def only_reset(self, mean: torch.Tensor) -> bool:
        """True if a reset is the only change since: one version on the same tensor, or the
        first change of a tensor made since (``.double()``, ``.cuda()``: moves keep values)."""
        return mean._version == (self.version + 1 if self.holds(mean) else 1)

    def fresh(self) -> bool:
        """True if the statistics were fresh (mean 0, variance 1) when saved."""
        return reset_values(self.mean, self.var)


def _save_statistics(bn: nn.Module) -> None:
    """Keep a copy of ``bn``'s running statistics and momentum (see :class:`_Saved`)."""
    if not isinstance(bn.running_mean, torch.Tensor):
        return
    previous: _Saved | None = bn.__dict__.get(_SAVED)
    momentum = bn.momentum if bn.momentum is not None else getattr(previous, "momentum", None)
    bn.__dict__[_SAVED] = _Saved(bn, momentum)


def forget_statistics(bn: nn.Module) -> None:
    """Drop the copy :class:`HeldStatistics` kept on ``bn`` (S2A taken off)."""
    bn.__dict__.pop(_SAVED, None)


def reset_statistics(bn: nn.Module) -> bool:
    """True if ``bn``'s running statistics are the freshly reset ones (mean 0, variance 1)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        return False
    return reset_values(mean, var)


def reset_values(mean: torch.Tensor, var: torch.Tensor) -> bool:
    """True for the statistics a reset leaves: mean 0, variance 1."""
    return not bool(mean.any()) and bool(var.eq(1).all())


def release_eval(module: nn.Module, args: Any, output: Any) -> None:
    """Always-called forward hook of the same BatchNorm: its own mode back."""
    module.training = module.__dict__.pop(_HELD_MODE, module.training)
