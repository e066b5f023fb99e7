"""Lightning callbacks that would undo S2A, or that must run after it: checked before
fitting, each an error (or a warning) that says why and what to do.

A finetuning callback freezes and unfreezes on its own schedule; weight averaging copies the
model in its setup (before S2A changed it, if listed first), rounds 4-bit codes and 16-bit
frozen weights off when it averages them, and SWA resets the BatchNorms S2A holds in eval
mode. Each was a silent wrong result once (see docs/lightning.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..api import S2AHandle
from ..config import FOUR_BIT_DTYPES

if TYPE_CHECKING:
    from .callback import S2ACallback


def check_no_finetuning(trainer: pl.Trainer) -> None:
    """A ``BaseFinetuning`` callback (``BackboneFinetuning``) freezes the backbone, biases S2A
    trains included, until an epoch of its own, then unfreezes all of it: refused up front."""
    from lightning.pytorch.callbacks import BaseFinetuning

    finetuning = [c for c in trainer.callbacks if isinstance(c, BaseFinetuning)]
    if finetuning:
        raise ValueError(
            f"{type(finetuning[0]).__name__} freezes and unfreezes the backbone on its own "
            "schedule, but S2A decides what trains in it (the parameters S2A trains would be "
            "frozen until it unfreezes everything, which then trains in full). Use one of the "
            "two: leave the finetuning callback out, or S2A out."
        )


def copies_model_in_setup(callback: Any) -> bool:
    """True for Lightning's callbacks that deep-copy the model in their ``setup`` to average
    it: weight averaging (``EMAWeightAveraging``) and ``StochasticWeightAveraging``."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging

    return isinstance(callback, (WeightAveraging, StochasticWeightAveraging))


def check_averaging_after(trainer: pl.Trainer, callback: S2ACallback) -> None:
    """A weight-averaging callback (``EMAWeightAveraging``, ``StochasticWeightAveraging``)
    copies the model in its setup: run before S2A's, its copy lacks the prompt, side and bias
    parameters S2A adds (and has the weights 4-bit holding takes out), and its first update
    fails on mismatched tensors (SWA's after a whole epoch). Said here, with the order that
    works. Averaging buffers would round off 4-bit weights' codes (a reviewer's EMA at decay
    0.9 changed 27% of their bytes, silently)."""
    from lightning.pytorch.callbacks import WeightAveraging

    handle = callback.handle
    assert handle is not None
    warn_averaged_half_weights(trainer, handle)
    if not callback.applied_here:
        return  # S2A applied before fit: any copy made in setup has it
    if not (
        handle.structure.adds_weights
        or handle.config.frozen_dtype in FOUR_BIT_DTYPES  # weights taken out of parameters
    ):
        return  # the copy has every tensor the model has
    ours = trainer.callbacks.index(callback)
    before = [c for c in trainer.callbacks[:ours] if copies_model_in_setup(c)]
    if before:
        raise ValueError(
            f"{type(before[0]).__name__} is listed before S2ACallback, so it copied the model "
            "before S2A changed its parameters (prompt/side modules, added biases, 4-bit "
            "weights), and cannot average them. List "
            f"S2ACallback first: Trainer(callbacks=[S2ACallback(...), {type(before[0]).__name__}"
            "(...)])."
        )
    buffers = [
        c
        for c in trainer.callbacks
        if isinstance(c, WeightAveraging) and getattr(c, "_use_buffers", False)
    ]
    four_bit = handle.config.frozen_dtype in FOUR_BIT_DTYPES and handle.structure.cast_originals
    if buffers and four_bit:
        name = type(buffers[0]).__name__
        raise ValueError(
            f"{name} averages the model's buffers (use_buffers=True, its default), and the "
            f"frozen weights S2A holds in 4 bits (frozen_dtype={handle.config.frozen_dtype!r}) "
            "are buffers of integer codes and scales: averaged, they are rounded off, and "
            "validation and the model after fit run another backbone. Pass "
            f"{name}(use_buffers=False) (buffers are then copied, not averaged), or train with "
            "frozen_dtype=None."
        )


def warn_averaged_half_weights(trainer: pl.Trainer, handle: S2AHandle) -> None:
    """A weight-averaging callback averages every parameter, the frozen ones too: held in 16
    bits (``frozen_dtype="bfloat16"``), their average of a constant is computed in 16 bits and
    drifts by rounding steps, and after fit S2A keeps a frozen weight that moved as trained (a
    reviewer's ViT-Ti at decay 0.9: 99.7% of frozen elements changed, the fp32 originals lost,
    silently). Said at fit start, with the fix."""
    from lightning.pytorch.callbacks import WeightAveraging

    dtype = handle.config.frozen_dtype
    if dtype in (None, *FOUR_BIT_DTYPES) or not handle.structure.cast_originals:
        return
    averaging = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
    if averaging:
        name = type(averaging[0]).__name__
        rank_zero_warn(
            f"{name} averages every parameter, the frozen backbone weights S2A holds in "
            f"{dtype} (frozen_dtype={dtype!r}) too, and computes their average in {dtype}: "
            "they drift from the pretrained weights by rounding steps (most at a low decay), "
            "validation runs on the drifted backbone, and after fit the drifted weights are "
            "kept, not the exact originals. Use frozen_dtype=None to keep the backbone exact "
            "under weight averaging."
        )


def check_no_swa(trainer: pl.Trainer, handle: S2AHandle) -> None:
    """``StochasticWeightAveraging`` resets every BatchNorm's statistics after its last epoch
    and re-estimates them: frozen ones held in eval mode would stay reset. Said before fitting
    instead of found after it."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    if not any(isinstance(c, StochasticWeightAveraging) for c in trainer.callbacks):
        return
    # update_bn resets BatchNorms only (held instance norms keep theirs)
    held = [m for m in handle.held_batch_norms() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if held:
        raise ValueError(
            f"StochasticWeightAveraging resets the running statistics of every BatchNorm after "
            f"training and re-estimates them, but S2A holds the frozen backbone's {len(held)} "
            "BatchNorms in eval mode (bn_mode='eval'), so theirs would stay reset. Leave SWA "
            "out, or train with S2AConfig(bn_mode='train') (batch statistics, re-estimated)."
        )
