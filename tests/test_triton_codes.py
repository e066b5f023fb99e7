"""Triton code kernels (derivative codes, softmax rows, two-level) against the PyTorch reference.

As in ``test_triton_kernels.py``: on CPU the kernels run in Triton's interpreter, switched on
(``TRITON_INTERPRET=1``) before ``triton`` is imported, so the checks run once in a subprocess
that executes this file as a script and reports JSON (:mod:`tests.triton_interpret`); on CUDA
the same checks run in-process.
Floats are compared bit for bit; NaNs only by position (torch itself gives NaNs different bits
in its scalar and vector paths). All inputs come from seeded generators.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from typing import Any

import pytest
import torch

from lightning_s2a.engine.bitpack import pack_bits, unpack_lookup
from lightning_s2a.engine.codebook import encode, fit_codebook
from lightning_s2a.engine.ops import ELEMENTWISE, ElementwiseSpec
from lightning_s2a.engine.packed import PackOptions, RowMaxPacked, TwoLevelPacked
from lightning_s2a.engine.quantizers import QUANTIZERS
from tests.triton_interpret import bare_imports, diff, import_without_triton, run_interpreted

MODULE = "lightning_s2a.engine.triton_codes"
BITS = (1, 2, 4, 8)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 1001)
ROW_SHAPES = ((1, 1), (3, 13), (40, 9))
WIDE_TILE = 64  # forces the two-read path for rows wider than 64 / 8 elements
STOCH_ROWS, STOCH_WIDTH, STOCH_FRAC = 512, 64, 0.3
STORED = ("codes", "scale", "high", "raw")  # what the packed objects keep

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


# --------------------------------------------------------------------------- shared checks


def _randn(shape: tuple[int, ...] | int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))


def _spec(name: str) -> ElementwiseSpec:
    return ELEMENTWISE[name](name, (), {})


def _softmax(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return (_randn(shape, seed) * 3).softmax(dim=-1)


def _check_intervals(x: torch.Tensor, bounds: torch.Tensor, bits: int, label: str) -> list[str]:
    from lightning_s2a.engine import triton_codes as tc

    ref = pack_bits(encode(x, bounds), bits)
    points = _randn(1 << bits, bits).to(x.device, x.dtype)
    return diff(
        label,
        codes=(ref, tc.triton_encode_intervals(x, bounds, bits)),
        lookup=(
            unpack_lookup(ref, bits, x.numel(), points),
            tc.triton_unpack_lookup(ref, bits, x.numel(), points),
        ),
    )


def check_derivative(device: str) -> dict[str, Any]:
    """Interval codes (random and special values, ties on the boundaries) and 0/1 masks."""
    from lightning_s2a.engine import triton_codes as tc

    cases, bad = 0, []
    gen = torch.Generator().manual_seed(4)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6e-8, 65504.0, -7e4, 1e30, -1e30, 0.5])
    for di, dtype in enumerate(DTYPES):
        for bits in BITS:
            for n in SIZES:
                x = _randn(n, 100 * di + 10 * bits + n).to(device, dtype)
                # Some boundaries are elements of x (ties), the last few unused (+inf).
                pick = x.float()[torch.randperm(n, generator=torch.Generator().manual_seed(n))]
                rand = _randn((1 << bits) - 1, n).to(device)
                bounds = torch.cat([pick[: (1 << bits) // 2], rand]).sort().values
                bounds = bounds[: (1 << bits) - 1]
                if bits > 1:
                    bounds[-1] = float("inf")
                bad += _check_intervals(x, bounds, bits, f"{dtype} bits={bits} n={n}")
                cases += 1
                if di == 0:  # ready-made codes: a bool mask, and uint8 codes of every width
                    coin = torch.rand(n, generator=gen) < 0.5
                    mask = (x > 0.2) if bits == 1 else coin.to(device)
                    codes = torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.uint8)
                    codes = codes.to(device)
                    bad += diff(
                        f"bits={bits} n={n}",
                        mask=(pack_bits(mask.to(torch.uint8), 1), tc.triton_pack_codes(mask, 1)),
                        uint8=(pack_bits(codes, bits), tc.triton_pack_codes(codes, bits)),
                    )
            x = torch.cat([special, _randn(7, bits)]).to(device, dtype)
            bounds = x.float().unique()[:: max(1, 17 // ((1 << bits) - 1))][: (1 << bits) - 1]
            bad += _check_intervals(x, bounds, bits, f"special {dtype} bits={bits}")
            cases += 1
    # A fitted codebook, as the engine uses it.
    gelu = _spec("gelu")
    x = _randn(777, 5).to(device)
    for bits in (2, 4):
        assert gelu.derivative is not None
        cb = fit_codebook(x.cpu(), gelu.derivative, bits, cells=64)
        bad += _check_intervals(x, cb.to(x.device, x.dtype)[0], bits, f"gelu codebook {bits}")
        cases += 1
    return {"cases": cases, "failures": bad}


def _check_rows(x: torch.Tensor, bits: int, label: str, tile: int | None = None) -> list[str]:
    from lightning_s2a.engine import triton_codes as tc

    ref = RowMaxPacked(x, PackOptions(bits=bits, dim=-1))
    packed, scale = tc.triton_quantize_rows(x, bits, tile=tile or tc.ROW_TILE)
    out = tc.triton_dequantize_rows(ref.codes, ref.scale, x.shape[1], bits, x.dtype)
    return diff(
        label, codes=(ref.codes, packed), scale=(ref.scale, scale), dequantize=(ref.unpack(), out)
    )


def _special_rows() -> torch.Tensor:
    """One row per awkward case, 21 wide (so rows straddle bytes)."""
    rows = _softmax((12, 21), 9)
    rows[0] = 0.0  # stored max 0
    rows[1] = -rows[1]  # negative max: stored 0
    rows[2, 4] = float("nan")  # stored max NaN, all NaN back
    rows[3, 5] = float("inf")  # stored max inf
    rows[4, ::3] = float("-inf")
    rows[5] *= 1e-6  # fp16-subnormal max
    rows[6] *= 1e-30  # stored max rounds to 0
    rows[7] = torch.arange(21.0) % 8 + 0.5
    rows[7, 0] = 255.0  # max 255: step 1 at 8 bits, so the k + 0.5 values are exact ties
    rows[8] *= 3e9  # beyond fp16: stored max inf
    rows[9] = 1e-3
    rows[10, 1] = 2.0  # one large value, the rest tiny
    rows[11, 2] = float("nan")
    rows[11, 3] = float("inf")
    return rows


def check_rows(device: str) -> dict[str, Any]:
    """Softmax rows: random shapes, both tile paths, and special values."""
    cases, bad = 0, []
    for di, dtype in enumerate(DTYPES):
        for bits in BITS:
            for shape in ROW_SHAPES:
                x = _softmax(shape, 10 * di + bits).to(device, dtype)
                bad += _check_rows(x, bits, f"{dtype} bits={bits} {shape}")
                cases += 1
            x = _special_rows().to(device, dtype)
            bad += _check_rows(x, bits, f"special {dtype} bits={bits}")
            cases += 1
    for bits in BITS:  # rows wider than the tile: the two-read path
        for shape in ((3, 37), (2, 100)):
            x = _softmax(shape, bits).to(device)
            bad += _check_rows(x, bits, f"wide bits={bits} {shape}", WIDE_TILE)
            cases += 1
        x = _special_rows().to(device, torch.bfloat16)
        bad += _check_rows(x, bits, f"wide special bits={bits}", WIDE_TILE)
        cases += 1
    return {"cases": cases, "failures": bad}


def _check_two_level(t: torch.Tensor, label: str) -> list[str]:
    from lightning_s2a.engine import triton_codes as tc

    ref, got = TwoLevelPacked(t), TwoLevelPacked(t, triton=True)
    packed, high = tc.triton_pack_nonzero(t)
    return diff(
        label, codes=(ref.codes, packed), high=(ref.high, high), unpack=(ref.unpack(), got.unpack())
    )


def check_two_level(device: str) -> dict[str, Any]:
    """Dropout noise and masks of odd lengths, special values, empty tensors."""
    cases, bad = 0, []
    special = torch.tensor([0.0, -0.0, 2.5, float("inf"), -1.0, float("nan"), 1e-40, 0.0, 3.0])
    for di, dtype in enumerate(DTYPES):
        for n in (*SIZES, 9001):  # 9001: several programs, partial maxima combined
            g = torch.Generator().manual_seed(10 * di + n)
            keep = torch.rand(n, generator=g) > 0.25
            noise = (keep * (1 / 0.75)).to(device, dtype)
            bad += _check_two_level(noise, f"dropout {dtype} n={n}")
            cases += 1
            if di == 0:
                bad += _check_two_level(keep.to(device), f"bool n={n}")
                cases += 1
        for name, x in (
            ("special", special),
            ("nan late", torch.cat([torch.rand(8000), special])),
            ("zeros", torch.zeros(17)),
            ("negative", -torch.rand(33)),
            ("empty", torch.zeros(0)),
        ):
            bad += _check_two_level(x.to(device, dtype), f"{name} {dtype}")
            cases += 1
    return {"cases": cases, "failures": bad}


def check_quantizers(device: str) -> dict[str, Any]:
    """``QUANTIZERS`` with ``backend="triton"`` store and return what the torch backend does."""
    cases, bad = 0, []
    gelu, relu = _spec("gelu"), _spec("relu")
    assert gelu.derivative is not None
    fitted = {b: fit_codebook(_randn(330, b), gelu.derivative, b, cells=64) for b in (1, 4, 8)}
    for di, dtype in enumerate(DTYPES):
        x = _randn((6, 5, 11), 50 + di).to(device, dtype)
        attn = _softmax((2, 3, 7, 19), 60 + di).to(device, dtype)
        noise = ((_randn(301, di) > 0) * 2.0).to(device, dtype)
        # (kind, tensor, bit widths, options); masks and two-level codes ignore the width.
        calls: list[tuple[str, torch.Tensor, tuple[int, ...], dict[str, Any]]] = [
            ("elementwise", x, (1,), {"spec": relu}),
            ("elementwise", x.transpose(0, 2), (1,), {"spec": relu}),
            ("mask", x > 0, (1,), {}),
            ("dropout", noise, (1,), {}),
            ("softmax", attn, BITS, {"dim": -1}),
            ("softmax", attn, (2,), {"dim": 1}),
            ("softmax", attn.contiguous(memory_format=torch.channels_last), (4,), {"dim": 3}),
        ]
        for bits, cb in fitted.items():
            codebook = cb.to(x.device, x.dtype)
            calls.append(("elementwise", x, (bits,), {"spec": gelu, "codebook": codebook}))
        nonfinite = x.clone()
        nonfinite[0, 0, 0] = float("inf")  # kept as it is, by both backends
        calls.append(("elementwise", nonfinite, (8,), {"spec": gelu, "codebook": codebook}))
        for kind, t, widths, kw in calls:
            for bits in widths:
                label = f"{kind} {dtype} bits={bits} {tuple(t.shape)} {kw.get('dim', '')}"
                ref = QUANTIZERS[kind](t, PackOptions(bits=bits, backend="torch", **kw))
                got = QUANTIZERS[kind](t, PackOptions(bits=bits, backend="triton", **kw))
                fields = {k: (getattr(ref, k, None), getattr(got, k, None)) for k in STORED}
                out = got.unpack()
                bad += diff(label, unpack=(ref.unpack(), out), **fields)
                if out.stride() != ref.unpack().stride():
                    bad.append(f"{label}: strides")
                if got.raw is None and getattr(got, "triton", None) is not True:
                    bad.append(f"{label}: did not use the Triton backend")
                cases += 1
    return {"cases": cases, "failures": bad}


def stochastic_stats(device: str) -> dict[str, float | bool]:
    """Stochastic rounding of softmax rows on data whose nearest rounding errs by -0.3."""
    from lightning_s2a.engine import triton_codes as tc

    bits = 4
    g = torch.Generator().manual_seed(3)
    grid = torch.randint(0, 15, (STOCH_ROWS, STOCH_WIDTH), generator=g).float() + STOCH_FRAC
    grid[:, 0] = 15.0  # row max 15 (stored): step 1 at 4 bits
    x = grid.to(device)

    def roundtrip(stochastic: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scale = tc.triton_quantize_rows(x, bits, stochastic, seed)
        out = tc.triton_dequantize_rows(packed, scale, STOCH_WIDTH, bits, torch.float32)
        return (out - x)[:, 1:].reshape(-1), packed

    err, first = roundtrip(True, 123)
    nearest, _ = roundtrip(False)
    return {
        "unit_scale": bool((tc.triton_quantize_rows(x, bits, True, 1)[1] == 15).all()),
        "max_abs_err": err.abs().max().item(),
        "mean_err": err.mean().item(),
        "frac_up": (err > 0).float().mean().item(),
        "nearest_mean_err": nearest.mean().item(),
        "same_seed_same": bool(torch.equal(first, roundtrip(True, 123)[1])),
        "other_seed_differs": not torch.equal(first, roundtrip(True, 124)[1]),
    }


def run_all(device: str) -> dict[str, Any]:
    return {
        "derivative": check_derivative(device),
        "rows": check_rows(device),
        "two_level": check_two_level(device),
        "quantizers": check_quantizers(device),
    }


N_CASES = {
    "derivative": len(DTYPES) * len(BITS) * (len(SIZES) + 1) + 2,
    "rows": len(DTYPES) * len(BITS) * (len(ROW_SHAPES) + 1) + len(BITS) * 3,
    "two_level": (len(DTYPES) + 1) * (len(SIZES) + 1) + len(DTYPES) * 5,
    "quantizers": len(DTYPES) * (4 + len(BITS) + 2 + 3 + 1),
}


def _assert_exact(results: dict[str, Any], part: str) -> None:
    res = results[part]
    assert res["cases"] == N_CASES[part]
    assert not res["failures"], f"{len(res['failures'])} mismatches: {res['failures'][:10]}"


def _assert_stochastic(stats: dict[str, float | bool]) -> None:
    assert stats["unit_scale"], "test data no longer gives step 1"
    assert abs(stats["nearest_mean_err"] + STOCH_FRAC) < 1e-6  # the data separates the modes
    assert stats["max_abs_err"] <= 1 - STOCH_FRAC + 1e-6  # codes k or k + 1 only
    # 32256 draws: the standard error of the mean is about 0.0026.
    assert abs(stats["mean_err"]) < 0.015
    assert abs(stats["frac_up"] - STOCH_FRAC) < 0.015
    assert stats["same_seed_same"]
    assert stats["other_seed_differs"]


# --------------------------------------------------------------------------- interpreter (CPU)


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """This file's checks, run once as a script under ``TRITON_INTERPRET=1``: the report."""
    report = run_interpreted(__file__)
    assert report["interpreting"] is True
    assert report["bare_imports"] is True, "the script imported Lightning or the hooks after all"
    return report


@needs_triton
@pytest.mark.parametrize("part", list(N_CASES))
def test_interpreted_bit_identical(interpreted: dict[str, Any], part: str) -> None:
    _assert_exact(interpreted["exact"], part)


@needs_triton
def test_interpreted_stochastic_rows_unbiased(interpreted: dict[str, Any]) -> None:
    _assert_stochastic(interpreted["stochastic"])


# --------------------------------------------------------------------------- native CUDA


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference() -> None:
    results = run_all("cuda")
    for part in N_CASES:
        _assert_exact(results, part)
    _assert_stochastic(stochastic_stats("cuda"))


# --------------------------------------------------------------------------- wrapper behaviour

_CALLS = {
    "encode": lambda tc: tc.triton_encode_intervals(torch.zeros(8), torch.zeros(1), 1),
    "pack": lambda tc: tc.triton_pack_codes(torch.zeros(8, dtype=torch.bool), 1),
    "nonzero": lambda tc: tc.triton_pack_nonzero(torch.zeros(8)),
    "lookup": lambda tc: tc.triton_unpack_lookup(
        torch.zeros(1, dtype=torch.uint8), 1, 8, torch.zeros(2)
    ),
    "rows": lambda tc: tc.triton_quantize_rows(torch.zeros(2, 4), 4),
    "unrows": lambda tc: tc.triton_dequantize_rows(
        torch.zeros(4, dtype=torch.uint8), torch.zeros(2, dtype=torch.float16), 4, 4, torch.float32
    ),
}


@needs_triton
@pytest.mark.parametrize("name", list(_CALLS))
def test_cpu_tensor_without_interpreter_is_a_clear_error(name: str) -> None:
    from lightning_s2a.engine import triton_codes

    if triton_codes._interpreting():
        pytest.skip("this process runs Triton in interpreter mode")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        _CALLS[name](triton_codes)


def test_rejects_bad_arguments() -> None:
    from lightning_s2a.engine import triton_codes as tc

    with pytest.raises(ValueError, match="bits"):
        tc.triton_pack_codes(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="tile"):
        tc.triton_quantize_rows(torch.zeros(2, 4), 4, tile=48)


def test_unsupported_two_level_dtype_stays_on_torch() -> None:
    t = torch.tensor([0.0, 2.0, 0.0, 2.0], dtype=torch.float64)
    packed = QUANTIZERS["dropout"](t, PackOptions(bits=1, backend="triton"))
    assert packed.triton is False
    assert torch.equal(packed.unpack(), t)


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernels share triton_minmax's import of Triton, so both are imported afresh.
    _, mod = import_without_triton(monkeypatch, "lightning_s2a.engine.triton_minmax", MODULE)
    assert mod.HAS_TRITON is False
    for call in _CALLS.values():
        with pytest.raises(RuntimeError, match="triton"):
            call(mod)


if __name__ == "__main__":
    # Subprocess entry point for the interpreter tests (TRITON_INTERPRET=1 is set by the fixture).
    from lightning_s2a.engine import triton_codes

    torch.manual_seed(0)
    report = {
        "interpreting": triton_codes._interpreting(),
        "bare_imports": bare_imports(),
        "exact": run_all("cpu"),
        "stochastic": stochastic_stats("cpu"),
    }
    print(json.dumps(report))
