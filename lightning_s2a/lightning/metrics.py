"""Per-epoch S2A metrics: saved-activation bytes, compression, peak memory, trainables."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch

MB = 2**20


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak * 1024 / MB  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (a per-epoch peak needs this at epoch start). CPU peaks can't reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class EpochMeter:
    """Mean saved-activation bytes per training step over one epoch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.measured = 0  # steps whose bytes were read
        self.steps = 0  # those that saved something
        self.raw = 0
        self.stored = 0

    def update(self, stats: dict) -> None:
        self.measured += 1
        if stats["raw_bytes"]:
            self.steps += 1
            self.raw += stats["raw_bytes"]
            self.stored += stats["stored_bytes"]

    def sum_over_ranks(
        self, reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device
    ) -> None:
        """Sum the epoch's counts over the processes (``reduce``: the strategy's sum), so each
        rank logs the bytes of every rank's steps: averaged per rank, one rank that measured
        no step (NaN) turned the logged epoch NaN, and compression was a mean of ratios."""
        counts = [self.measured, self.steps, self.raw, self.stored]
        summed = reduce(torch.tensor(counts, dtype=torch.int64, device=device)).tolist()
        self.measured, self.steps, self.raw, self.stored = (int(v) for v in summed)

    def metrics(
        self,
        device: torch.device,
        trainable: tuple[int, float],
        weights: tuple[int, int] = (0, 0),
    ) -> dict[str, float]:
        """The ``s2a/*`` metrics logged at the end of each training epoch; ``weights`` is
        ``S2AHandle.weight_bytes()`` (held, as built)."""
        if self.measured:
            steps = max(self.steps, 1)
            raw, stored = self.raw / steps / MB, self.stored / steps / MB
            compression = raw / stored if stored else 1.0
        else:  # no step was measured (S2A stayed out of every forward): not zero bytes
            raw = stored = compression = float("nan")
        return {
            "s2a/activation_raw_mb": raw,
            "s2a/activation_stored_mb": stored,
            "s2a/compression": compression,
            "s2a/peak_memory_mb": peak_memory_mb(device),
            "s2a/trainable_params": float(trainable[0]),
            "s2a/trainable_pct": 100.0 * trainable[1],
            "s2a/weights_mb": weights[0] / MB,
            "s2a/weights_built_mb": weights[1] / MB,
        }
