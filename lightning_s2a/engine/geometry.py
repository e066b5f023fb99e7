"""How a saved tensor is rebuilt on unpack: its shape, strides (dense permuted layouts such as
channels-last come back in the same layout) and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """Shape, strides and dtype of the saved tensor, so unpack can rebuild it faithfully."""

    shape: torch.Size
    stride: tuple[int, ...] | None  # None: rebuild contiguous
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(t: torch.Tensor) -> Geometry:
        """Record ``t``'s geometry; strides are kept for dense permuted layouts (channels-last)."""
        stride = None if t.is_contiguous() or not _dense_permutation(t) else tuple(t.stride())
        return Geometry(t.shape, stride, t.dtype, t.device)

    def restore(self, flat: torch.Tensor) -> torch.Tensor:
        """Reshape a flat tensor (logical order) back to the recorded shape and strides."""
        out = flat.to(self.dtype).view(self.shape)
        if self.stride is None:
            return out
        return torch.empty_strided(
            self.shape, self.stride, dtype=self.dtype, device=self.device
        ).copy_(out)


def _dense_permutation(t: torch.Tensor) -> bool:
    """True if ``t`` covers its memory exactly once in some dimension order (e.g. channels-last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True
