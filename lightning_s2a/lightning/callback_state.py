"""What ``S2ACallback`` saves in and reads from Lightning checkpoints: its state (the S2A
config, the S2A'd attribute, the engine's codebooks), the checks before a checkpoint's weights
load, and the mark that tells this run's own checkpoints from another's. A mixin, in a file
of its own so the callback's file stays about the run's hooks."""

from __future__ import annotations

import dataclasses
from typing import Any

from .checkpoint import WEIGHTS_ONLY_KEY, load_other_engines, marked_prefixes, other_handles
from .checks import (
    check_checkpoint,
    check_plain_resume,
    check_same_model,
    warn_plain_checkpoint_in_four_bits,
)

#: Checkpoint entry naming the run that saved it (see ``CheckpointState._saving``).
RUN_KEY = "lightning_s2a_run"


class CheckpointState:
    """The checkpoint half of :class:`~lightning_s2a.lightning.callback.S2ACallback` (it
    reads the callback's ``handle``, ``_module``, ``_stage``, ``_run`` and sets
    ``_restored_s2a`` and ``_pending_state``)."""

    handle: Any
    _module: Any
    _stage: str
    _run: str
    _restored_s2a: bool
    _pending_state: dict[str, Any] | None
    _pending_others: dict[str, Any] | None
    state_key: str

    def state_dict(self) -> dict[str, Any]:
        # The config and the S2A'd attribute let load_from_checkpoint rebuild the modules.
        record = self._record()
        if record:
            record["engine"] = self.handle.engine.state_dict()
            # Other S2A'd modules (apply_s2a in the module's __init__): their codebooks and
            # widths too, or a resumed run coded them afresh (a reviewer's dual encoder).
            others = other_handles(self._module, self.handle)
            if others:
                record["other_engines"] = {p: h.engine.state_dict() for p, h in others}
        return record

    def _restoring(self, checkpoint: dict[str, Any]) -> None:
        """Before a checkpoint's weights load into the module: check them against this run's
        config, and note whether they are an S2A model's (an evaluation keeps that one)."""
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        saved = saved or checkpoint.get(WEIGHTS_ONLY_KEY)
        strict = bool(getattr(self._module, "strict_loading", True))
        check_checkpoint(checkpoint, saved, self.handle, strict)
        self._check_same_target(saved)
        plain = not saved and not marked_prefixes(checkpoint)
        if plain and self._stage != "fit":
            warn_plain_checkpoint_in_four_bits(self.handle)
        elif plain and self.handle is not None and self._module is not None:
            check_plain_resume(checkpoint, self._module)
        # A checkpoint this run saved itself (BatchSizeFinder's, lr_find's temporary file)
        # brings nothing from outside: only another's S2A model is kept after an evaluation.
        if checkpoint.get(RUN_KEY) != self._run:
            self._restored_s2a = bool(saved or marked_prefixes(checkpoint))

    def _check_same_target(self, saved: Any) -> None:
        """The checkpoint's S2A must sit on the same part of the module as this run's: with
        another ``backbone`` (the whole module instead of ``encoder``) the same weights load,
        and another set of parameters trains on, silently (a user layer between backbone
        and head went frozen)."""
        trained = saved.get("target") if isinstance(saved, dict) else None
        now = self._record().get("target")
        if trained is None or now is None or trained == now:
            return

        def where(name: str) -> str:
            return f"'{name}'" if name else "the whole module"

        raise ValueError(
            f"the checkpoint trained S2A applied to {where(trained)} of "
            f"{type(self._module).__name__}; this run applies it to {where(now)}, so another "
            "set of parameters would train on from its weights. Resume with the backbone it "
            f"trained with (S2ACallback(backbone={trained or None!r}), CLI: --s2a.backbone "
            f"{trained or 'null'}), or start from its weights without --ckpt_path."
        )

    def _record(self) -> dict[str, Any]:
        """The S2A config and the S2A'd attribute, or {} before S2A is applied."""
        if self.handle is None or self._module is None:
            return {}
        target = next(n for n, m in self._module.named_modules() if m is self.handle.model)
        return {
            "config": dataclasses.asdict(self.handle.config),
            "target": target,
            # the size prompts were sized for (the data module's, the model's default)
            "input_size": list(self.handle.structure.input_size),
        }

    def _saving(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as this run's. A weights-only one holds no callback state: the
        record goes at its top level, so ``lightning_s2a.load_from_checkpoint`` can rebuild
        the modules."""
        checkpoint[RUN_KEY] = self._run
        record = self._record()
        if "callbacks" not in checkpoint and record:
            checkpoint[WEIGHTS_ONLY_KEY] = record

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "engine" not in state_dict:
            return
        if state_dict.get("other_engines"):
            if self._module is not None:
                load_other_engines(self._module, self.handle, state_dict["other_engines"])
            else:  # restored before setup found the module: loaded with the engine's state
                self._pending_others = state_dict["other_engines"]
        check_same_model(state_dict.get("config"), self.handle.config if self.handle else None)
        if self.handle is None:
            self._pending_state = state_dict["engine"]
        else:
            self.handle.engine.load_state_dict(state_dict["engine"])
