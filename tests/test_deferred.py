"""Deferred "does the code hold it" answers: no device sync per tensor, same bytes and values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.engine.deferred import DeferredChecks
from lightning_s2a.engine.packed import PackOptions
from lightning_s2a.engine.quantizers import QUANTIZERS
from tests.conftest import assert_close_in_norm


class _Event:
    """Stands in for a CUDA event: not done until waited for (or marked done)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def _slow_device():
    events: list[_Event] = []

    def record(holds: torch.Tensor):
        events.append(_Event())
        return holds.clone(), events[-1]

    return record, events


def _pack(t: torch.Tensor, defer: bool):
    return QUANTIZERS["norm"](t, PackOptions(bits=4, defer=defer))


def test_a_deferred_pack_gives_the_same_codes_and_keeps_what_codes_cannot_hold():
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    bad = x.clone()
    bad[3, 5] = 1e6  # beyond the fp16 statistics
    for t in (x, bad):
        now, later = _pack(t, defer=False), _pack(t, defer=True)
        assert later.pending is t or torch.equal(later.pending, t)
        assert later.raw is None  # undecided: both the codes and the tensor are alive
        later.resolve(bool(later.holds))
        assert later.pending is None and later.holds is None
        assert (later.raw is None) == (now.raw is None) == (t is x)
        assert later.nbytes == now.nbytes
        assert torch.equal(later.unpack(), now.unpack())
    assert torch.equal(_pack(bad, defer=True).unpack(), bad)  # unpack reads it if need be


def test_derivative_codes_defer_their_finiteness_check_too():
    from lightning_s2a.engine.codebook import fit_codebook
    from lightning_s2a.engine.ops import elementwise_spec

    x = torch.randn(4096)
    spec = elementwise_spec(F.gelu, (x,), {})
    cb = fit_codebook(x, spec.derivative, 4).to(x.device, x.dtype)
    nan = x.clone()
    nan[7] = float("nan")
    for t in (x, nan):
        now = QUANTIZERS["elementwise"](t, PackOptions(bits=4, spec=spec, codebook=cb))
        later = QUANTIZERS["elementwise"](
            t, PackOptions(bits=4, spec=spec, codebook=cb, defer=True)
        )
        assert later.pending is not None
        out_now, out_later = now.unpack(), later.unpack()
        assert torch.equal(out_now.isnan(), out_later.isnan())
        assert torch.equal(out_now.nan_to_num(), out_later.nan_to_num())
        assert later.nbytes == now.nbytes


def test_at_most_lag_answers_stay_open_and_they_are_read_in_order():
    record, events = _slow_device()
    checks = DeferredChecks(lag=2, record=record)
    counted = []
    packs = [_pack(torch.randn(256) * (1 if i != 3 else 1e6), defer=True) for i in range(6)]
    for i, p in enumerate(packs):
        checks.add(p, counted.append)
        assert len(checks) == min(i + 1, 2)
    # the oldest were waited for, in order, once more than two were open
    assert counted == packs[:4]
    assert [e.waited for e in events] == [True] * 4 + [False] * 2
    assert packs[3].raw is not None and all(p.raw is None for p in packs[:3])
    events[4].done = True  # the device got there: read without waiting
    checks.poll()
    assert counted == packs[:5] and not events[4].waited
    checks.flush()
    assert counted == packs and len(checks) == 0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        big = h * 1e6  # min-max cannot hold it: kept as it is
        h = self.norm(h + big.softmax(-1) + big.square() * 1e-12)
        return self.fc2(h).mean(1)


def test_engine_defers_answers_and_counts_every_tensor_by_the_end_of_forward():
    torch.manual_seed(0)
    model = _Net().double()
    x = torch.randn(4, 32, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    config = S2AConfig(modules=["bias"], head="fc2", min_numel=1)

    def run(defer: bool):
        with apply_s2a(model, config) as handle:
            engine = handle.engine
            if defer:
                record, events = _slow_device()
                engine.defer_on = ("cpu",)
                engine.batch_numel = 0  # deferral is for tensors coded alone (see batching)
                engine._deferred = DeferredChecks(lag=1, record=record)
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            assert len(engine._deferred) == 0  # all read when the forward ended
            loss.backward()
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
            if defer:
                assert len(events) >= 3 and all(e.done for e in events)
            return grads, handle.stats()

    grads_now, stats_now = run(defer=False)
    grads_later, stats_later = run(defer=True)
    assert stats_later == stats_now
    generic = stats_now["by_kind"]["generic"]  # big.square() saved big: kept as it is
    assert generic["stored_bytes"] == generic["raw_bytes"] > 0
    assert stats_now["by_kind"]["elementwise"]["stored_bytes"] * 8 <= 65536
    assert_close_in_norm(grads_later, grads_now, 1e-14)


def test_a_deferred_tensor_changed_in_place_after_its_save_is_refused_as_pytorch_does():
    """A deferred answer that the codes do not hold (an infinity) kept the tensor as it was
    when the answer was read: a change in place after the save went into the gradient,
    where plain PyTorch raises autograd's error."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = nn.Linear(64, 128), nn.Linear(128, 3)

        def forward(self, x):
            h = self.a(x).clone()
            h[0, 0] = float("inf")  # the codes cannot hold it: kept
            z = F.gelu(h)  # saves its input
            h.mul_(0.5)  # changed after the save
            return self.head(z.clamp(max=1e3))

    torch.manual_seed(0)
    model, x = Net().double(), torch.randn(32, 64, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # plain PyTorch
    for defer in (False, True):
        with apply_s2a(model, S2AConfig(head="head", min_numel=1)) as handle:
            if defer:
                record, _ = _slow_device()
                handle.engine.defer_on = ("cpu",)
                handle.engine.batch_numel = 0  # tensors coded alone (see batching)
                handle.engine._deferred = DeferredChecks(lag=10**6, record=record)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                model(x).sum().backward()


def test_a_deferred_tensor_kept_is_counted_as_what_it_holds():
    # A small view the codes cannot hold (an inf), saved by three ops: each save keeps its
    # own copy, and the deferred count (the default on CUDA) counted the view once (32 of
    # the 64 KiB held; 2026-12-07). Both paths count what is held now, alike.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 512)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            h = self.fc(x).index_fill(1, torch.tensor([3]), float("inf"))
            a = h[:, :16]  # a small view (1/32) of h, with an inf in every row
            return self.head(torch.nan_to_num(a * a + a * 2 + a.pow(3), posinf=1.0))

    counts = {}
    for defer in (False, True):
        torch.manual_seed(0)
        model = Net()
        with apply_s2a(model, S2AConfig(head="head")) as handle:
            if defer:
                handle.engine.defer_on = ("cpu",)
            model(torch.randn(256, 64))
            counts[defer] = handle.stats()["by_kind"]["generic"]
    assert counts[True] == counts[False]
    # three saves of the 16 KiB view kept as three copies of it, and one more of h's
    # pow: what is held, not the view counted once
    assert counts[True]["stored_bytes"] > counts[True]["raw_bytes"]
