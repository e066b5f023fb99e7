"""Triton min-max kernels against the PyTorch reference, bit for bit.

On CPU the kernels run in Triton's interpreter, which has to be switched on
(``TRITON_INTERPRET=1``) before ``triton`` is imported, so those checks run once in a subprocess
that executes this file as a script and reports JSON. The same check functions run in-process
on CUDA when a GPU is present. All inputs come from seeded generators.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_s2a.engine.minmax import dequantize_minmax, quantize_minmax
from tests.triton_interpret import import_without_triton, run_interpreted

ROOT = Path(__file__).resolve().parents[1]
MODULE = "lightning_s2a.engine.triton_minmax"
BITS = (1, 2, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 63, 64, 1000, 4099)
GROUP_SIZES = (64, 32)
SPECIAL_GROUP_SIZES = (8, 32, 256)
STOCH_GROUPS, STOCH_GROUP_SIZE, STOCH_FRAC = 512, 64, 0.3

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


# --------------------------------------------------------------------------- shared checks


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (floats are compared through an integer view)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


def _zero_sign_free(t: torch.Tensor) -> torch.Tensor:
    """Map -0.0 to 0.0: which signed zero ``amin`` returns is unspecified, even in torch."""
    return torch.where(t == 0, torch.zeros_like(t), t)


def _random_input(n: int, seed: int) -> torch.Tensor:
    """Gaussian values whose magnitude varies along the tensor (so group ranges differ)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g)) + 0.5


def _special_input() -> torch.Tensor:
    """One tensor holding the awkward cases, each in its own 256-aligned block."""
    g = torch.Generator().manual_seed(7)
    blocks = [
        torch.full((256,), 1.25),  # constant groups: scale 0, codes 0
        torch.zeros(256),
        torch.randn(256, generator=g) * 1e5,  # beyond the fp16 range: clamped stats
        torch.randn(256, generator=g) * 1e-6,  # fp16-subnormal scales
        torch.randn(256, generator=g) * 1e-30,  # scale rounds to 0 in fp16
        torch.randint(0, 31, (256,), generator=g).float() / 4,  # exact .5 ties
        torch.rand(256, generator=g) * 131000 - 65500,
    ]
    ties = blocks[5].view(-1, 8)
    ties[:, 0], ties[:, 1] = 0.0, 7.5
    infs = torch.randn(256, generator=g)
    infs[::37], infs[5::41] = float("inf"), float("-inf")
    blocks.append(infs)
    blocks.append(torch.randn(77, generator=g))  # ragged tail
    return torch.cat(blocks)


def _compare(x: torch.Tensor, bits: int, group_size: int, label: str) -> list[str]:
    """Quantize and dequantize ``x`` with both backends; describe every mismatch."""
    from lightning_s2a.engine.triton_minmax import (
        triton_dequantize_minmax,
        triton_quantize_minmax,
    )

    n = x.numel()
    ref = quantize_minmax(x, bits, group_size)
    got = triton_quantize_minmax(x, bits, group_size)
    bad = []
    if not _same_bits(ref[0], got[0]):
        bad.append(f"{label}: packed codes")
    if not _same_bits(_zero_sign_free(ref[1]), _zero_sign_free(got[1])):
        bad.append(f"{label}: offset")
    if not _same_bits(ref[2], got[2]):
        bad.append(f"{label}: scale")
    ref_out = dequantize_minmax(*ref, n, bits, group_size, x.dtype)
    if not _same_bits(ref_out, triton_dequantize_minmax(*ref, n, bits, group_size, x.dtype)):
        bad.append(f"{label}: dequantize")
    return bad


def _nonfinite_input() -> torch.Tensor:
    """NaN, +-inf and beyond-fp16 values among ordinary ones, each case in its own 256 block."""
    g = torch.Generator().manual_seed(8)
    blocks = [torch.randn(256, generator=g) for _ in range(7)]
    blocks[0][3::50] = float("nan")  # a few NaNs
    blocks[1][:] = float("nan")  # all NaN
    blocks[2][::61] = float("inf")
    blocks[3][7::45] = float("-inf")
    blocks[4][::3] = torch.finfo(torch.float32).min  # an additive attention mask
    blocks[5][::77] = 1e5  # finite, beyond the fp16 range
    blocks[6][[0, 200]] = torch.tensor([float("-inf"), float("nan")])
    blocks.append(torch.randn(256, generator=g) * 3e4)  # fits at 2+ bits, not at 1 bit
    blocks.append(1000.3 + 0.01 * torch.randn(256, generator=g))  # fp16 offset off: no fit
    blocks.append(torch.full((256,), 1000.3))  # constant, off fp16's grid: fits
    blocks.append(1000.3 + 30 * torch.randn(256, generator=g))  # spread wide enough: fits
    blocks.append(-1e-9 * torch.rand(256, generator=g))  # minima rounding to -0: one step down
    blocks.append(-1e-6 + 3e-6 * torch.rand(256, generator=g))  # step subnormal at 8 bits
    blocks.append(torch.randn(77, generator=g))  # ragged tail (fits)
    return torch.cat(blocks)


def _compare_fits(x: torch.Tensor, bits: int, group_size: int, label: str) -> list[str]:
    """Per-group ``fits`` flags agree exactly; stats and codes agree on the groups that fit."""
    from lightning_s2a.engine.triton_minmax import triton_quantize_minmax

    ref = quantize_minmax(x, bits, group_size, with_fits=True)
    got = triton_quantize_minmax(x, bits, group_size, with_fits=True)
    plain = triton_quantize_minmax(x, bits, group_size)
    fits = ref[3]
    bad = []
    if fits.dtype != torch.bool or not torch.equal(fits, got[3]):
        bad.append(f"{label}: fits flags")
        return bad
    if bool(fits.all()) or not bool(fits.any()):
        bad.append(f"{label}: test data has no group of each kind")
    per_group = group_size * bits // 8
    codes_ref, codes_got = ref[0].view(-1, per_group), got[0].view(-1, per_group)
    if not _same_bits(codes_ref[fits], codes_got[fits]):
        bad.append(f"{label}: codes of fitting groups")
    if not _same_bits(_zero_sign_free(ref[1][fits]), _zero_sign_free(got[1][fits])):
        bad.append(f"{label}: offset of fitting groups")
    if not _same_bits(ref[2][fits], got[2][fits]):
        bad.append(f"{label}: scale of fitting groups")
    if not all(_same_bits(a, b) for a, b in zip(plain, got[:3], strict=True)):
        bad.append(f"{label}: with_fits changed the codes or stats")
    return bad


def check_against_reference(device: str) -> dict[str, dict[str, Any]]:
    """Run every deterministic comparison on ``device``; returns case counts and failures."""
    results: dict[str, dict[str, Any]] = {}

    cases, bad = 0, []
    for di, dtype in enumerate(DTYPES):
        for bits in BITS:
            for group_size in GROUP_SIZES:
                for n in SIZES:
                    x = _random_input(n, seed=1000 * di + 10 * bits + n).to(device, dtype)
                    bad += _compare(
                        x, bits, group_size, f"{dtype} bits={bits} g={group_size} n={n}"
                    )
                    cases += 1
    results["random"] = {"cases": cases, "failures": bad}

    cases, bad = 0, []
    special = _special_input()
    for dtype in DTYPES:
        x = special.to(device, dtype)
        for bits in BITS:
            for group_size in SPECIAL_GROUP_SIZES:
                bad += _compare(x, bits, group_size, f"special {dtype} bits={bits} g={group_size}")
                cases += 1
        bad += _compare(x[:0], 4, 64, f"empty {dtype}")
        cases += 1
    results["special"] = {"cases": cases, "failures": bad}

    cases, bad = 0, []
    g = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        transposed = torch.randn(40, 70, generator=g).to(device, dtype).t()
        strided = torch.randn(33, 90, generator=g).to(device, dtype)[:, ::3]
        for name, x in (("transposed", transposed), ("strided", strided)):
            assert not x.is_contiguous()
            for bits, group_size in ((4, 64), (2, 32), (8, 64)):
                bad += _compare(x, bits, group_size, f"{name} {dtype} bits={bits} g={group_size}")
                cases += 1
    results["noncontiguous"] = {"cases": cases, "failures": bad}

    cases, bad = 0, []
    nonfinite = _nonfinite_input()
    for dtype in (torch.float32, torch.bfloat16):
        x = nonfinite.to(device, dtype)
        for bits in BITS:
            for group_size in (32, 256):
                bad += _compare_fits(
                    x, bits, group_size, f"fits {dtype} bits={bits} g={group_size}"
                )
                cases += 1
    results["fits"] = {"cases": cases, "failures": bad}
    return results


def stochastic_stats(device: str) -> dict[str, float | bool]:
    """Stochastic rounding statistics on data whose round-to-nearest error is biased.

    Every group spans exactly [0, 15], so with 4 bits offset = 0 and scale = 1, and the other
    values sit at ``k + 0.3``: rounding to nearest always errs by -0.3, while unbiased stochastic
    rounding rounds up 30% of the time and errs by 0 on average.
    """
    from lightning_s2a.engine.triton_minmax import (
        triton_dequantize_minmax,
        triton_quantize_minmax,
    )

    bits, gs = 4, STOCH_GROUP_SIZE
    g = torch.Generator().manual_seed(3)
    grid = torch.randint(0, 15, (STOCH_GROUPS, gs), generator=g).float() + STOCH_FRAC
    grid[:, 0], grid[:, 1] = 0.0, 15.0
    x = grid.reshape(-1).to(device)
    interior = torch.ones_like(grid, dtype=torch.bool)
    interior[:, :2] = False
    interior = interior.reshape(-1).to(device)

    def roundtrip(t: torch.Tensor, stochastic: bool, seed: int = 0) -> torch.Tensor:
        packed, offset, scale = triton_quantize_minmax(t, bits, gs, stochastic, seed)
        return triton_dequantize_minmax(packed, offset, scale, t.numel(), bits, gs, torch.float32)

    _, offset, scale = triton_quantize_minmax(x, bits, gs, True, 123)
    err = (roundtrip(x, True, 123) - x)[interior]
    nearest_err = (roundtrip(x, False) - x)[interior]

    # Random data: every value within one quantization step of the input.
    y = _random_input(8192, seed=5).to(device)
    packed, off_y, scale_y = triton_quantize_minmax(y, bits, gs, True, 9)
    y_hat = triton_dequantize_minmax(packed, off_y, scale_y, y.numel(), bits, gs, torch.float32)
    step = scale_y.float().repeat_interleave(gs)[: y.numel()]
    steps_off = ((y_hat - y).abs() / step).max()

    again = triton_quantize_minmax(x, bits, gs, True, 123)[0]
    other = triton_quantize_minmax(x, bits, gs, True, 124)[0]
    first = triton_quantize_minmax(x, bits, gs, True, 123)[0]
    return {
        "unit_grid": bool((offset == 0).all() and (scale == 1).all()),
        "max_abs_err": err.abs().max().item(),
        "mean_err": err.mean().item(),
        "frac_up": (err > 0).float().mean().item(),
        "nearest_mean_err": nearest_err.mean().item(),
        "random_max_steps": steps_off.item(),
        "same_seed_same": bool(torch.equal(first, again)),
        "other_seed_differs": not torch.equal(first, other),
    }


def _assert_exact(results: dict[str, dict[str, Any]], part: str, expected_cases: int) -> None:
    """A part of :func:`check_against_reference` ran all its cases and found no mismatch."""
    res = results[part]
    assert res["cases"] == expected_cases
    assert not res["failures"], f"{len(res['failures'])} mismatches: {res['failures'][:10]}"


def _assert_stochastic(stats: dict[str, float | bool]) -> None:
    """Stochastic rounding is within one step, unbiased and seeded."""
    assert stats["unit_grid"], "test data no longer gives offset 0 and scale 1"
    # The data really separates the modes: nearest rounding is off by -0.3 every time.
    assert abs(stats["nearest_mean_err"] + STOCH_FRAC) < 1e-6
    assert stats["max_abs_err"] <= 1 - STOCH_FRAC + 1e-6  # codes k or k + 1 only
    # 31744 draws: the standard error of the mean is about 0.0026.
    assert abs(stats["mean_err"]) < 0.015
    assert abs(stats["frac_up"] - STOCH_FRAC) < 0.015
    assert stats["random_max_steps"] <= 1.0 + 1e-5
    assert stats["same_seed_same"]
    assert stats["other_seed_differs"]


N_RANDOM = len(DTYPES) * len(BITS) * len(GROUP_SIZES) * len(SIZES)
N_SPECIAL = len(DTYPES) * (len(BITS) * len(SPECIAL_GROUP_SIZES) + 1)
N_NONCONTIGUOUS = len(DTYPES) * 2 * 3
N_FITS = 2 * len(BITS) * 2


# --------------------------------------------------------------------------- interpreter (CPU)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """Run this file as a script under ``TRITON_INTERPRET=1`` once; return its JSON report."""
    report = run_interpreted(__file__)
    assert report["interpreting"] is True
    assert report["bare_package"] is True, "the script imported Lightning after all"
    return report


@needs_triton
def test_interpreted_random_inputs_bit_identical(interpreted: dict[str, Any]) -> None:
    _assert_exact(interpreted["exact"], "random", N_RANDOM)


@needs_triton
def test_interpreted_special_values_bit_identical(interpreted: dict[str, Any]) -> None:
    _assert_exact(interpreted["exact"], "special", N_SPECIAL)


@needs_triton
def test_interpreted_noncontiguous_bit_identical(interpreted: dict[str, Any]) -> None:
    _assert_exact(interpreted["exact"], "noncontiguous", N_NONCONTIGUOUS)


@needs_triton
def test_interpreted_nonfinite_groups_flagged_like_the_reference(
    interpreted: dict[str, Any],
) -> None:
    _assert_exact(interpreted["exact"], "fits", N_FITS)


@needs_triton
def test_interpreted_stochastic_rounding_unbiased(interpreted: dict[str, Any]) -> None:
    _assert_stochastic(interpreted["stochastic"])


# --------------------------------------------------------------------------- native CUDA


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference() -> None:
    torch.manual_seed(0)
    results = check_against_reference("cuda")
    for part, expected in (
        ("random", N_RANDOM),
        ("special", N_SPECIAL),
        ("noncontiguous", N_NONCONTIGUOUS),
        ("fits", N_FITS),
    ):
        _assert_exact(results, part, expected)
    _assert_stochastic(stochastic_stats("cuda"))


# --------------------------------------------------------------------------- wrapper behaviour


@pytest.mark.parametrize(("bits", "group_size"), [(3, 64), (4, 48), (1, 4), (4, 0), (8, 8192)])
def test_rejects_unsupported_geometry(bits: int, group_size: int) -> None:
    from lightning_s2a.engine.triton_minmax import triton_quantize_minmax

    with pytest.raises(ValueError, match=r"bits|group_size"):
        triton_quantize_minmax(torch.zeros(64), bits, group_size)


@needs_triton
def test_cpu_tensor_without_interpreter_is_a_clear_error() -> None:
    from lightning_s2a.engine import triton_minmax

    if triton_minmax._interpreting():
        pytest.skip("this process runs Triton in interpreter mode")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        triton_minmax.triton_quantize_minmax(torch.zeros(64), 4)


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    (mod,) = import_without_triton(monkeypatch, MODULE)
    assert mod.HAS_TRITON is False
    with pytest.raises(RuntimeError, match="triton"):
        mod.triton_quantize_minmax(torch.zeros(64), 4)
    with pytest.raises(RuntimeError, match="triton"):
        mod.triton_dequantize_minmax(
            torch.zeros(32, dtype=torch.uint8),
            torch.zeros(1, dtype=torch.float16),
            torch.zeros(1, dtype=torch.float16),
            64,
            4,
            64,
            torch.float32,
        )


if __name__ == "__main__":
    # Subprocess entry point for the interpreter tests (TRITON_INTERPRET=1 is set by the fixture).
    from lightning_s2a.engine import triton_minmax

    torch.manual_seed(0)
    report = {
        "interpreting": triton_minmax._interpreting(),
        "bare_package": "lightning" not in sys.modules,
        "exact": check_against_reference("cpu"),
        "stochastic": stochastic_stats("cpu"),
    }
    print(json.dumps(report))
