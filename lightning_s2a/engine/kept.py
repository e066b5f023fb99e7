"""Saved tensors kept as they are: compact copies of small views, the version check that
refuses a tensor changed in place after its save, and expanded views packed as the tensor
they repeat. :mod:`.packing` uses them for what it does not code, :mod:`.packed` for what a
code cannot hold."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef


def compact(t: torch.Tensor, copies: dict | None = None) -> torch.Tensor:
    """A kept tensor that is a small view of a larger storage, copied.

    Autograd keeps a saved view's whole storage alive: timm's ViT pools its class token as
    ``x[:, 0]`` of the final norm's output, and keeping that slice for the head's gradient
    would keep all tokens (4.6 MiB at ViT-B/16, batch 8), while the accounting counts the
    slice. A copy keeps, and counts, only the slice; where something else keeps the storage
    anyway, the copy is an allocation of its own, counted as one.

    ``copies`` (view -> its copy, weakly) gives a view saved again the same copy while its
    storage and the copy live: an LSTM's per-step slices, saved by two ops each, were copied
    twice, and such a model stored more than the uncompressed run kept.
    """
    storage = t.untyped_storage()
    if t.numel() * t.element_size() * 2 > storage.nbytes():
        return t
    if copies is None:
        return t.detach().clone()  # values only, as every packed tensor: no graph recorded
    key = (
        storage.data_ptr(),
        t.storage_offset(),
        t.shape,
        t.stride(),
        t.dtype,
        t._version,
        t.is_conj(),  # v and v.conj() read one storage, as two values
        t.is_neg(),
    )
    seen = copies.get(key)
    if seen is not None and not seen[0].expired():
        copy = seen[1]()
        if copy is not None:
            return copy
    copy = t.detach().clone()
    copies[key] = (StorageWeakRef(storage), weakref.ref(copy))
    return copy


def check_version(t: torch.Tensor, version: int) -> torch.Tensor:
    """``t``, unless it changed in place since it was saved: then autograd's own error.

    Once saved-tensor hooks are installed PyTorch checks no versions, so a tensor kept as it
    is and then changed in place (``y = x.sigmoid(); y.mul_(2)``) would silently give wrong
    gradients. Codes need no check: they hold the values from when the tensor was saved.
    """
    if t._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: a saved tensor of shape {list(t.shape)} is at version "
            f"{t._version}; expected version {version} instead (S2A keeps it as it is; "
            "without S2A PyTorch raises the same error). Use the out-of-place op instead."
        )
    return t


class Kept:
    """A saved tensor kept as it is, with its version when saved (see :func:`check_version`).

    A tensor with autograd history is held detached (the same storage and version
    counter): an op's saved output held with its autograd node made a reference cycle
    through the graph that Python's collector cannot see, and a graph dropped without a
    backward (a skipped batch, a retry after an out-of-memory error) kept such outputs
    alive for good. Others are held as they are (a compact copy stays the object that
    :func:`compact` remembers). ``bare`` keeps ``t`` itself (forward-mode AD's dual
    tensors, whose tangent a detached view would lose)."""

    __slots__ = ("t", "version")

    def __init__(self, t: torch.Tensor, bare: bool = False) -> None:
        held = t.detach() if t.requires_grad and not bare else t
        self.t, self.version = held, t._version

    def unpack(self) -> torch.Tensor:
        return check_version(self.t, self.version)


def broadcast_base(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor an expanded view repeats (each stride-0 dimension of size > 1 narrowed to
    one), or None for a tensor that repeats nothing."""
    spread = [s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)]
    if not any(spread):
        return None
    return t[tuple(slice(0, 1) if b else slice(None) for b in spread)]


class Broadcast:
    """A saved expanded view, packed as the tensor it repeats (:func:`broadcast_base`);
    unpacked, expanded to its shape again: the same values, strides of 0 included."""

    __slots__ = ("packed", "shape")

    def __init__(self, packed: Any, shape: torch.Size) -> None:
        self.packed, self.shape = packed, shape

    def unpack(self) -> torch.Tensor:
        base = self.packed if isinstance(self.packed, torch.Tensor) else self.packed.unpack()
        return base.expand(self.shape)
