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


@dataclass(frozen=True)
class Rows:
    """A norm's rows, each coded on its own: ``count`` rows of ``length`` values, each padded
    with its last value to whole groups of ``group``, so that no min-max group mixes two rows
    (a norm's backward scales each row's error by that row's inverse std).

    Rows are dimension 1 across the rest (BatchNorm's channels, ``channels=True``) or
    ``length`` consecutive values in logical order (a layer, group or instance norm's rows
    whose length is no multiple of the group: 196 tokens, 14 x 14 planes).
    """

    count: int
    length: int
    padded: int
    group: int
    channels: bool

    @staticmethod
    def of_channels(t: torch.Tensor, group: int) -> Rows:
        """BatchNorm's rows: channel ``c``'s values over the batch and positions."""
        return Rows._make(t.shape[1], t.numel() // t.shape[1], group, True)

    @staticmethod
    def of_length(t: torch.Tensor, length: int, group: int) -> Rows:
        """Rows of ``length`` consecutive values (``t.numel()`` a multiple of it)."""
        return Rows._make(t.numel() // length, length, group, False)

    @staticmethod
    def _make(count: int, length: int, group: int, channels: bool) -> Rows:
        # A row shorter than a group gets the next power of two (at least 8) as its group.
        if length < group:
            group = max(8, 1 << (length - 1).bit_length())
        return Rows(count, length, -(-length // group) * group, group, channels)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as contiguous padded rows."""
        t = t.detach()
        rows = (t.movedim(1, 0) if self.channels else t).reshape(self.count, self.length)
        if self.padded > self.length:
            rows = torch.cat([rows, rows[:, -1:].expand(-1, self.padded - self.length)], 1)
        return rows.contiguous()

    def scatter(self, flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`gather`: the flat values in ``shape``'s logical order."""
        rows = flat.view(self.count, self.padded)[:, : self.length]
        if not self.channels:
            return rows.reshape(-1)
        return rows.reshape(shape[1], shape[0], *shape[2:]).movedim(0, 1).reshape(-1)
