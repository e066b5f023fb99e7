"""Which min-max/code backend packs a tensor, and a check that the Triton kernels are right.

The Triton kernels are tested bit for bit against the PyTorch reference under Triton's CPU
interpreter, which CI can run. A real GPU compiles them differently (approximate division,
subnormal flushing, other reductions), so before the first tensor on each CUDA device the
kernels pack a fixed probe of every kind and must give back the reference's values exactly:

* ``backend="auto"`` uses Triton on CUDA only where that probe passes; otherwise it warns once,
  naming the kinds that differ, and packs with PyTorch (the same codes, just slower);
* ``backend="triton"`` asked for explicitly raises instead, naming the kinds.

The probe runs once per device (a few milliseconds of kernels), never on CPU tensors.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .codebook import fit_codebook
from .ops import elementwise_spec
from .packed import PackOptions
from .quantizers import QUANTIZERS
from .triton_minmax import HAS_TRITON


def _probes(device: torch.device) -> list[tuple[str, str, torch.Tensor, PackOptions]]:
    """``(label, quantizer kind, tensor, options)``: one small tensor per kind of code (and the
    bit widths the defaults use)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 77, 33, generator=g) * 3).to(device)
    gelu = elementwise_spec(torch.nn.functional.gelu, (x,), {})
    relu = elementwise_spec(torch.nn.functional.relu, (x,), {})
    assert gelu is not None and relu is not None and gelu.derivative is not None
    codebook = fit_codebook(x.reshape(-1).cpu(), gelu.derivative, 4)
    probes = []
    for dtype in (torch.float32, torch.bfloat16):
        t = x.to(dtype)
        cb = codebook.to(device, dtype)
        probes += [
            (f"min-max {dtype}", "norm", t, PackOptions(bits=4)),
            (f"min-max 1-bit {dtype}", "norm", t, PackOptions(bits=1, group_size=32)),
            (f"softmax {dtype}", "softmax", t.softmax(-1), PackOptions(bits=4, dim=-1)),
            (f"softmax dim=1 {dtype}", "softmax", t.softmax(1), PackOptions(bits=8, dim=1)),
            (
                f"derivative codes {dtype}",
                "elementwise",
                t,
                PackOptions(bits=4, spec=gelu, codebook=cb),
            ),
            (f"step mask {dtype}", "elementwise", t, PackOptions(bits=1, spec=relu)),
            (f"two-level {dtype}", "dropout", (t > 0).to(dtype) * 2, PackOptions(bits=1)),
        ]
    probes.append(("boolean mask", "mask", x > 0, PackOptions(bits=1)))
    return probes


@functools.cache
def kernel_mismatches(device: torch.device) -> tuple[str, ...]:
    """The probes whose Triton packing on ``device`` does not give the reference's values."""
    bad = []
    for label, kind, t, opts in _probes(device):
        quantize = QUANTIZERS[kind]
        reference = quantize(t, opts).unpack()
        opts.backend = "triton"
        try:
            got = quantize(t, opts).unpack()
        except Exception as err:  # a kernel that fails to compile here counts as a mismatch
            bad.append(f"{label} ({type(err).__name__}: {err})")
            continue
        if not _same_values(got, reference):
            bad.append(label)
    return tuple(bad)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and values, NaNs at the same places."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


@functools.cache
def _warn_once(device: torch.device, bad: tuple[str, ...]) -> None:
    warnings.warn(
        f"S2A: the Triton kernels do not reproduce the PyTorch reference on {device} "
        f"({', '.join(bad)}); backend='auto' packs with PyTorch there instead (same codes, "
        "slower). Please report this with your GPU and Triton version.",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that packs a tensor on ``device``: ``requested``, with "auto" resolved and
    the Triton kernels checked on CUDA devices."""
    cuda = device.type == "cuda"
    if requested == "auto":
        if not (cuda and HAS_TRITON):
            return "torch"
        bad = kernel_mismatches(device)
        if bad:
            _warn_once(device, bad)
            return "torch"
        return "triton"
    if requested == "triton" and cuda:
        bad = kernel_mismatches(device)
        if bad:
            raise RuntimeError(
                f"S2AConfig(backend='triton'): the Triton kernels do not reproduce the PyTorch "
                f"reference on {device} ({', '.join(bad)}). Use backend='torch' (same codes) "
                "or backend='auto', which falls back to it."
            )
    return requested
