"""Small saved tensors of one forward, coded together: one pass over many instead of one each.

At small sizes a torch op costs its fixed host time whatever its data: a min-max pack of 960
elements is about 40 ops (150 us on a CPU core), a ReLU mask about 12, and on a GPU each op is
a launch the host issues. So a tensor of at most ``SavedTensorEngine.batch_numel`` elements
(:data:`BATCH_NUMEL` by default) that takes min-max codes (torch backend, rounding to nearest)
or an exact 1-bit mask is copied, its values as saved, into the open batch of its code,
dtype and device. A batch is coded in one pass when it would pass :data:`BATCH_CAPACITY`
elements, when the forward ends, or when one of its tensors is read first (a backward inside
the forward).

Each tensor gets exactly the codes it would get alone, byte for byte: min-max groups never
cross two tensors (each is padded to whole groups with its last value, as alone, and its
padding coded 0), and masks start on whole bytes. Only tensors the min-max codes likely hold
join a batch: one whose values (read when saved) are not finite, beyond half the fp16 range,
or so small that fp16 statistics could underflow is coded alone (:class:`.packed.MinMaxPacked`:
kept as it is where the codes do not hold it, refused at unpack if changed in place since, and
counted once where saved twice), as where batching is off. One that joins and has a group the
codes do not hold after all (told only per group: see ``minmax._group_stats``)
is kept as its copy in the batch, as it would be kept alone.

Costs: until its batch is coded a tensor's copy is alive (at most :data:`BATCH_CAPACITY`
elements per open batch), and a tensor's codes are a view of its batch's bytes, which are
freed with the last of its tensors (each is counted for its own share; the shares add up to
the batch's bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from .bitpack import pack_bits, unpack_lookup
from .geometry import Geometry
from .minmax import FP16_MAX, dequantize_minmax, minmax_codes
from .packed import CodePacked, MinMaxPacked

#: Tensors of at most this many elements are batched by default (larger ones spend their
#: ops' fixed cost over enough data; their copy into a batch would cost more than it saves).
BATCH_NUMEL = 65536
#: A batch is coded before it would hold more elements than this.
BATCH_CAPACITY = 1 << 20


class Batched:
    """A saved tensor in a batch: until the batch is coded, its place; then what it became
    (``done``: the codes, or its saved copy where they do not hold it)."""

    __slots__ = ("batch", "decoder", "done", "on_kept", "share", "slot")

    def __init__(self, batch: _Batch, share: int) -> None:
        self.batch: _Batch | None = batch
        self.done: Any = None
        #: Its bytes once coded: its codes' share of the batch (known when it is added).
        self.share = share
        #: Called with the bytes it adds where it is kept instead of coded (the account).
        self.on_kept: Callable[[int], None] | None = None
        #: Once coded: its slot in the batch, and what decodes the batch's tensors together.
        self.slot = 0
        self.decoder: _Decoder | None = None

    def settle(self) -> Any:
        """What this tensor became, coding its batch first if it is still open."""
        if self.done is None:
            assert self.batch is not None
            self.batch.code()
        return self.done

    @property
    def nbytes(self) -> int:
        """Bytes it keeps: its share of the batch's codes, or its copy where kept."""
        return self.settle().nbytes

    def unpack(self) -> torch.Tensor:
        """The saved tensor again (the same data on every call)."""
        done = self.settle()
        if self.decoder is None or isinstance(done, _KeptCopy):
            return done.unpack()
        return self.decoder.take(self.slot, done.unpack)


class _Decoder:
    """A coded batch's tensors, decoded together at the first read of one of them: one pass
    instead of one per tensor. Each is handed out once; read again (a second backward), a
    tensor is decoded alone, to the same values.

    Until the last of them is read, the batch's decoded values stay alive together (at most
    :data:`BATCH_CAPACITY` elements), where tensors decoded alone would come and go."""

    __slots__ = ("decode", "outputs")

    def __init__(self, decode: Callable[[], dict[int, torch.Tensor]]) -> None:
        self.decode: Callable[[], dict[int, torch.Tensor]] | None = decode
        self.outputs: dict[int, torch.Tensor] | None = None

    def take(self, slot: int, alone: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Slot ``slot``'s values: from the batch's one pass, else decoded alone."""
        if self.outputs is None:
            assert self.decode is not None
            self.outputs, self.decode = self.decode(), None
        out = self.outputs.pop(slot, None)
        return alone() if out is None else out


class _Batch:
    """Tensors waiting for one pass of their code (see :class:`PackBatches`)."""

    def __init__(self, batches: PackBatches, key: tuple) -> None:
        self.batches, self.key = batches, key
        #: Per tensor: its place, its geometry, its elements, padded, what decodes it.
        self.slots: list[tuple[Batched, Geometry, int, int, Any]] = []
        self.chunks: list[torch.Tensor] = []
        self.numel = 0

    def add(
        self, chunk: torch.Tensor, geometry: Geometry, n: int, share: int, table: Any = None
    ) -> Batched:
        member = Batched(self, share)
        self.slots.append((member, geometry, n, chunk.numel(), table))
        self.chunks.append(chunk)
        self.numel += chunk.numel()
        return member

    def code(self) -> None:
        """Code every tensor of the batch in one pass, and close it."""
        self.batches.close(self)
        chunks, slots = self.chunks, self.slots
        self.chunks, self.slots = [], []
        try:
            data = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            done, decode = self._code(slots, data)
        except BaseException as err:  # an out-of-memory: said again at each tensor's read
            for member, *_ in slots:
                member.done, member.batch = _Failed(err), None
            raise
        decoder = _Decoder(decode) if decode is not None and len(slots) > 1 else None
        for i, (member, *_) in enumerate(slots):
            member.done, member.batch = done[i], None
            member.slot, member.decoder = i, decoder
            if isinstance(done[i], _KeptCopy) and member.on_kept is not None:
                member.on_kept(done[i].nbytes - member.share)  # counted for its codes
            member.on_kept = None

    def _code(self, slots: list, data: torch.Tensor) -> tuple[list[Any], Any]:
        """What each slot becomes, its values in ``data`` one after another, and what
        decodes the coded slots in one pass (None: each alone)."""
        raise NotImplementedError


class _MinMaxBatch(_Batch):
    """Min-max codes (see :func:`.minmax.minmax_codes`): each tensor whole groups of its own."""

    def _code(self, slots: list, data: torch.Tensor) -> tuple[list[Any], Any]:
        _, bits, group, dtype, _ = self.key
        codes, offset, scale, fits = minmax_codes(data, bits, group)
        sizes = tuple((n, padded) for _, _, n, padded, _ in slots)
        layout = _minmax_layout(sizes, group, data.device)
        if layout.padding is not None:
            codes.index_fill_(0, layout.padding, 0)  # each tensor's padding coded 0, as alone
        packed = pack_bits(codes, bits)
        # Per tensor, as MinMaxPacked decides alone: every group fits, and no fp16 underflow
        # (the largest ``|offset| + span`` of its groups not under the bound; NaN groups
        # do not fit, whatever this reads for them).
        bad = torch.zeros(len(slots), dtype=torch.int32, device=data.device)
        bad.index_add_(0, layout.group_owner, fits.logical_not().int())
        big = offset.abs().add_(scale, alpha=(1 << bits) - 1)
        top = torch.full((len(slots),), -torch.inf, dtype=big.dtype, device=data.device)
        top.scatter_reduce_(0, layout.group_owner, big, "amax")
        fails = (bad > 0).logical_or_(top < 2.0 ** (bits - 19))
        per_byte = 8 // bits
        done: list[Any] = []
        for (_, geometry, n, padded, _), fail, start in zip(
            slots, fails.tolist(), layout.starts, strict=True
        ):
            g0, g1 = start // group, (start + padded) // group
            if fail:  # a group the codes do not hold (see minmax._group_stats): kept
                done.append(_KeptCopy(geometry.restore(data[start : start + n].clone())))
            else:
                done.append(
                    MinMaxPacked.of_codes(
                        geometry,
                        n,
                        bits,
                        group,
                        packed[start // per_byte : (start + padded) // per_byte],
                        offset[g0:g1],
                        scale[g0:g1],
                    )
                )

        places = [
            (i, geometry, start, n)
            for i, ((_, geometry, n, _, _), start) in enumerate(
                zip(slots, layout.starts, strict=True)
            )
            if isinstance(done[i], MinMaxPacked)
        ]
        whole = partial(dequantize_minmax, packed, offset, scale, data.numel(), bits, group, dtype)
        return done, partial(_decode_parts, whole, places)


class _MaskBatch(_Batch):
    """Exact 1-bit masks (a ReLU's ``x > 0``): each tensor starts on a whole byte."""

    def _code(self, slots: list, data: torch.Tensor) -> tuple[list[Any], Any]:
        packed = pack_bits(data, 1)
        start, done, starts = 0, [], []
        for _, geometry, n, padded, table in slots:
            codes = packed[start // 8 : (start + padded) // 8]
            done.append(CodePacked.of_codes(geometry, n, 1, codes, table))
            starts.append(start)
            start += padded
        table = slots[0][4]
        if any(slot[4] is not table for slot in slots):
            return done, None  # other values to decode to: each alone

        places = [
            (i, geometry, start, n)
            for i, ((_, geometry, n, _, _), start) in enumerate(zip(slots, starts, strict=True))
        ]
        return done, partial(
            _decode_parts, partial(unpack_lookup, packed, 1, data.numel(), table), places
        )


def _decode_parts(whole: Callable[[], torch.Tensor], places: list) -> dict[int, torch.Tensor]:
    """A coded batch's tensors from one decode of all of it (``whole``): slot -> tensor.
    What decodes holds the codes and where each tensor lies, never the values coded (a
    closure over the batch's values kept a full copy of every tensor until backward)."""
    flat = whole()
    return {i: geometry.restore(flat[start : start + n]) for i, geometry, start, n in places}


class _KeptCopy:
    """A batched tensor its codes do not hold: kept as its copy made when it was saved."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    @property
    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()

    def unpack(self) -> torch.Tensor:
        return self.t


class _Failed:
    """A batched tensor whose batch's pass raised: each read says so (not an empty batch)."""

    __slots__ = ("err",)
    nbytes = 0

    def __init__(self, err: BaseException) -> None:
        self.err = err

    def unpack(self) -> torch.Tensor:
        raise RuntimeError(
            f"S2A could not code the batch of small saved tensors this one was in "
            f"({type(self.err).__name__}: {self.err}); its values are lost. Run with "
            "handle.engine.batch_numel = 0 to code each saved tensor alone."
        ) from self.err


class _Layout:
    """Where each tensor of a min-max batch lies: its first element, the owner of each group,
    and the padding's positions (None if there is none)."""

    def __init__(self, sizes: tuple, group: int, device: torch.device) -> None:
        starts, owners, padding, start = [], [], [], 0
        for i, (n, padded) in enumerate(sizes):
            starts.append(start)
            owners.append(torch.full((padded // group,), i, dtype=torch.long))
            if padded > n:
                padding.append(torch.arange(start + n, start + padded))
            start += padded
        self.starts = starts
        self.group_owner = torch.cat(owners).to(device)
        self.padding = torch.cat(padding).to(device) if padding else None


_LAYOUTS: dict[tuple, _Layout] = {}


def _minmax_layout(sizes: tuple, group: int, device: torch.device) -> _Layout:
    """The batch's layout, built once per run of sizes (a forward saves the same each step)."""
    key = (sizes, group, device)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _Layout(sizes, group, device)
        if len(sizes) * 16 + layout.group_owner.numel() > 1 << 16:
            return layout  # large (many tiny tensors): built per batch, not kept
        if len(_LAYOUTS) >= 64:  # sizes that change every step: bounded
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


class PackBatches:
    """The engine's open batches, one per code, dtype and device."""

    def __init__(self, capacity: int = BATCH_CAPACITY) -> None:
        self.capacity = capacity
        self._open: dict[tuple, _Batch] = {}

    def __len__(self) -> int:
        return len(self._open)

    def minmax(self, t: torch.Tensor, bits: int, group: int) -> Batched | None:
        """Add ``t`` (not empty; ``group * bits`` a whole number of bytes) to its min-max
        batch and return its place there; None where the codes might not hold it: values
        not finite, beyond half the fp16 range (a 1-bit step is the whole span), or so small
        that fp16 statistics could underflow (see :func:`.minmax.underflows`; the group of
        the largest magnitude has ``|offset| + span`` at least about that magnitude)."""
        flat = t.detach().reshape(-1)
        lo, hi = (float(v) for v in torch.aminmax(flat))
        top = max(-lo, hi)  # NaN (a NaN anywhere) fails both comparisons
        if not (top <= FP16_MAX / 2 and top >= 2.0 ** (bits - 17)):
            return None
        n = flat.numel()
        padded = -(-n // group) * group
        if padded > n:  # whole groups of its own, padded with its last value as alone: a copy
            chunk = torch.cat([flat, flat[-1:].expand(padded - n)])
        elif flat.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            chunk = flat.clone()  # a view of the saved tensor: its values now
        else:
            chunk = flat  # reshape already copied it
        share = padded * bits // 8 + 4 * (padded // group)  # codes, fp16 offsets and scales
        batch = self._batch(("minmax", bits, group, t.dtype, t.device), _MinMaxBatch, padded)
        return batch.add(chunk, Geometry.of(t), n, share)

    def mask(self, mask: torch.Tensor, t: torch.Tensor, table: torch.Tensor) -> Batched:
        """Add the 1-bit code ``mask`` of ``t`` (flat, not empty), decoding to ``table``."""
        n = mask.numel()
        pad = (-n) % 8
        chunk = torch.cat([mask, mask.new_zeros(pad)]) if pad else mask
        batch = self._batch(("mask", t.device), _MaskBatch, chunk.numel())
        return batch.add(chunk, Geometry.of(t), n, chunk.numel() // 8, table)

    def _batch(self, key: tuple, kind: type[_Batch], numel: int) -> _Batch:
        batch = self._open.get(key)
        if batch is not None and batch.numel + numel > self.capacity:
            batch.code()
            batch = None
        if batch is None:
            batch = self._open[key] = kind(self, key)
        return batch

    def close(self, batch: _Batch) -> None:
        """Take ``batch`` off the open ones (it is being coded)."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]

    def code(self) -> None:
        """Code every open batch (the end of a forward)."""
        while self._open:
            next(iter(self._open.values())).code()
