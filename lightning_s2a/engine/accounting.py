"""Exact byte accounting of saved activations: what was kept against what would have been.

``raw`` counts the bytes an uncompressed run keeps for backward. A tensor that two operators
save is one allocation there, so a saved view is counted once while its storage is alive
(checked with a storage weak reference, never by address alone: freed memory is reused), and
views of one storage in other shapes (Swin's attention saved 4-D by softmax and 3-D by the
next matmul) together count at most the storage's bytes. ``stored`` counts what the
compressed run actually keeps: codes, and for what it keeps as it is the whole storage,
once (a kept view holds its storage until backward; raw counts the view's own bytes, so
``compress=False`` can store more than raw).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef


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
    by_part: dict[str, KindBytes] = field(default_factory=lambda: defaultdict(KindBytes))
    _seen_raw: dict[tuple, StorageWeakRef] = field(default_factory=dict)
    _seen_kept: dict[tuple, StorageWeakRef] = field(default_factory=dict)
    #: Per storage address: its weak reference and the bytes not yet counted in it.
    _left_raw: dict[int, list[Any]] = field(default_factory=dict)
    _left_kept: dict[int, list[Any]] = field(default_factory=dict)
    #: Tensors coded so far: each gets a rounding seed of its own (see ``PackingMixin``).
    coded: int = 0

    #: While a forward runs: what undoes each change it made, should it raise (:meth:`begin`).
    _undo: list | None = None

    def _claim(
        self,
        seen: dict[tuple, StorageWeakRef],
        left: dict[int, list[Any]],
        key: tuple,
        storage: Any,
        nbytes: int,
    ) -> int:
        """The bytes a saved view adds: 0 if this view was counted while its storage lives,
        else its own bytes, up to what its storage has not counted yet."""
        ref = seen.get(key)
        if ref is not None and not ref.expired():
            return 0
        seen[key] = StorageWeakRef(storage)
        entry = left.get(key[0])
        if self._undo is not None:
            self._undo.append((seen, key, ref, left, entry, entry[1] if entry else 0))
        if entry is None or entry[0].expired():
            entry = left[key[0]] = [StorageWeakRef(storage), storage.nbytes()]
        claimed = min(nbytes, entry[1])
        entry[1] -= claimed
        return claimed

    def add(
        self,
        kind: str,
        t: torch.Tensor,
        stored: int | None,
        part: str = "backbone",
        kept: torch.Tensor | None = None,
        raw_of: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        """Record a saved tensor; ``stored`` is its packed size, or None if kept as it is
        (``kept``: the tensor kept in its place, a compacted copy; raw counts ``t``, or what
        the op it stands in for would have saved: ``raw_of``, see :func:`raw_as`)."""
        view = _view(t)
        if raw_of is None:
            raw = self._claim(self._seen_raw, self._left_raw, *view)
        else:
            raw = sum(self._claim(self._seen_raw, self._left_raw, *_view(r)) for r in raw_of)
        if stored is None:
            if kept is not None and kept is not t:
                view = _view(kept)
            # What is kept holds its whole storage until backward (a view of more than half
            # of it is not copied, and compress=False copies none): counted at its view's
            # bytes until 2026-12-07, a head fed a[:, :66] of 128 columns read 1.9x less than
            # it held. The storage's bytes are claimed once, by its first kept view.
            key, storage, _ = view
            stored = self._claim(self._seen_kept, self._left_kept, key, storage, storage.nbytes())
        self._count(kind, part, 1, raw, stored)

    def _count(self, kind: str, part: str, tensors: int, raw: int, stored: int) -> None:
        for entry in (self.by_kind[kind], self.by_part[part]):
            entry.tensors += tensors
            entry.raw_bytes += raw
            entry.stored_bytes += stored
        if self._undo is not None:
            self._undo.append((kind, part, tensors, raw, stored))

    def begin(self) -> None:
        """A forward begins: note how to undo what it adds (:meth:`undo`), at a few list
        appends per saved tensor (a copy of the account per forward grew with the step's
        forwards: a per-frame loop would copy it at every frame)."""
        self._undo = [self.coded]

    def end(self) -> None:
        """The forward returned: what it added stays."""
        self._undo = None

    def undo(self) -> None:
        """The forward raised: take back what it added (what it saved is freed with the
        exception, and a retry saves it again): totals, the views counted, the rounding
        seeds; kinds and parts it alone brought in leave the tables."""
        undo, self._undo = self._undo, None
        if undo is None:  # no forward begun on this account
            return
        self.coded = undo[0]
        for change in reversed(undo[1:]):
            if len(change) == 5:
                kind, part, tensors, raw, stored = change
                for table, name in ((self.by_kind, kind), (self.by_part, part)):
                    entry = table[name]
                    entry.tensors -= tensors
                    entry.raw_bytes -= raw
                    entry.stored_bytes -= stored
                    if entry == KindBytes():
                        del table[name]
                continue
            seen, key, ref, left, entry, count = change
            if ref is None:
                seen.pop(key, None)
            else:
                seen[key] = ref
            if entry is None:
                left.pop(key[0], None)
            else:
                left[key[0]] = entry
                entry[1] = count

    def restate(self, kind: str, part: str, delta: int) -> None:
        """Correct a saved tensor's stored bytes by ``delta`` (a batched tensor counted for
        its codes and then kept as it is, :mod:`.batching`)."""
        self._count(kind, part, 0, 0, delta)

    def add_unstrided(self, kind: str, t: torch.Tensor, part: str = "backbone") -> None:
        """Record a saved sparse tensor, kept as it is: its indices and values."""
        nbytes = unstrided_nbytes(t)
        self._count(kind, part, 1, nbytes, nbytes)

    def summary(self) -> dict:
        """Totals as a plain dict: ``raw_bytes``, ``stored_bytes``, ``ratio``, ``by_kind``."""
        raw = sum(k.raw_bytes for k in self.by_kind.values())
        stored = sum(k.stored_bytes for k in self.by_kind.values())
        return {
            "raw_bytes": raw,
            "stored_bytes": stored,
            "ratio": stored / raw if raw else 1.0,
            "by_kind": _table(self.by_kind),
            "by_part": _table(self.by_part),
        }


#: Attribute of a tensor an exact rewrite saves in place of what PyTorch's op would save.
RAW_OF = "_s2a_raw_of"


def raw_as(saved: torch.Tensor, *originals: torch.Tensor) -> torch.Tensor:
    """Mark ``saved``, which a rewrite saves for backward in place of PyTorch's ``originals``
    (an extremum's 1-bit mask for its input and output), so that raw bytes count what the
    uncompressed run keeps: those originals (none: the rewrite's second tensor). Raw read
    up to 86% low under compression, and never matched ``compress=False``'s."""
    setattr(saved, RAW_OF, originals)
    return saved


def raw_of(t: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Take the mark :func:`raw_as` left on a saved tensor (None where there is none)."""
    originals = getattr(t, RAW_OF, None)
    if originals is not None:
        delattr(t, RAW_OF)  # the mark holds the originals: not past the save
    return originals


def _view(t: torch.Tensor) -> tuple[tuple, Any, int]:
    """``(key, storage, bytes)`` of a saved view. The key identifies its data: storage
    address, geometry, dtype and version; one storage lookup serves it, the size (capped by
    the storage: broadcast views) and the weak reference. This runs for every saved tensor."""
    storage = t.untyped_storage()
    nbytes = min(t.numel() * t.element_size(), storage.nbytes())
    key = (storage.data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t._version)
    return key, storage, nbytes


def unstrided_nbytes(t: torch.Tensor) -> int:
    """Bytes of a sparse tensor's parts (indices and values); 0 for other layouts."""
    if t.layout == torch.sparse_coo:
        parts: tuple[torch.Tensor, ...] = (t._indices(), t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:
        parts = ()
    return sum(p.numel() * p.element_size() for p in parts)


def part_of(name: str, parts: list[tuple[str, str]] | tuple = ()) -> str:
    """The label of the first ``(prefix, label)`` whose module-name prefix covers ``name``."""
    for prefix, label in parts:
        if prefix and (name == prefix or name.startswith(prefix + ".")):
            return label
    return "backbone"


def _table(entries: dict[str, KindBytes]) -> dict[str, dict[str, int]]:
    return {
        key: {"raw_bytes": k.raw_bytes, "stored_bytes": k.stored_bytes, "tensors": k.tensors}
        for key, k in sorted(entries.items())
    }


class SavedBytesCounter:
    """Count what autograd keeps inside a ``with`` block, without changing anything.

    For baselines outside ``apply_s2a`` (full fine-tuning, LoRA): the same exact accounting,
    parameters and buffers of ``model`` excluded.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.account = ForwardAccount()
        #: Bytes of the storages the saved tensors keep alive, each once: what plain PyTorch
        #: holds (a saved view keeps its whole storage: timm's head saves ``x[:, 0]`` of the
        #: final norm's (B, N, D) output), where ``raw_bytes`` counts each view's own bytes.
        self.storage_bytes = 0
        self._alive: dict[int, StorageWeakRef] = {}

    def __enter__(self) -> SavedBytesCounter:
        self._storages = {
            t.untyped_storage().data_ptr()
            for t in (*self.model.parameters(), *self.model.buffers())
        }
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._storages:
            self.account.add("all", t, None)
            ref = self._alive.get(ptr)
            if ref is None or ref.expired():
                self._alive[ptr] = StorageWeakRef(storage)
                self.storage_bytes += storage.nbytes()
        return t

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def raw_bytes(self) -> int:
        """Bytes autograd kept for backward inside the block."""
        return self.account.summary()["raw_bytes"]
