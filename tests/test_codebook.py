"""Derivative-aware codes: optimal piecewise-constant f', and better than uniform codes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.engine.codebook import SHRINK_SHARE, IntervalGrid, encode, fit_codebook
from lightning_s2a.engine.minmax import dequantize_minmax, quantize_minmax
from lightning_s2a.engine.ops import ELEMENTWISE

GELU_D = ELEMENTWISE["gelu"]("gelu", (), {}).derivative
SILU_D = ELEMENTWISE["silu"]("silu", (), {}).derivative
N = 64 * 2048


def _data(kind, g):
    if kind == "mixture":  # mostly N(0, 1), a few values in the tens
        x = torch.randn(N, generator=g)
        outliers = torch.rand(N, generator=g) < 0.01
        x[outliers] = torch.randn(int(outliers.sum()), generator=g) * 20
        return x
    return torch.randn(N, generator=g) * kind


def _autograd_derivative(fn, x):
    x = x.detach().clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


@pytest.mark.parametrize("deriv,fn", [(GELU_D, F.gelu), (SILU_D, F.silu)], ids=["gelu", "silu"])
def test_closed_form_derivatives_match_autograd(deriv, fn):
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    torch.testing.assert_close(deriv(x), _autograd_derivative(fn, x))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("scale", [0.5, 1, 2, 4, "mixture"])
@pytest.mark.parametrize("name,fn", [("gelu", F.gelu), ("silu", F.silu)])
def test_derivative_codes_beat_uniform_minmax(name, fn, scale, bits):
    g = torch.Generator().manual_seed(0)
    x = _data(scale, g)
    true_d = _autograd_derivative(fn, x)
    # uniform: per-group (64) min-max of x at the same code width
    xq = dequantize_minmax(*quantize_minmax(x, bits), x.numel(), bits, 64, torch.float32)
    mse_uniform = (_autograd_derivative(fn, xq) - true_d).pow(2).mean().item()
    # derivative-aware: fitted on a 16k sample, evaluated on all of x through the real backward
    sample = x[torch.randint(N, (16384,), generator=g)]
    cb = fit_codebook(sample, ELEMENTWISE[name](name, (), {}).derivative, bits)
    boundaries, points, grid = cb.to(x.device, x.dtype)
    x_tilde = points[encode(x, boundaries, grid).long()]
    mse_code = (_autograd_derivative(fn, x_tilde) - true_d).pow(2).mean().item()
    assert mse_code < mse_uniform, (mse_code, mse_uniform)


def test_reconstruction_points_hit_the_optimal_values():
    g = torch.Generator().manual_seed(0)
    cb = fit_codebook(torch.randn(16384, generator=g) * 2, GELU_D, 4)
    assert cb.points.numel() == 16 and cb.boundaries.numel() == 15
    assert torch.all(cb.boundaries[1:] >= cb.boundaries[:-1])
    # f'(x~) equals the bin's optimal (mean) derivative, so autograd computes the approximation
    torch.testing.assert_close(GELU_D(cb.points), cb.values, atol=1e-9, rtol=0)
    # every point lies inside its own interval, so re-encoding it is a fixed point
    inner = encode(cb.points.float(), cb.boundaries.float()).long()
    assert torch.equal(inner, torch.arange(16))


def test_a_fit_solves_its_points_in_a_bounded_number_of_derivative_calls():
    """The points are solved for every interval in the same tensor ops: a 4-bit GELU fit made
    about 2,000 scalar derivative calls (one interval, one bisection step at a time), two
    thirds of a refit's host time at every site; 8 bits, about 30,000."""
    calls = []

    def counted(x):
        calls.append(x.numel())
        return GELU_D(x)

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        calls.clear()
        cb = fit_codebook(torch.randn(16384, generator=g) * 2, counted, bits)
        assert len(calls) <= 64, len(calls)  # samples, grid, 60 bisection steps, the check
        used = torch.isfinite(torch.cat([cb.boundaries, torch.zeros(1, dtype=torch.float64)]))
        torch.testing.assert_close(GELU_D(cb.points)[used], cb.values[used], atol=1e-9, rtol=0)


def test_codebook_is_optimal_against_a_perturbed_split():
    g = torch.Generator().manual_seed(0)
    # One cell per sample: the DP then searches every split, so no boundary move can do better.
    s = torch.randn(2048, generator=g, dtype=torch.float64)
    cb = fit_codebook(s, GELU_D, 2, cells=2048)

    def sse(boundaries):
        idx = torch.bucketize(s, boundaries)
        d = GELU_D(s)
        return sum(((d[idx == i] - d[idx == i].mean()) ** 2).sum() for i in range(4)).item()

    best = sse(cb.boundaries)
    for shift in (-0.05, 0.05):
        for j in range(3):
            moved = cb.boundaries.clone()
            moved[j] += shift
            assert best <= sse(moved.sort().values) + 1e-9


@pytest.mark.parametrize(
    "name,fn",
    [
        ("relu", F.relu),
        ("leaky_relu", lambda x: F.leaky_relu(x, 0.1)),
        ("relu6", F.relu6),
        ("hardtanh", lambda x: F.hardtanh(x, -0.5, 2.0)),
        ("hardsigmoid", F.hardsigmoid),
    ],
)
def test_step_derivatives_have_exact_one_bit_codes(name, fn):
    args = {"leaky_relu": (None, 0.1), "hardtanh": (None, -0.5, 2.0)}.get(name, ())
    spec = ELEMENTWISE[name](name, args, {})
    assert spec.exact
    x = torch.cat([torch.randn(5000) * 4, torch.tensor([0.0, -0.5, 2.0, 6.0, -3.0, 3.0])])
    saved = F.relu(x) if name == "relu" else x  # relu saves its output
    x_tilde = torch.tensor(spec.mask_points)[spec.mask(saved).long()]
    assert torch.equal(_autograd_derivative(fn, x_tilde), _autograd_derivative(fn, x))


def _edge_values(b: torch.Tensor, scale: float, shift: float, g) -> torch.Tensor:
    """Random values over and beyond the boundaries, the boundaries themselves and their float32
    neighbours on both sides, and the extremes."""
    finite = b[torch.isfinite(b)]
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    extremes = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 0.0])
    return torch.cat(
        [
            torch.randn(4096, generator=g) * scale * 2 + shift,
            finite,
            torch.nextafter(finite, up),
            torch.nextafter(finite, down),
            extremes,
        ]
    )


def test_interval_grid_counts_exactly_like_bucketize():
    """The grid's two lookups give bucketize's interval for every value, the boundaries and
    their float32 neighbours included, at scales from 1e-3 to 1e3 and offsets up to 1e4."""
    g = torch.Generator().manual_seed(0)
    built = 0
    for trial in range(200):
        k = int(torch.randint(2, 16, (1,), generator=g))
        scale = 10 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        shift = float(torch.randn(1, generator=g)) * 10 ** float(
            torch.empty(1).uniform_(-2, 4, generator=g)
        )
        b = (torch.randn(k, generator=g).sort().values * scale + shift).float()
        if trial % 3 == 0:  # unused levels of a codebook are trailing infinities
            b = torch.cat([b, torch.full((3,), float("inf"))])
        grid = IntervalGrid.build(b)
        if grid is None:
            continue
        built += 1
        x = _edge_values(b, scale, shift, g)
        expected = torch.bucketize(x, b, out_int32=True).to(torch.uint8)
        assert torch.equal(encode(x, b, grid), expected), trial
    assert built > 100  # most random boundary sets get a grid


def test_interval_grid_declines_uneven_or_too_few_boundaries():
    assert IntervalGrid.build(torch.tensor([0.0, 1.0, 1.0 + 1e-4])) is None  # too close
    assert IntervalGrid.build(torch.tensor([0.0, 0.0, 1.0])) is None  # repeated
    assert IntervalGrid.build(torch.tensor([0.5])) is None  # one boundary: nothing to gain
    assert IntervalGrid.build(torch.tensor([0.0, float("inf"), 1.0])) is None  # not trailing
    grid = IntervalGrid.build(torch.tensor([0.0, 1.0, 3.0]))
    assert grid is not None and grid.cells <= 4096


def test_fitted_codebooks_get_a_grid_and_encode_the_same():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(65536, generator=g) * 3
    for bits in (2, 4):
        device_cb = fit_codebook(x[:16384], GELU_D, bits).to(x.device, x.dtype)
        assert device_cb.grid is not None
        expected = torch.bucketize(x, device_cb.boundaries, out_int32=True).to(torch.uint8)
        assert torch.equal(encode(x, device_cb.boundaries, device_cb.grid), expected)


JUMPS = [
    ("hardswish", F.hardswish, {}, 3.0),
    ("elu", lambda x: F.elu(x, 0.5), {"alpha": 0.5}, 1.0),
    ("selu", F.selu, {}, 1.0),
    ("softplus", lambda x: F.softplus(x, threshold=2.0), {"threshold": 2.0}, 1.0),
]


@pytest.mark.parametrize("name,fn,kwargs,scale", JUMPS, ids=[j[0] for j in JUMPS])
def test_derivatives_with_jumps_match_autograd_at_and_around_them(name, fn, kwargs, scale):
    """At the jump itself too: torch's Hardswish' is 0 at exactly -3 and 1 at exactly 3 (the
    spec said -0.5 and 1.5: 0.1% of a bf16 activation is exactly 3.0); each such element
    decodes to its own side."""
    spec = ELEMENTWISE[name](name, (), kwargs)
    edges = torch.tensor(spec.jumps, dtype=torch.float32)
    x = torch.cat(
        [
            edges,
            edges.nextafter(edges + 1),
            edges.nextafter(edges - 1),
            torch.tensor([3.0, -3.0, 0.0]),
        ]
    )
    torch.testing.assert_close(spec.derivative(x), _autograd_derivative(fn, x), atol=1e-6, rtol=0)
    cb = fit_codebook(
        torch.randn(16384, generator=torch.Generator().manual_seed(0)) * 3,
        spec.derivative,
        4,
        jumps=spec.jumps,
    )
    boundaries, points, grid = cb.to(x.device, x.dtype)
    decoded = _autograd_derivative(fn, points[encode(x, boundaries, grid).long()])
    true_d = _autograd_derivative(fn, x)
    at_jumps = torch.isin(x, edges) | torch.isin(x, torch.tensor([3.0, -3.0]))
    assert (decoded[at_jumps] - true_d[at_jumps]).abs().max() < 0.2, (x, decoded, true_d)


@pytest.mark.parametrize("name,fn,kwargs,scale", JUMPS, ids=[j[0] for j in JUMPS])
def test_derivatives_that_jump_decode_to_their_own_side(name, fn, kwargs, scale):
    """Across a jump of f' (Hardswish at +-3, ELU(0.5) and SELU at 0, Softplus at its
    threshold) bisection closed in on the jump itself: every element above 3 decoded to the
    point 3.0, where Hardswish' is 1.5 instead of 1. Points now carry their interval's value,
    and a boundary lies exactly on each jump inside the data."""
    spec = ELEMENTWISE[name](name, (), kwargs)
    assert spec.jumps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(65536, generator=g, dtype=torch.float64) * scale
    cb = fit_codebook(x[:16384], spec.derivative, 4, jumps=spec.jumps)
    torch.testing.assert_close(spec.derivative(cb.points), cb.values, atol=1e-9, rtol=0)
    for jump in spec.jumps:
        if x.min() < jump < x.max():
            assert jump in cb.boundaries.tolist(), (jump, cb.boundaries)
    boundaries, points, grid = cb.to(x.device, x.dtype)
    x_tilde = points[encode(x, boundaries, grid).long()]
    true_d = _autograd_derivative(fn, x)
    err = (_autograd_derivative(fn, x_tilde) - true_d).norm() / true_d.norm()
    assert err < 0.06, err.item()  # 0.19 to 0.5 with the jump point decoded


def test_a_value_the_derivative_jumps_over_gets_the_closest_point():
    """Hardswish' is about 1.5 just below 3 and 1 above: 1.002 is never reached. The best grid
    point lies just above 3, its neighbour below: bisecting that sign change ended on the
    jump, where the derivative is 1.5 (the helper's case: every element above 3 got 1.5)."""
    from lightning_s2a.engine.codebook import _solve_point

    d = ELEMENTWISE["hardswish"]("hardswish", (), {}).derivative
    point = _solve_point(d, 1.002, 2.99, 5.0)
    err = abs(d(torch.tensor([point], dtype=torch.float64)).item() - 1.002)
    assert err < 0.0021, (point, err)


class _Blocks(nn.Module):
    """Residual blocks at different scales with one nn.GELU shared by all (``shared``), or
    one each: the same model either way."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
        self.act = nn.GELU() if shared else None
        self.acts = nn.ModuleList(nn.GELU() for _ in range(4))
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (fc, scale) in enumerate(zip(self.fc, (0.3, 1.0, 3.0, 8.0), strict=True)):
            h = fc(x) * scale
            x = x + (self.act(h) if self.act is not None else self.acts[i](h))
        return self.head(x)


def test_a_module_called_several_times_in_a_forward_fits_a_codebook_per_call():
    """One nn.GELU shared by blocks whose inputs differ in scale shared one codebook, fitted
    to whichever call came first (gradient cosine 0.982 against 0.99997 with a GELU per
    block, float64). Each call now has its own: the shared model's gradients are the
    separate model's, bit for bit."""

    def grads(shared: bool) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        model = _Blocks(shared).double()
        x = torch.randn(256, 64, dtype=torch.float64)
        y = torch.randint(0, 3, (256,))
        with apply_s2a(model, S2AConfig(head="head")) as handle:
            for _ in range(3):
                model.zero_grad()
                F.cross_entropy(model(x), y).backward()
            flat = [p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None]
            return torch.cat(flat), len(handle.engine.codebooks)

    separate, separate_books = grads(False)
    shared, shared_books = grads(True)
    assert shared_books == separate_books == 4
    assert torch.equal(shared, separate)


class _Unrolled(nn.Module):
    """One nn.GELU applied 40 times in a forward, as a cell unrolled over a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(40):
            x = x + 0.1 * self.act(self.fc(x))
        return self.head(x)


def test_a_module_called_many_times_shares_codebooks_past_a_cap():
    """Every codebook is fitted and refitted: a cell unrolled 64 times made 64 (first steps
    28x slower). Calls past OWN_CODEBOOK_CALLS share the last one."""
    from lightning_s2a.engine.recognition import OWN_CODEBOOK_CALLS

    torch.manual_seed(0)
    model = _Unrolled()
    with apply_s2a(model, S2AConfig(head="head")) as handle:
        model(torch.randn(64, 64)).sum().backward()
        assert len(handle.engine.codebooks) == OWN_CODEBOOK_CALLS == 16


def _tanh_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 4)).double()


def _bias_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return model[0].bias.grad.clone()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).item()


def test_an_outlying_channel_is_no_drift():
    """Evenly spaced checks lined up with the channels of a (16, 64, 64) tensor and read
    one channel only; with that channel's bias at 6 the codes were fitted at every forward
    (40 fits in 40 forwards, against the schedule's 7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 4)).double()
    with torch.no_grad():
        model[0].bias[0] = 6.0
    x = torch.randn(16, 64, 64, dtype=torch.float64)
    fits = set()
    with apply_s2a(model, head="2") as handle:
        for _ in range(20):
            model(x).sum().backward()
            fits |= {cb.fitted_at for cb in handle.engine.codebooks.values()}
    assert fits == {1, 2, 3, 5, 9, 17}  # the schedule's only


def test_a_tensor_that_drifts_out_of_its_codebooks_range_gets_codes_fitted_again():
    """A codebook fitted at scale 0.1 coded a tanh output at scale 3 in its end intervals
    (points inside the old range): bias-gradient cosine 0.86 until the scheduled refit, up
    to 1000 forwards later. Two distributions in turn settle on codes for both."""
    torch.manual_seed(7)
    x = torch.randn(64, 16, dtype=torch.float64)
    with apply_s2a(_tanh_net(), head="2", compress=False) as handle:
        exact = _bias_grad(handle.model, x * 3)
    model = _tanh_net()
    with apply_s2a(model, head="2") as handle:
        for _ in range(40):
            _bias_grad(model, x * 0.1)
        (site,) = handle.engine.codebooks
        fitted = handle.engine.codebooks[site].fitted_at
        assert _cos(_bias_grad(model, x * 3), exact) > 0.998
        assert handle.engine.codebooks[site].fitted_at == handle.engine.step > fitted
        fits = set()
        for i in range(12):  # small and large in turn: one more fit, for both, then none
            _bias_grad(model, x * (0.1 if i % 2 else 3))
            fits.add(handle.engine.codebooks[site].fitted_at)
        assert len(fits) <= 2
        state = handle.engine.state_dict()["codebooks"][0]
        assert state["range"] == [
            handle.engine.codebooks[site].lo,
            handle.engine.codebooks[site].hi,
        ]


def _drift_in(monkeypatch, inward: bool) -> tuple[float, int, set]:
    """Relative error of a GELU net's first bias gradient after 200 forwards at scale 10 and
    one at 0.1; when its codebook was fitted then; its fits over 150 more at 0.1, and the
    fitted range's width after them."""
    from lightning_s2a.engine import codebook

    monkeypatch.setattr(codebook, "SHRINK_SHARE", SHRINK_SHARE if inward else 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3)).double()
    x = torch.randn(4, 64, 64, dtype=torch.float64)
    with apply_s2a(model, head="2", compress=False) as handle:
        exact = _bias_grad(model, x * 0.1)
    with apply_s2a(model, head="2") as handle:
        for _ in range(200):  # scheduled fits at forwards 1, 2, 3, 5, ..., 129
            _bias_grad(model, x * 10)
        (site,) = handle.engine.codebooks
        got = _bias_grad(model, x * 0.1)
        fitted = handle.engine.codebooks[site].fitted_at
        fits = set()
        for _ in range(150):  # small ones on, past SHRINK_EVERY twice
            _bias_grad(model, x * 0.1)
            fits.add(handle.engine.codebooks[site].fitted_at)
        width = handle.engine.codebooks[site].hi - handle.engine.codebooks[site].lo
    return float((got - exact).norm() / exact.norm()), fitted, (fits, width)


def test_a_tensor_that_drifts_inward_gets_codes_fitted_again(monkeypatch):
    """A codebook fitted at scale 10 coded a GELU input at scale 0.1 in a few of its
    intervals until the scheduled refit, up to 1000 forwards later (a reviewer's: 23% off
    against 3% freshly fitted). Drifting inward refits it (at most every SHRINK_EVERY
    forwards), on the new samples alone."""
    stale, stale_fitted, _ = _drift_in(monkeypatch, inward=False)
    error, fitted, (fits, width) = _drift_in(monkeypatch, inward=True)
    assert stale_fitted == 129 and fitted == 201  # refitted at the first small call
    assert error < stale / 2
    # fitted on the new samples alone: the range narrows, and no inward refit follows every
    # 64 forwards (mixed with the old half, it kept the wide range and refitted for good)
    assert fits <= {201, 257} and width < 1.0


def test_points_rounded_to_the_tensors_dtype_stay_on_their_side_of_a_jump():
    """SELU's point 4e-10, just above its jump at 0, became 0 in float16, where its
    derivative is the other branch's (1.758 for 1.0507): a bias gradient 29% off."""
    spec = ELEMENTWISE["selu"]("selu", (), {})
    x = (torch.randn(16384, generator=torch.Generator().manual_seed(0)) * 1e-6).half()
    cb = fit_codebook(x.double(), spec.derivative, 4, jumps=spec.jumps)
    assert (cb.points.half().double() == 0).any()  # rounding puts a point onto the jump
    points = cb.to(torch.device("cpu"), torch.float16).points
    assert torch.allclose(spec.derivative(points.double()), cb.values, rtol=1e-3)


def _gelu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 4)).double()


def test_a_resumed_run_refits_for_drift_as_the_uninterrupted_one():
    """A refit for drift fits on half the codebook's samples and half the new ones; the
    samples were not saved, so a run resumed from a checkpoint refitted on new ones only
    (a reviewer's EfficientNet-B0 resumed mid-training: weights 10% apart after 6 steps)."""
    torch.manual_seed(7)
    x = torch.randn(64, 16, dtype=torch.float64)
    scales = [0.1] * 20 + [3.0, 0.1, 3.0]  # a drift refit at forward 21: old and new samples
    after = [30.0, 3.0, 0.1, 30.0]  # and another on the mixed samples at forward 24
    model = _gelu_net()
    with apply_s2a(model, head="2") as handle:
        for scale in scales:
            _bias_grad(model, x * scale)
        state = copy.deepcopy(handle.engine.state_dict())
        (site,) = handle.engine.codebooks
        assert handle.engine.codebooks[site].fitted_at == 21
        straight = [_bias_grad(model, x * scale) for scale in after]
        assert handle.engine.codebooks[site].fitted_at == 24
        refit = handle.engine.codebooks[site].boundaries
    assert state["codebooks"][0]["sample"].dtype == torch.float64  # a float64 model's
    resumed_model = _gelu_net()
    with apply_s2a(resumed_model, head="2") as resumed:
        resumed.engine.load_state_dict(state)
        again = [_bias_grad(resumed_model, x * scale) for scale in after]
        assert torch.equal(resumed.engine.codebooks[site].boundaries, refit)
    assert all(torch.equal(a, b) for a, b in zip(straight, again, strict=True))


def test_a_codebooks_samples_are_saved_in_float32_where_that_is_exact():
    model = _gelu_net().float()
    with apply_s2a(model, head="2") as handle:
        model(torch.randn(64, 16)).sum().backward()
        (saved,) = handle.engine.state_dict()["codebooks"]
        (cb,) = handle.engine.codebooks.values()
    assert saved["sample"].dtype == torch.float32
    assert torch.equal(saved["sample"].double(), cb.sample)


class _Event:
    """A device event stand-in that counts the waits for it."""

    waits = 0

    def synchronize(self) -> None:
        self.waits += 1


def test_a_drift_answer_from_the_device_is_read_at_the_sites_next_call(monkeypatch):
    """On CUDA the answer is copied behind an event and read at the site's next call (a
    call later, the device is there already): the same call in every run. Read only when
    the device had got there, the refit came a call or more later, or never, by timing."""
    import lightning_s2a.engine.packing as packing

    event = _Event()
    monkeypatch.setattr(packing, "record_answer", lambda flag: (flag, event))
    torch.manual_seed(7)
    x = torch.randn(64, 16, dtype=torch.float64)
    model = _tanh_net()
    with apply_s2a(model, head="2") as handle:
        for _ in range(9):  # fitted at forwards 1, 2, 3, 5 and 9; the next at 17
            _bias_grad(model, x * 0.1)
        (site,) = handle.engine.codebooks
        fitted = handle.engine.codebooks[site].fitted_at
        assert fitted == 9
        event.waits = 0
        _bias_grad(model, x * 3)  # answer open: these codes are the old ones
        assert handle.engine.codebooks[site].fitted_at == fitted and event.waits == 0
        _bias_grad(model, x * 3)  # read (waited for) at the next call: codes fitted again
        assert handle.engine.codebooks[site].fitted_at == handle.engine.step == fitted + 2
        assert event.waits == 1


def test_a_drift_answer_still_open_at_a_checkpoint_is_saved(monkeypatch):
    """On a device the answer is read at the site's next call: a checkpoint taken between
    the two calls must carry it, or the resumed run keeps the old codes where the original
    refits."""
    import lightning_s2a.engine.packing as packing

    monkeypatch.setattr(packing, "record_answer", lambda flag: (flag, _Event()))
    torch.manual_seed(7)
    x = torch.randn(64, 16, dtype=torch.float64)
    model = _tanh_net()
    with apply_s2a(model, head="2") as handle:
        for scale in [0.1] * 9 + [3.0]:  # the answer of the last call is still open
            _bias_grad(model, x * scale)
        state = copy.deepcopy(handle.engine.state_dict())
        straight = _bias_grad(model, x * 3)  # refitted at this call
        assert handle.engine.codebooks[next(iter(handle.engine.codebooks))].fitted_at == 11
    assert len(state["drift_pending"]) == 1
    resumed_model = _tanh_net()
    with apply_s2a(resumed_model, head="2") as resumed:
        resumed.engine.load_state_dict(state)
        assert torch.equal(_bias_grad(resumed_model, x * 3), straight)
        assert next(iter(resumed.engine.codebooks.values())).fitted_at == 11
