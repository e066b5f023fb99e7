"""What an engine keeps across a checkpoint: the forward counter, calibration's result and
the fitted derivative codebooks with their samples, so a resumed run quantizes as the
uninterrupted one would (a mixin of :class:`.hooks.SavedTensorEngine`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .codebook import Codebook


class StateMixin:
    """``state_dict`` / ``load_state_dict`` of the engine."""

    def state_dict(self) -> dict[str, Any]:
        """Forward counter and fitted codebooks, so a resumed run quantizes like the original:
        with each codebook's samples (a refit for drift fits on half of them) and the drift
        answers a device has not yet been asked for (read at the site's next call)."""
        return {
            "step": self.step,
            "module_bits": dict(self.module_bits),
            "calibrated": self.calibrated,
            "calibrated_for": self.calibrated_for,
            "calibrated_shapes": [list(m) for m in self.calibrated_shapes],
            "calibrated_batch": self.calibrated_batch,
            "calibrated_small": self.calibrated_small,
            "calibration": dict(self.calibration),
            "codebooks": [
                {
                    "site": list(site),
                    "boundaries": cb.boundaries,
                    "points": cb.points,
                    "values": cb.values,
                    "bits": cb.bits,
                    "fitted_at": cb.fitted_at,
                    "first_fit": cb.first_fit,
                    "range": [cb.lo, cb.hi],
                    "sample": _stored_sample(cb.sample),
                }
                for site, cb in self.codebooks.items()
            ],
            "drift_pending": [list(site) for site in self._drifted_sites()],
        }

    def _drifted_sites(self) -> list[tuple]:
        """The sites whose open drift answer (see ``PackingMixin._drift_answer``) says their
        last tensor drifted: read now, waiting for the device where it must."""
        sites = []
        for site, (host, event) in self._drift_checks.items():
            if event is not None:
                event.synchronize()
            if bool(host):
                sites.append(site)
        return sites

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.step = int(state["step"])
        self.module_bits = {str(k): int(v) for k, v in state.get("module_bits", {}).items()}
        self.calibrated = bool(state.get("calibrated", False))
        self.calibrated_for = state.get("calibrated_for")
        self.calibrated_shapes = tuple(tuple(m) for m in state.get("calibrated_shapes", ()))
        self.calibrated_batch = int(state.get("calibrated_batch", 0))
        self.calibrated_small = float(state.get("calibrated_small", 0.0))
        if self.calibrated_for not in (None, self.calibration_key()):
            # Measured under other codes (a resumed run at other bits): to be measured again
            # where the config calibrates; its widths stay until then, and are said.
            self.calibrated = False
            if self.module_bits and not self.config.calibrate:
                warnings.warn(
                    f"the checkpoint loaded holds {len(self.module_bits)} modules that "
                    "calibration widened under other code settings "
                    f"({_changed(self.calibrated_for, self.calibration_key())}); they stay "
                    "wide, with calibrate=False nothing measures them again. Set "
                    "calibrate=True to measure under these settings.",
                    stacklevel=2,
                )
        self.calibration = {str(k): float(v) for k, v in state.get("calibration", {}).items()}
        self.codebooks = {
            tuple(c["site"]): Codebook(
                boundaries=c["boundaries"],
                points=c["points"],
                values=c["values"],
                bits=int(c["bits"]),
                fitted_at=int(c["fitted_at"]),
                # Saved before 2026-12-06 (no first fit): the refresh interval at once.
                first_fit=int(c.get("first_fit", int(c["fitted_at"]) - (1 << 30))),
                # Saved before 2026-12-07 (no range): never found drifted, as then (nor
                # inward: packing checks that only for a finite range).
                lo=float(c.get("range", (-math.inf, math.inf))[0]),
                hi=float(c.get("range", (-math.inf, math.inf))[1]),
                # Saved before 2026-12-07 (no samples): a drift refit fits on new ones only.
                sample=None if c.get("sample") is None else c["sample"].to("cpu", torch.float64),
            )
            for c in state["codebooks"]
        }
        self._device_codebooks.clear()
        self._drift_checks = {tuple(s): (True, None) for s in state.get("drift_pending", [])}


def _stored_sample(sample: torch.Tensor | None) -> torch.Tensor | None:
    """A codebook's samples as saved: float32 where that holds them exactly (drawn from
    float32 or narrower activations: half the bytes), float64 otherwise."""
    if sample is None:
        return None
    narrow = sample.float()
    return narrow if torch.equal(narrow.double(), sample) else sample.clone()


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``field: old -> new`` for the calibration settings that differ."""
    return ", ".join(
        f"{'calibrate_tol' if k == 'tol' else k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in new
        if old.get(k) != new.get(k)
    )
