"""Packed saved tensors: what a quantizer returns and the engine keeps until backward.

Each packed object has ``unpack()`` (the same data on every call) and ``nbytes`` (bytes
actually kept): per-group min-max codes, bitsandbytes 4-bit, interval codes into a table of
points, per-row softmax codes, exact 1-bit codes, or the tensor itself (:class:`Kept`,
:class:`KeptPacked`) where no code holds it faithfully. :mod:`.quantizers` chooses among them
by operator kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .bitpack import pack_bits, unpack_levels, unpack_lookup
from .codebook import DeviceCodebook
from .geometry import Geometry, Rows
from .kept import check_version, compact
from .minmax import dequantize_minmax, quantize_minmax, underflows
from .ops import ElementwiseSpec


@dataclass
class PackOptions:
    """What a quantizer needs to know about the call: bits, grouping, backend, op context."""

    bits: int
    group_size: int = 64
    stochastic: bool = False
    backend: str = "torch"  # "torch" | "triton" | "bnb"
    bnb_quant_type: str = "nf4"
    spec: ElementwiseSpec | None = None
    #: Derivative code for this call site on this device (boundaries, points, interval grid).
    codebook: DeviceCodebook | None = None
    dim: int = -1
    #: The op normalizes rows of this many consecutive values each on its own (layer, RMS,
    #: group and instance norms; 0: none).
    row: int = 0
    #: The op normalizes each channel (dimension 1) over the batch (BatchNorm in training).
    channels: bool = False
    seed: int = 0
    #: Leave "does the code hold it" on the device for :mod:`.deferred` (CUDA: no sync).
    defer: bool = False
    #: Where a small tensor joins a batch coded in one pass (:mod:`.batching`); None: alone.
    batches: Any = None


class Packed:
    """Base of the packed objects: ``raw`` is the tensor itself when it was kept exact.

    Whether a code holds a tensor faithfully is known on the tensor's device. Reading it
    (``bool(flag)``) stalls a CUDA queue, so with ``PackOptions.defer`` the answer stays on the
    device (``holds``) and the tensor is kept (``pending``) until :mod:`.deferred` reads it
    without stalling and calls :meth:`resolve`; :meth:`settle` reads it at once if unpack or
    ``nbytes`` come first.
    """

    #: The original tensor, when no code could represent it faithfully (else None).
    raw: torch.Tensor | None = None
    #: ``raw``'s version when it was kept (see :func:`check_version`).
    raw_version: int = 0
    #: The original tensor until ``holds`` is read (else None).
    pending: torch.Tensor | None = None
    #: ``pending``'s version when it was saved.
    pending_version: int = 0
    #: A bool on the tensor's device: True if the codes hold the tensor faithfully.
    holds: torch.Tensor | None = None

    def decide(self, t: torch.Tensor, holds: torch.Tensor, defer: bool) -> None:
        """Keep ``t`` as it is unless ``holds``; with ``defer``, decide when it is read."""
        if defer:
            self.pending, self.holds = t.detach(), holds
            self.pending_version = t._version
        elif not bool(holds):
            self.keep(t.detach())

    def resolve(self, holds: bool) -> None:
        """The deferred answer: drop the kept tensor, or the codes if they do not hold it.
        Kept, it is the tensor as saved: one changed in place since fails at unpack with
        autograd's error (it was kept as changed, and its gradient computed from that)."""
        t, self.pending, self.holds = self.pending, None, None
        if t is not None and not holds:
            self.keep(t, self.pending_version)

    def settle(self) -> None:
        """Read a deferred answer now (a device sync), if there is one."""
        if self.pending is not None:
            assert self.holds is not None
            self.resolve(bool(self.holds))

    def keep(self, t: torch.Tensor, version: int | None = None) -> None:
        """Keep ``t`` exactly and drop the codes. ``version``: ``t``'s when it was saved,
        where that was earlier (a deferred answer); changed since, it is kept as it is, for
        :func:`check_version` to refuse at unpack."""
        changed = version is not None and t._version != version
        self.raw = t if changed else compact(t)
        self.raw_version = version if changed else self.raw._version
        self.codes = self.codes.new_empty(0)

    @property
    def nbytes(self) -> int:
        """Bytes actually kept: the tensor itself where it was kept, else the codes."""
        self.settle()
        t = self.raw
        if t is not None:
            return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        return self._code_bytes()

    def unpack(self) -> torch.Tensor:
        """The saved tensor again (the same data on every call)."""
        self.settle()
        if self.raw is not None:
            return check_version(self.raw, self.raw_version)
        return self._decode()

    def _code_bytes(self) -> int:
        raise NotImplementedError

    def _decode(self) -> torch.Tensor:
        raise NotImplementedError


class KeptPacked(Packed):
    """A tensor kept exactly as it is, because a code could not represent it faithfully."""

    def __init__(self, t: torch.Tensor) -> None:
        self.raw = compact(t)
        self.raw_version = self.raw._version


class MinMaxPacked(Packed):
    """Per-group min-max codes with fp16 offset and scale (torch or Triton backend).

    A tensor with a group the fp16 stats cannot represent (a NaN, an infinity, a value beyond
    +-65504) is kept as it is instead (``raw``): its codes would saturate or turn NaN.
    """

    def __init__(self, t: torch.Tensor, opts: PackOptions, rows: Rows | None = None) -> None:
        self.geometry = Geometry.of(t)
        self.rows = rows  # groups inside one row of a norm (see Rows)
        x = rows.gather(t) if rows is not None else t
        self.bits = opts.bits
        self.group = rows.group if rows is not None else opts.group_size
        self.n = x.numel()
        self.triton = opts.backend == "triton"
        if self.triton:
            from .triton_minmax import triton_quantize_minmax

            self.codes, self.offset, self.scale, fits = triton_quantize_minmax(
                x, self.bits, self.group, opts.stochastic, seed=opts.seed, with_fits=True
            )
        else:
            gen = None
            if opts.stochastic:
                gen = torch.Generator(device=t.device).manual_seed(opts.seed)
            self.codes, self.offset, self.scale, fits = quantize_minmax(
                x, self.bits, self.group, opts.stochastic, gen, with_fits=True
            )
        holds = fits.all() & ~underflows(self.offset, self.scale, self.bits)
        self.decide(t, holds, opts.defer)

    @classmethod
    def of_codes(
        cls, geometry: Geometry, n: int, bits: int, group: int, codes, offset, scale
    ) -> MinMaxPacked:
        """Codes made elsewhere (one pass over a batch of tensors, :mod:`.batching`)."""
        self = cls.__new__(cls)
        self.geometry, self.rows, self.bits, self.group, self.n = geometry, None, bits, group, n
        self.triton, self.codes, self.offset, self.scale = False, codes, offset, scale
        return self

    def keep(self, t: torch.Tensor, version: int | None = None) -> None:
        super().keep(t, version)
        self.offset, self.scale = self.codes, self.codes

    def _code_bytes(self) -> int:
        return _nbytes(self.codes, self.offset, self.scale)

    def _decode(self) -> torch.Tensor:
        args = (self.codes, self.offset, self.scale, self.n, self.bits, self.group)
        if self.triton:
            from .triton_minmax import triton_dequantize_minmax

            flat = triton_dequantize_minmax(*args, self.geometry.dtype)
        else:
            flat = dequantize_minmax(*args, self.geometry.dtype)
        if self.rows is not None:
            flat = self.rows.scatter(flat, self.geometry.shape)
        return self.geometry.restore(flat)


class BnbPacked(Packed):
    """bitsandbytes ``quantize_4bit`` (nf4 or fp4, symmetric absmax per block)."""

    def __init__(self, t: torch.Tensor, opts: PackOptions) -> None:
        import bitsandbytes.functional as bnbf

        self.geometry = Geometry.of(t)
        flat = t.detach().reshape(-1)
        self.codes, self.state = bnbf.quantize_4bit(
            flat, blocksize=opts.group_size, quant_type=opts.bnb_quant_type
        )

    def _code_bytes(self) -> int:
        return _nbytes(self.codes, self.state.absmax)

    def _decode(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        flat = bnbf.dequantize_4bit(self.codes, self.state).reshape(-1)
        return self.geometry.restore(flat)


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


#: Said where a backward that builds a graph (``create_graph=True``) reads a derivative code.
SECOND_ORDER_ERROR = (
    "a backward with create_graph=True (a gradient penalty, a Hessian-vector product) reads "
    "a smooth operator's saved tensor (tanh, sigmoid, GELU, SiLU, ...) that S2A stored as a "
    "derivative code: its values are chosen so the first derivative is right, not the second, "
    "so second-order gradients would be silently wrong (a tanh MLP's: cosine 0.73). Run such "
    "steps without compression: S2AConfig(compress=False), or handle.stop_engine() before "
    "their forward and handle.start_engine() after."
)


class CodePacked(Packed):
    """k-bit interval indices into a lookup table of points (derivative codes, exact masks).

    ``codes`` are one code per element, or with ``packed=True`` the packed bytes themselves (as
    the Triton kernels produce them); ``triton=True`` decodes with the Triton kernel too.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        bits: int,
        table: torch.Tensor,
        t: torch.Tensor,
        *,
        packed: bool = False,
        triton: bool = False,
        first_order: bool = False,
    ):
        self.geometry = Geometry.of(t)
        self.n = t.numel()
        self.bits = bits
        self.codes = codes if packed else pack_bits(codes, bits)
        self.table = table  # shared per codebook; not counted per tensor
        self.triton = triton
        #: Interval points of a derivative code: right for the first derivative only.
        self.first_order = first_order

    @classmethod
    def of_codes(
        cls, geometry: Geometry, n: int, bits: int, codes: torch.Tensor, table: torch.Tensor
    ) -> CodePacked:
        """Packed codes made elsewhere (one pass over a batch of masks, :mod:`.batching`)."""
        self = cls.__new__(cls)
        self.geometry, self.n, self.bits, self.codes, self.table = geometry, n, bits, codes, table
        self.triton, self.first_order = False, False
        return self

    def _code_bytes(self) -> int:
        return _nbytes(self.codes)

    def _decode(self) -> torch.Tensor:
        if self.first_order and torch.is_grad_enabled() and in_backward():
            raise RuntimeError(SECOND_ORDER_ERROR)
        if self.triton:
            from .triton_codes import triton_unpack_lookup

            flat = triton_unpack_lookup(self.codes, self.bits, self.n, self.table)
        else:
            flat = unpack_lookup(self.codes, self.bits, self.n, self.table)
        return self.geometry.restore(flat)


class RowMaxPacked(Packed):
    """Softmax outputs: per row along ``dim``, unsigned codes over ``[0, row max]``.

    ``scale`` holds each row's maximum in fp16, and the step ``max / levels`` is computed in
    float32 on both sides. Until 2026-12-07 it held the step itself in fp16, which fell
    into fp16's subnormals for flat rows (a maximum under 0.016 at 8 bits, 9e-4 at 4): a
    reviewer's spatial softmax over 512 x 512 decoded to zeros at 8 bits (gradient zero),
    and one over 256 x 256 lost 4% at 8 bits against 0.3% at 4. The maximum itself is a
    normal fp16 number for rows up to 16384 long, and keeps 0.5% at 5.8e-6."""

    def __init__(self, t: torch.Tensor, opts: PackOptions) -> None:
        self.geometry = Geometry.of(t)
        self.bits, self.dim = opts.bits, opts.dim
        rows = t.detach().movedim(self.dim, -1)
        self.row_shape = rows.shape
        self.triton = opts.backend == "triton"
        if self.triton:  # one fused kernel; a view (no copy) when ``dim`` is already last
            from .triton_codes import triton_quantize_rows

            width = self.row_shape[-1]
            rows = rows.reshape(math.prod(self.row_shape[:-1]), width)
            self.codes, self.scale = triton_quantize_rows(
                rows, self.bits, opts.stochastic, seed=opts.seed
            )
            return
        rows = rows.flatten(0, -2) if rows.dim() > 1 else rows.unsqueeze(0)
        if rows.dtype == torch.float64:
            rows = rows.float()  # half-precision rows convert inside the division below
        levels = (1 << self.bits) - 1
        rowmax = rows.amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
        self.scale = rowmax.float().clamp(min=0.0).to(torch.float16)
        s = self.scale.float().div_(levels).unsqueeze(1)
        # A row whose scale is 0 divides by infinity: codes 0, even with stochastic rounding.
        v = rows / torch.where(s > 0, s, torch.inf)
        if opts.stochastic:
            gen = torch.Generator(device=t.device).manual_seed(opts.seed)
            v.add_(torch.rand(v.shape, device=v.device, generator=gen))
        else:
            v.add_(0.5)
        # The uint8 conversion truncates, which is the floor of the clamped, non-negative values.
        self.codes = pack_bits(v.clamp_(0, levels).to(torch.uint8), self.bits)

    def _code_bytes(self) -> int:
        return _nbytes(self.codes, self.scale)

    def _decode(self) -> torch.Tensor:
        width = self.row_shape[-1]
        if self.triton:
            from .triton_codes import triton_dequantize_rows

            rows = triton_dequantize_rows(
                self.codes, self.scale, width, self.bits, self.geometry.dtype
            ).view(self.row_shape)
            out = rows.movedim(-1, self.dim)
            return self.geometry.restore(out.reshape(-1))
        codes = unpack_levels(self.codes, self.bits, self.scale.numel() * width)
        codes = codes.view(self.scale.numel(), width)
        step = self.scale.float().div_((1 << self.bits) - 1)
        rows = codes.mul_(step.unsqueeze(1)).view(self.row_shape)
        out = rows.movedim(-1, self.dim).to(self.geometry.dtype)
        return self.geometry.restore(out.reshape(-1))


class TwoLevelPacked(Packed):
    """Dropout noise ``{0, 1/(1-p)}`` (or any boolean mask): one exact bit per element."""

    def __init__(self, t: torch.Tensor, triton: bool = False) -> None:
        self.geometry = Geometry.of(t)
        self.n = t.numel()
        self.is_bool = t.dtype == torch.bool
        # The kernels take bool, fp32, fp16 and bf16; other dtypes stay on the torch path.
        self.triton = triton and (self.is_bool or t.dtype in _TRITON_FLOATS)
        if self.triton:
            from .triton_codes import triton_pack_nonzero

            self.codes, self.high = triton_pack_nonzero(t)
            return
        if self.is_bool:
            self.high = None
        else:  # the single nonzero value, taken from the data so it is bit-exact
            flat = t.detach().reshape(-1)
            self.high = flat.amax(dim=0, keepdim=True) if flat.numel() else flat.new_zeros(1)
        self.codes = pack_bits(t.detach().reshape(-1) != 0, 1)

    def _code_bytes(self) -> int:
        return _nbytes(self.codes, *([] if self.high is None else [self.high]))

    def _decode(self) -> torch.Tensor:
        if self.is_bool:
            values = torch.tensor([False, True], device=self.codes.device)
        else:
            values = torch.cat([torch.zeros_like(self.high), self.high])
        if self.triton:
            from .triton_codes import triton_unpack_lookup

            return self.geometry.restore(triton_unpack_lookup(self.codes, 1, self.n, values))
        return self.geometry.restore(unpack_lookup(self.codes, 1, self.n, values))


_TRITON_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in tensors)
