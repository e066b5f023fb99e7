"""Checks the Lightning layer makes before and while fitting: set-ups that would train,
restore or average something other than what the user asked for are errors that say why.

Each was a silent wrong result once (see docs/lightning.md): S2A applied twice, a checkpoint
restored under another model's config, a classifier left frozen inside the backbone. Other
callbacks that would undo S2A are checked in :mod:`.other_callbacks`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from ..api import S2AHandle
from ..config import FOUR_BIT_DTYPES, MODEL_FIELDS, S2AConfig, model_differences
from ..identity import check_prompt_size
from ..messages import some_names
from ..structure.surgery import STATE_DICT_MARKER
from .checkpoint import marked_prefixes

#: The S2ACallback the CLI built from its ``s2a`` section, per trainer.
SECTION_CALLBACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_single_s2a(trainer: pl.Trainer) -> None:
    """Two S2A appliers on one trainer (two callbacks, or callback and strategy) is an error,
    and so is the CLI's ``s2a`` section replaced by the module's own S2ACallback."""
    from .callback import S2ACallback

    owners = [c for c in trainer.callbacks if isinstance(c, S2ACallback)]
    section = SECTION_CALLBACKS.get(trainer)
    if section is not None and not any(c is section for c in owners):
        # Lightning put the one the module's configure_callbacks() returns in its place:
        # --s2a.bits 8 ran at the module's 2 bits, said only in an info line (2026-12-07)
        raise ValueError(
            "S2A is configured twice: the CLI's s2a section built an S2ACallback, and the "
            "module's configure_callbacks() returns one, which Lightning put in its place (the "
            "--s2a options would be ignored). Set --s2a.enabled false to run the module's, or "
            "take it out of configure_callbacks."
        )
    if len(owners) > 1:
        from .strategy import S2AStrategyMixin

        via_strategy = isinstance(trainer.strategy, S2AStrategyMixin)
        raise ValueError(
            "S2A is configured twice on this Trainer"
            + (" (strategy='s2a' and an S2ACallback)" if via_strategy else " (two S2ACallbacks)")
            + ": use either Trainer(strategy='s2a') or Trainer(callbacks=[S2ACallback()]), "
            "not both."
        )


def check_same_model(saved: Any, current: S2AConfig | None) -> None:
    """A checkpoint restored (resume, ``test``/``validate --ckpt_path``) under an S2A config
    that computes another function than the one it trained with is an error: its weights
    load (``side_merge``, ``bn_mode``, ``frozen_dtype`` change no shape) and would silently
    run another model."""
    if not isinstance(saved, dict) or current is None:
        return
    known = {f.name for f in dataclasses.fields(S2AConfig)}
    try:
        trained = S2AConfig.from_saved({k: v for k, v in saved.items() if k in known})
    except (TypeError, ValueError):
        # Written by another version, whole it does not validate: each model field it holds
        # is compared on its own (the whole check was skipped before 2026-12-06).
        trained = None
    if trained is not None:
        differ = model_differences(trained, current)
        values = {f: getattr(trained, f) for f in differ}
    else:
        values, unread = {}, []
        for name in (f for f in MODEL_FIELDS if f in saved):
            try:
                one = current.replace(**{name: saved[name]})
            except (TypeError, ValueError):
                unread.append(name)
                continue
            if model_differences(one, current):
                values[name] = getattr(one, name)
        differ = list(values)
        if unread:
            rank_zero_warn(
                f"the checkpoint's S2A config was written by another version: {unread} could "
                "not be read, so whether they match this run's is not checked."
            )
    if differ:
        fields = ", ".join(f"{f}={values[f]!r} (this run: {getattr(current, f)!r})" for f in differ)
        raise ValueError(
            f"the checkpoint was trained with S2A {fields}: restored under this run's config "
            "its weights would compute another model. Use the config it trained with (CLI: "
            f"--s2a.{differ[0]} ...), or start from its weights without --ckpt_path."
        )


def check_checkpoint(
    checkpoint: dict[str, Any], saved: Any, handle: S2AHandle | None, strict: bool = True
) -> None:
    """Before a checkpoint's weights load (resume, ``--ckpt_path``): ``saved``, the S2A state
    it holds, must describe the model this run computes (:func:`check_same_model`, and
    prompts sized for this input: ``identity.check_prompt_size``), and a
    checkpoint saved without S2A cannot fill the weights this run's S2A adds (unless the
    module loads non-strictly, ``strict_loading=False``: then it starts them fresh). Both
    would otherwise surface as PyTorch's missing/unexpected-keys error, or not at all."""
    current = handle.config if handle is not None else None
    check_same_model(saved.get("config") if isinstance(saved, dict) else None, current)
    if isinstance(saved, dict) and handle is not None:  # (the size: absent before 2026-12-07)
        sized = saved.get("input_size")
        check_prompt_size(
            handle.config.modules,
            sized,
            handle,
            "the checkpoint's",
            "Give the data the size it trained at (the data module's image size), or "
            f"S2AConfig(input_size={tuple(sized or ())}) (CLI: --s2a.input_size "
            f"[{','.join(str(v) for v in sized or ())}]).",
        )
    if (
        strict
        and not saved
        and not marked_prefixes(checkpoint)
        and handle is not None
        and handle.structure.adds_weights
    ):
        raise ValueError(
            "the checkpoint holds none of the weights this run's S2A config "
            f"(modules={list(handle.config.modules)}) adds: it was saved without them. Start "
            "from its weights without --ckpt_path (load them into the module before fit), or "
            "restore it under the config it was saved with."
        )


def check_plain_resume(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Resuming a fit (``ckpt_path``) from a checkpoint trained without S2A, by a run that
    applies S2A: where the checkpoint's optimizers held another number of parameters than
    train now, the run would go on training another set (a full fine-tune resumed under the
    CLI's default S2A trained 8,066 of 4.9M parameters, silently, with a stateless
    optimizer). The same set (a BitFit run of your own, compressed from now on) resumes.
    The parameters that trained are those with optimizer state (Adam's moments, momentum);
    for stateless optimizers, those the optimizers held."""
    states = [s for s in checkpoint.get("optimizer_states") or [] if isinstance(s, dict)]
    with_state = sum(len(s.get("state", {})) for s in states)
    held = sum(len(g.get("params", ())) for s in states for g in s.get("param_groups", ()))
    trained = with_state or held
    trainable = sum(1 for p in module.parameters() if p.requires_grad)
    if states and trained != trainable:
        raise ValueError(
            f"resuming from a checkpoint trained without S2A: {trained} parameters trained "
            f"in it, and with S2A {trainable} train now, so the run would go on training "
            "another set. Resume without S2A (--s2a.enabled false, or no S2ACallback), or "
            "fine-tune its weights with S2A from the start: load them into the module and "
            "fit without ckpt_path."
        )


def check_evaluation_alone(handle: S2AHandle) -> None:
    """``validate``/``test``/``predict`` of a module without S2A (no earlier fit, adapter or
    ``ckpt_path``): S2A is applied for that run only. A side network would be new and
    untrained, and its output would replace (or be added to) the head's: the metrics of a
    random network, a different one at each call (a reviewer's ViT-Ti: 6% of predictions
    agreeing with the module's own). An error. Weights held in 4 bits are said."""
    if "side" in handle.config.modules:
        how = "is added to" if handle.config.side_merge == "add" else "replaces"
        raise ValueError(
            "evaluating a module that has no S2A applied, under an S2A config with "
            f"modules=['side']: S2A would add a new, untrained side network whose output {how} "
            "the head's, and the metrics would be a random network's. Evaluate after fit "
            "(the same module), pass the fit's checkpoint (ckpt_path=...), or load_adapter "
            "first; to evaluate the module as it is, use a Trainer without S2A."
        )
    if handle.config.frozen_dtype in FOUR_BIT_DTYPES and handle.structure.cast_originals:
        rank_zero_warn(
            "evaluating a module that has no S2A applied, under an S2A config that holds the "
            f"frozen Linear and Conv weights in 4 bits (frozen_dtype="
            f"{handle.config.frozen_dtype!r}): it is evaluated with its weights quantized, "
            "not as it is. To evaluate it as it is, use a Trainer without S2ACallback (or "
            "with frozen_dtype=None)."
        )


def warn_plain_checkpoint_in_four_bits(handle: S2AHandle | None) -> None:
    """An evaluation (``validate``/``test``/``predict`` with ``ckpt_path``) of a checkpoint
    saved without S2A, by a run that holds frozen weights in 4 bits: the loaded weights are
    quantized, so the metrics are the 4-bit model's, not the checkpoint's as saved (a
    reviewer's val loss 2.0509 against 2.0365). Said, since that may be what is wanted."""
    if handle is None or handle.config.frozen_dtype not in FOUR_BIT_DTYPES:
        return
    if not handle.structure.cast_originals:
        return
    rank_zero_warn(
        "this checkpoint was saved without S2A, and this run's S2A config holds the frozen "
        f"Linear and Conv weights in 4 bits (frozen_dtype={handle.config.frozen_dtype!r}): "
        "it is evaluated with its weights quantized, not as it was saved. To evaluate it as "
        "saved, use a Trainer without S2ACallback (or with frozen_dtype=None)."
    )


def check_batch_norms_in_place(handle: S2AHandle) -> None:
    """The BatchNorms S2A holds must still be the model's when fitting starts.
    ``Trainer(sync_batchnorm=True)`` replaces them after S2A was applied (DDP's setup converts
    every BatchNorm to SyncBatchNorm): the new modules trained on batch statistics and
    updated the frozen running statistics (gradient cosine 0.5), and said nothing."""
    present = {id(m) for m in handle.model.modules()}
    replaced = [bn for bn in handle.structure.batch_norms if id(bn) not in present]
    if replaced:
        raise ValueError(
            f"S2A holds {len(handle.structure.batch_norms)} frozen BatchNorms of "
            f"{type(handle.model).__name__}, but {len(replaced)} were replaced after S2A was "
            "applied (Trainer(sync_batchnorm=True) converts them to SyncBatchNorm then); the "
            "new ones would train on batch statistics and change the frozen running "
            "statistics. Convert in your module instead (nn.SyncBatchNorm.convert_sync_batchnorm"
            " in __init__ or configure_model) and drop sync_batchnorm=True."
        )


def check_optimized(trainer: pl.Trainer, pl_module: nn.Module, handle: S2AHandle) -> None:
    """Every parameter S2A trains must be in an optimizer. An optimizer built from named
    submodules (``self.encoder.parameters()``, ``self.fc.parameters()``) misses what S2A
    adds outside them (a whole module's side network at its root) or freezes: the side
    stayed at its random init while ``s2a/trainable_params`` counted it, silently. Your own
    trainable parts outside the S2A'd module that no optimizer holds are said."""
    # configure_optimizers returning None gets Lightning's own stand-in (and its warning).
    optimizers = [o for o in trainer.optimizers if type(o).__name__ != "_MockOptimizer"]
    if not optimizers:
        return
    held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    ours = {id(p) for p in handle.model.parameters() if p.requires_grad}
    missing = [n for n, p in pl_module.named_parameters() if id(p) in ours and id(p) not in held]
    if missing:
        shown = some_names(missing, 4)
        raise ValueError(
            f"{len(missing)} parameters that S2A trains are in no optimizer ({shown}): they "
            "would stay as they are. Build the optimizer from the parameters that train, "
            "e.g. torch.optim.AdamW(p for p in self.parameters() if p.requires_grad), or add "
            "the modules S2A adds (s2a_side, s2a_prompt) to your parameter groups."
        )
    # Your own parts outside the S2A'd module (a head beside the encoder) that require grad
    # and no optimizer holds: s2a/trainable_params and adapters counted them as trained
    # (timm's create_optimizer_v2(self.encoder, layer_decay=...) left the head out, silently).
    inside = {id(p) for p in handle.model.parameters()}
    idle = [
        n
        for n, p in pl_module.named_parameters()
        if p.requires_grad and id(p) not in inside and id(p) not in held
    ]
    if idle:
        rank_zero_warn(
            f"{len(idle)} parameters of {type(pl_module).__name__} outside the S2A'd module "
            f"require grad but no optimizer holds them ({some_names(idle, 4)}): they stay at "
            "their initial values, while s2a/trainable_params and adapters count them as "
            "trained. Add them to an optimizer (your head's parameters), or freeze them."
        )


def warn_frozen_optimizers(trainer: pl.Trainer, pl_module: nn.Module, handle: S2AHandle) -> None:
    """With S2A on the whole LightningModule and several optimizers, one that trains no weight
    while S2A froze weights of the modules it serves most likely serves another model: a
    GAN's generator lost its weights' training, and only the trainable count said so. The
    optimizer may list those weights or only what still trains (``requires_grad`` filter)."""
    optimizers = [o for o in trainer.optimizers if type(o).__name__ != "_MockOptimizer"]
    if handle.model is not pl_module or len(optimizers) < 2:
        return
    current = dict(pl_module.named_parameters())
    names = {id(p): n for n, p in current.items()}
    lists = [
        [names[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in names]
        for opt in optimizers
    ]
    for index, listed in enumerate(lists):
        elsewhere = {n for i, other in enumerate(lists) if i != index for n in other}
        if any(current[n].requires_grad and current[n].dim() > 1 for n in listed):
            continue  # it trains weights (a head): S2A's own part
        owners = {n.rpartition(".")[0] for n in listed}
        frozen = [  # trainable as built, frozen (or held in 4 bits) now
            n
            for n, was in handle.structure.flags.items()
            if was
            and n.rpartition(".")[0] in owners
            and n not in elsewhere  # another optimizer's (decay / no-decay groups)
            # matrices and kernels (or held in 4 bits, no parameter now): not norms or biases
            and (n not in current or (current[n].dim() > 1 and not current[n].requires_grad))
        ]
        if frozen:
            rank_zero_warn(
                f"optimizer {index} trains no weight: S2A was applied to the whole "
                f"{type(pl_module).__name__} (no backbone attribute) and froze the "
                f"{len(frozen)} weights of the modules it serves ({', '.join(frozen[:3])}, ...); "
                "only their biases train. If they belong to a model S2A should leave alone (a "
                "GAN's generator), name the backbone: S2ACallback(backbone='...')."
            )


def copied_back_error(
    trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, keys: set[str]
) -> RuntimeError | None:
    """The error for a fit whose workers are copies of the caller's model (``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``) where S2A added weights to ``target`` (state-dict keys
    beyond ``keys``, those it had before): Lightning copies back into the caller's model,
    without error, only the weights it already has. None where nothing is lost."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    launcher = trainer.strategy.launcher
    added = sorted(k for k in set(target.state_dict()) - keys if STATE_DICT_MARKER not in k)
    if not isinstance(launcher, _MultiProcessingLauncher) or not added:
        return None
    from .strategy import S2AStrategyMixin

    name = next((f"model.{n}" for n, m in pl_module.named_modules() if m is target), "model")
    name = "model" if name == "model." else name
    start = launcher._start_method
    ours = isinstance(trainer.strategy, S2AStrategyMixin)
    ddp = "S2ADDPStrategy(config) without start_method" if ours else "strategy='ddp'"
    fork = "S2ADDPStrategy(config, start_method='fork')" if ours else "strategy='ddp_notebook'"
    before = f"S2A applied before fit, lightning_s2a.apply_s2a({name}, <the same config>)"
    if is_overridden("configure_model", pl_module) or is_overridden("setup", pl_module):
        other = ""  # the target may not exist before fit: nothing to apply S2A to there
    elif start == "spawn":
        other = f"; in a notebook, {fork} with {before}, which the forked workers take up"
    else:
        other = f"; or {before}, which the forked workers take up"
    return RuntimeError(
        f"S2A adds weights to {name} ({added[0]!r}, ...), and this strategy's workers "
        f"(started by {start!r}) train copies of the model: Lightning loads their result "
        "back into your model only where it already has the weight, so after fit it would "
        f"silently lack what S2A trained. Use {ddp} (this process trains as rank 0){other}."
    )
