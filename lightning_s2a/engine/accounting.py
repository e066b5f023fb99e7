"""Exact byte accounting of saved activations: what was kept against what would have been.

``raw`` counts the bytes an uncompressed run keeps for backward. A tensor that two operators
save is one allocation there, so a saved view is counted once while its storage is alive
(checked with a storage weak reference, never by address alone: freed memory is reused).
``stored`` counts what the compressed run actually keeps.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a saved tensor holds: its elements, capped by its storage (broadcast views)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def view_key(t: torch.Tensor) -> tuple:
    """Identity of a saved view's data: storage address, geometry, dtype and version."""
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
        t._version,
    )


@dataclass
class KindBytes:
    """Raw and stored bytes, and the number of saved tensors, for one operator kind."""

    raw_bytes: int = 0
    stored_bytes: int = 0
    tensors: int = 0


@dataclass
class ForwardAccount:
    """Running totals for one forward pass, per operator kind."""

    by_kind: dict[str, KindBytes] = field(default_factory=lambda: defaultdict(KindBytes))
    _seen_raw: dict[tuple, StorageWeakRef] = field(default_factory=dict)
    _seen_kept: dict[tuple, StorageWeakRef] = field(default_factory=dict)

    @staticmethod
    def _first_sighting(seen: dict[tuple, StorageWeakRef], t: torch.Tensor) -> bool:
        key = view_key(t)
        ref = seen.get(key)
        if ref is not None and not ref.expired():
            return False
        seen[key] = StorageWeakRef(t.untyped_storage())
        return True

    def add(self, kind: str, t: torch.Tensor, stored: int | None) -> None:
        """Record a saved tensor; ``stored`` is its packed size, or None if kept as it is."""
        entry = self.by_kind[kind]
        entry.tensors += 1
        nbytes = tensor_bytes(t)
        if self._first_sighting(self._seen_raw, t):
            entry.raw_bytes += nbytes
        if stored is not None:
            entry.stored_bytes += stored
        elif self._first_sighting(self._seen_kept, t):
            entry.stored_bytes += nbytes

    def summary(self) -> dict:
        """Totals as a plain dict: ``raw_bytes``, ``stored_bytes``, ``ratio``, ``by_kind``."""
        raw = sum(k.raw_bytes for k in self.by_kind.values())
        stored = sum(k.stored_bytes for k in self.by_kind.values())
        return {
            "raw_bytes": raw,
            "stored_bytes": stored,
            "ratio": stored / raw if raw else 1.0,
            "by_kind": {
                kind: {
                    "raw_bytes": k.raw_bytes,
                    "stored_bytes": k.stored_bytes,
                    "tensors": k.tensors,
                }
                for kind, k in sorted(self.by_kind.items())
            },
        }
