"""How the engine packs each saved tensor: the pack/unpack hooks of
:class:`.hooks.SavedTensorEngine`, in a file of their own (the engine mixes them in).

A saved tensor is kept exactly (parameters, integers, statistics, weights in another form,
tensors too small to code), packed as the tensor it repeats (an expanded view), or coded by
the quantizer :mod:`.quantizers` gives its operator kind, and counted in the open account.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .accounting import ForwardAccount, part_of, raw_of
from .attention import fused_operand, statistics
from .backend import resolve_backend
from .batching import Batched
from .calibration import WIDE_BITS
from .codebook import SHRINK_EVERY, check_positions, drifted, fit_codebook, outside_range
from .compile_guard import raise_in_compiled_backward
from .contexts import dual_level_open
from .deferred import record_answer
from .kept import Broadcast, Kept, broadcast_base, compact
from .packed import PackOptions
from .quantizers import QUANTIZERS, pack_minmax
from .recognition import (
    ROW_KINDS,
    STATS_KINDS,
    Call,
    constant,
    exact_code,
    outside_call,
    reduced,
)


class PackingMixin:
    """The engine's pack path (see :class:`.hooks.SavedTensorEngine` for the state it reads)."""

    # -- pack / unpack -------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        if self._busy:
            return t  # the quantizers' own saves (none record autograd)
        if dual_level_open():
            # Forward-mode AD (a dual level open): what ops save there can be dual tensors
            # whose storage cannot be read; kept as they are, uncompressed and uncounted,
            # with their version checked (returned bare, a tensor changed in place after
            # its save gave wrong gradients where PyTorch raises).
            return Kept(t, bare=True)
        if t.layout != torch.strided:  # sparse (a graph's adjacency): no codes, no storage
            if self._account is not None:
                kind = self._call.kind if self._call is not None else "generic"
                self._account.add_unstrided(kind, t, self._part())
            return Kept(t)
        if t.untyped_storage().data_ptr() in self._param_storages:
            return Kept(t)  # parameters and buffers are not activations: never coded
        self._busy = True
        try:
            # The quantizers' own torch calls skip the operator mode (and its Python frame).
            with torch._C.DisableTorchFunction():
                return self._pack_activation(t)
        finally:
            self._busy = False

    def _kept_as_it_is(self, t: torch.Tensor, kind: str, call: Call) -> bool:
        """True for a tensor kept as it is whatever its size: on the meta device, a weight in
        another form, an op's reduced statistic."""
        return (
            t.device.type == "meta"
            # computed without autograd (an autocast copy of a weight, a standardized or
            # dequantized weight): a constant of the trained graph, not an activation.
            # Dropout noise is one too, but its 1-bit code is exact.
            or (
                kind != "dropout"
                and constant(t, self._weight_numels)
                and t.untyped_storage().data_ptr() not in self._input_ptrs  # the model's input
            )
            or (kind in STATS_KINDS and statistics(t, call))
            # a per-row statistic, unless its code is exact anyway (masks, ReLU's 1 bit)
            or (reduced(t, self._largest, self._shapes) and not exact_code(kind, call))
        )

    def _unpack(self, packed: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():  # compiled autograd traces the backward
            raise_in_compiled_backward()
        self._unpacked = True  # a backward ran: the next forward of a submodule starts anew
        return packed if isinstance(packed, torch.Tensor) else packed.unpack()

    def _pack_activation(self, t: torch.Tensor) -> Any:
        call = self._call
        if call is None:  # saved outside any operator: a custom Function, or a checkpoint
            cfg = self.config
            call = outside_call(cfg.compress, cfg.bits_for("custom") is not None)
        if 0 in t.stride() and call.kind not in ROW_KINDS:
            # An expanded view (a weight's autocast copy broadcast over the batch by matmul,
            # ``x.mean(1, keepdim=True).expand_as(x)``): packed as the tensor it repeats, and
            # expanded again when unpacked; coded at its logical size it took more than the
            # tensor itself, and a weight in another form went unrecognised.
            base = broadcast_base(t)
            if base is not None:
                # raw: the expanded view, as the uncompressed run keeps it (its storage's
                # bytes at most); counted as the base until 2026-12-07, 33% low where the
                # base was a slice of a larger tensor (h[:, :1].expand_as(h))
                return Broadcast(self._pack_call(base, call, raw_of(t) or (t,)), t.shape)
        return self._pack_call(t, call)

    def _pack_call(
        self, t: torch.Tensor, call: Call, raw_for: tuple[torch.Tensor, ...] | None = None
    ) -> Any:
        cfg = self.config
        kind = "mask" if t.dtype == torch.bool else call.kind
        if (
            call.fused
            and kind == "attention"
            and not statistics(t, call)  # the log-sum-exp stays exact
            and fused_operand(t, call.fused)
        ):
            kind = "fused_attention"  # its backward recomputes from it: see fused_operands
        elif (
            call.position is not None
            and tuple(t.shape) == call.position
            and not (t.data_ptr() == call.position_ptrs[1] != call.position_ptrs[0])
        ):
            kind = "position"  # where the op samples: see ops.POSITION_OPERANDS
        account = self._account
        assert account is not None
        # a rewrite's tensor counts raw as what PyTorch's op would save; an expanded view's
        # base, as the view
        raw = raw_of(t) if raw_for is None else raw_for
        bits = configured = cfg.bits_for(kind)
        numel = self._remember(t)
        frame = ""
        if self._saving is not None or self.module_bits:
            frame = self._frames[-1][0] if self._frames else ""
            if self._saving is not None:
                self._saving.setdefault(frame, None)
            wide = self.module_bits.get(frame)
            if wide is not None and bits is not None and wide > bits:
                bits = wide if wide <= WIDE_BITS else None  # wider: kept exact (calibration)
        small = numel < cfg.min_numel
        keep = (
            not cfg.compress
            or bits is None
            or kind == "checkpoint"  # a region's inputs: backward recomputes it from them
            or not (t.is_floating_point() or t.dtype == torch.bool)  # indices stay exact
            or small
            or self._kept_as_it_is(t, kind, call)
        )
        if (
            small
            and self._saving is not None
            and not self._exact
            and cfg.compress
            and bits is not None
            and kind != "checkpoint"
            and t.is_floating_point()
            and not exact_code(kind, call)
            and not self._kept_as_it_is(t, kind, call)
        ):
            # calibration kept whole, for its size alone, what a larger batch may code: its
            # size per batch item (see calibration.check_calibrated_shape)
            self._kept_small = max(self._kept_small, numel / max(1, self._calibrating_batch))
        if (
            self._saving is not None
            and not keep
            and configured is not None
            and not exact_code(kind, call)
        ):
            # calibration: the narrowest width of the module's lossy codes, which its default
            # tolerance follows (an op_bits entry of 2 bits is measured as 2 bits; a ReLU's
            # exact mask is no 2-bit code)
            was = self._saving[frame]
            self._saving[frame] = configured if was is None else min(was, configured)
        keep = keep or self._exact
        part = self._part()
        if keep:
            kept = compact(t, self._copies) if cfg.compress and not self._exact else t
            account.add(kind, t, None, part, kept, raw)  # raw: the original's, as uncompressed
            return Kept(kept)
        row = call.row
        if not row and t.dim() > 1 and t.shape[-1] in self._row_widths:
            row = t.shape[-1] if QUANTIZERS[kind] is pack_minmax else 0
        opts = PackOptions(
            bits=bits,
            group_size=cfg.group_size,
            stochastic=cfg.stochastic_rounding,
            backend=self._backend(t),
            bnb_quant_type=cfg.bnb_quant_type,
            spec=call.spec,
            dim=call.dim,
            row=row,
            channels=call.channels,
            # Stochastic rounding: noise of its own per tensor (the same seed for every
            # tensor of a forward correlated their rounding errors), the same on a rerun.
            seed=((cfg.seed + self.step) * 1_000_003 + account.coded) % 2**63,
            defer=t.device.type in self.defer_on,
            batches=self._batches if numel <= self.batch_numel else None,
        )
        account.coded += 1
        if kind == "elementwise" and call.site is not None:
            self._attach_codebook(t, call, opts)
        packed = QUANTIZERS[kind](t.detach(), opts)
        if isinstance(packed, Batched):  # coded with its batch: counted for its share now
            account.add(kind, t, packed.share, part, None, raw)
            packed.on_kept = functools.partial(account.restate, kind, part)
            return packed
        if packed.pending is not None:  # counted once the device says whether codes hold it
            self._deferred.add(packed, lambda p: self._count(account, kind, t, p, part, raw))
            return packed
        if packed.raw is not None:  # no code could hold it faithfully: kept as it is
            account.add(kind, t, None, part, packed.raw, raw)  # counted like any kept tensor
            return packed
        account.add(kind, t, packed.nbytes, part, None, raw)
        return packed

    def _remember(self, t: torch.Tensor) -> int:
        """Note ``t``'s shape and size for this account's statistics rule (``reduced``);
        returns its element count."""
        numel = t.numel()
        if numel > self._largest:
            self._largest = numel
        self._shapes.add(t.shape)
        return numel

    @staticmethod
    def _count(
        account: ForwardAccount, kind: str, t: torch.Tensor, packed: Any, part: str, raw: Any
    ) -> None:
        """Count a deferred tensor: kept as it is (what it holds: its own copy where it was
        compacted, each save's; until 2026-12-07 the view it was saved as, once, while each
        save held a copy), or its codes."""
        kept = packed.raw
        account.add(kind, t, None if kept is not None else packed.nbytes, part, kept, raw)

    def _part(self) -> str:
        return part_of(self._frames[-1][0] if self._frames else "", self.parts)

    def _backend(self, t: torch.Tensor) -> str:
        return resolve_backend(self.config.backend, t.device)

    def _drift_answer(self, site: tuple) -> bool:
        """Whether the site's previous tensor had drifted out of its codebook's range (see
        :func:`.codebook.drifted`). Read at the site's next call, waiting for the device if
        it has not got there (it almost always has: the answer is a call old), so the codes
        change at the same call in every run, as fast as the GPU goes."""
        pending = self._drift_checks.pop(site, None)
        if pending is None:
            return False
        if pending[1] is not None:
            pending[1].synchronize()
        return bool(pending[0])

    def _check_positions(self, t: torch.Tensor) -> torch.Tensor:
        """The flat positions a drift check reads, per size and device (cached)."""
        key = (t.numel(), t.device)
        idx = self._drift_positions.get(key)
        if idx is None:
            if len(self._drift_positions) >= 64:  # sizes that change every step: bounded
                self._drift_positions.clear()
            idx = self._drift_positions[key] = check_positions(
                t.numel(), self.config.seed, t.device
            )
        return idx

    def _attach_codebook(self, t: torch.Tensor, call: Call, opts: PackOptions) -> None:
        cfg = self.config
        assert call.spec is not None and call.spec.derivative is not None
        site = call.site
        cb = self.codebooks.get(site)
        fresh = cb is None or cb.bits != opts.bits or cb.due(self.step, cfg.codebook_refresh)
        moved = False
        if not fresh:
            assert cb is not None
            # The previous call's answer (a device's, read now), else this tensor's: read
            # at once on the CPU, at the site's next call on a device.
            moved = self._drift_answer(site)
            if not moved:
                # (a codebook saved without its range, +-inf, never drifts inward)
                inward = self.step - cb.fitted_at >= SHRINK_EVERY and math.isfinite(cb.hi - cb.lo)
                host, event = record_answer(drifted(t, cb, self._check_positions(t), inward))
                if event is None:
                    moved = bool(host)
                else:
                    self._drift_checks[site] = (host, event)
        if fresh or moved:
            self._drift_checks.pop(site, None)
            flat = t.detach().reshape(-1)
            gen = torch.Generator().manual_seed(cfg.seed)
            m = min(cfg.codebook_samples, flat.numel())
            idx = torch.randint(flat.numel(), (m,), generator=gen).to(flat.device)
            sample = flat[idx].to("cpu", torch.float64)  # as the fit reads it
            if (
                moved
                and cb is not None
                and cb.sample is not None
                and bool(outside_range(sample, cb))
            ):
                # half the old samples, half the new: two distributions seen in turn
                # settle on codes for both instead of a refit at every call. Not where the
                # tensor drifted inward: the old half kept the wide range, and every later
                # check refitted on it again, 64 forwards apart, with stale codes for good.
                sample = torch.cat([cb.sample[: m - m // 2], sample[: m // 2]])
            first = self.step if cb is None or cb.bits != opts.bits else cb.first_fit
            cb = fit_codebook(sample, call.spec.derivative, opts.bits, jumps=call.spec.jumps)
            cb.fitted_at, cb.first_fit, cb.sample = self.step, first, sample
            self.codebooks[site] = cb
            self._device_codebooks = {
                k: v for k, v in self._device_codebooks.items() if k[0] != site
            }
        key = (site, t.device, t.dtype)
        if key not in self._device_codebooks:
            self._device_codebooks[key] = cb.to(t.device, t.dtype)
        opts.codebook = self._device_codebooks[key]
