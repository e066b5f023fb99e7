"""Backend choice: "auto" uses Triton on CUDA only where its kernels reproduce the reference."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from lightning_s2a.engine import backend
from tests.triton_interpret import run_interpreted

CUDA = torch.device("cuda", 0)


def test_cpu_tensors_use_pytorch_and_skip_the_probe(monkeypatch):
    def probe(device):
        raise AssertionError("the probe must not run for CPU tensors")

    monkeypatch.setattr(backend, "kernel_mismatches", probe)
    assert backend.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert backend.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert backend.resolve_backend("bnb", CUDA) == "bnb"


@pytest.mark.skipif(not backend.HAS_TRITON, reason="needs the triton package")
def test_auto_uses_triton_on_cuda_when_the_probe_passes(monkeypatch):
    monkeypatch.setattr(backend, "kernel_mismatches", lambda device: ())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_backend("auto", CUDA) == "triton"
        assert backend.resolve_backend("triton", CUDA) == "triton"


@pytest.mark.skipif(not backend.HAS_TRITON, reason="needs the triton package")
def test_a_kernel_that_differs_is_never_used_silently(monkeypatch):
    monkeypatch.setattr(backend, "kernel_mismatches", lambda device: ("softmax torch.float32",))
    with pytest.warns(RuntimeWarning, match=r"do not reproduce .*softmax torch.float32.*PyTorch"):
        assert backend.resolve_backend("auto", CUDA) == "torch"
    with pytest.raises(RuntimeError, match=r"backend='triton'.*softmax torch.float32.*'torch'"):
        backend.resolve_backend("triton", CUDA)


@pytest.mark.skipif(not backend.HAS_TRITON, reason="needs the triton package")
def test_probe_passes_in_the_interpreter_and_catches_a_broken_kernel():
    report = run_interpreted(__file__)
    assert report["kernels"] == []
    assert report["broken"] and all(label.startswith("softmax") for label in report["broken"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_passes_on_this_gpu():
    assert backend.kernel_mismatches(torch.device("cuda", torch.cuda.current_device())) == ()


if __name__ == "__main__":  # run by run_interpreted, under TRITON_INTERPRET=1
    import json

    from lightning_s2a.engine import triton_codes

    cpu = torch.device("cpu")
    kernels = list(backend.kernel_mismatches(cpu))
    dequantize = triton_codes.triton_dequantize_rows

    def off_by_one_ulp(*args, **kwargs):
        out = dequantize(*args, **kwargs)
        return torch.nextafter(out, torch.full_like(out, 2.0))

    triton_codes.triton_dequantize_rows = off_by_one_ulp
    backend.kernel_mismatches.cache_clear()
    broken = list(backend.kernel_mismatches(cpu))
    print(json.dumps({"kernels": kernels, "broken": broken}), file=sys.stdout)
