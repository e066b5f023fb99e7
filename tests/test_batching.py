"""Small saved tensors coded together in one pass (engine/batching.py): each gets the codes
it gets alone, byte for byte; the decisions to keep one as it is stay its own; values are
those at the save; the engine's gradients and bytes are those of coding each alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.engine import batching, minmax
from lightning_s2a.engine.batching import BATCH_NUMEL, PackBatches
from lightning_s2a.engine.minmax import FP16_MAX
from lightning_s2a.engine.ops import ELEMENTWISE
from lightning_s2a.engine.packed import CodePacked, MinMaxPacked, PackOptions
from lightning_s2a.engine.quantizers import pack_elementwise, pack_minmax


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    """Saved tensors of the shapes a small forward has: whole and partial groups, a
    strided slice of a fused qkv, a channels-last map, a single element, a row of 130."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    qkv = r(2, 5, 3, 3, 64).permute(2, 0, 3, 1, 4)
    return [
        r(2, 5, 192),
        qkv[1],  # strided: groups along a contiguous last dimension
        r(2, 3, 130) * 7 + 3,
        r(2, 8, 4, 4).to(memory_format=torch.channels_last),
        r(1),
        r(130).abs() * 1e-3,
        torch.zeros(70, dtype=dtype),
    ]


def _alone(t: torch.Tensor, bits: int, group: int = 64) -> MinMaxPacked:
    return MinMaxPacked(t, PackOptions(bits=bits, group_size=group))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_a_batch_gives_each_tensor_the_codes_it_gets_alone(bits, dtype):
    tensors = _tensors(dtype)
    batches = PackBatches()
    placed = [batches.minmax(t, bits, 64) for t in tensors]
    # zeros could underflow fp16's statistics: coded alone (and kept), as without batching
    assert placed[-1] is None and all(p is not None for p in placed[:-1])
    assert len(batches) == 1 and all(p.done is None for p in placed[:-1])  # none coded yet
    batches.code()
    assert len(batches) == 0
    for t, p in zip(tensors[:-1], placed, strict=False):
        alone, got = _alone(t, bits), p.done
        assert isinstance(got, MinMaxPacked) and alone.raw is None
        assert torch.equal(got.codes, alone.codes)
        assert torch.equal(got.offset, alone.offset) and torch.equal(got.scale, alone.scale)
        assert p.share == p.nbytes == alone.nbytes
        out, want = p.unpack(), alone.unpack()
        assert out.dtype == t.dtype and out.shape == t.shape and out.stride() == want.stride()
        assert torch.equal(out, want)
    assert placed[3].unpack().is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_only_tensors_the_codes_surely_hold_join_a_batch(bits):
    """A tensor the codes might not hold (NaN, infinity, beyond half the fp16 range, small
    enough to underflow fp16's statistics) is coded alone: kept as it is there, refused at
    unpack if changed in place since, counted once if saved twice."""
    g = torch.Generator().manual_seed(1)
    normal = torch.randn(100, generator=g)
    nan, inf, huge = normal.clone(), normal.clone(), normal.clone()
    nan[3], inf[70], huge[99] = math.nan, math.inf, 40000.0
    tiny = normal / normal.abs().max() * 2.0 ** (bits - 17.5)
    batches = PackBatches()
    for t in (nan, inf, -inf, huge, -huge, tiny, torch.zeros(100)):
        assert batches.minmax(t, bits, 64) is None
    edge = normal / normal.abs().max() * 2.0 ** (bits - 17)  # the smallest admitted
    for t in (normal, edge, normal / normal.abs().max() * FP16_MAX / 2):
        p = batches.minmax(t, bits, 64)
        batches.code()
        assert isinstance(p.done, MinMaxPacked) and _alone(t, bits).raw is None


def test_a_tensor_changed_in_place_after_its_save_gives_back_its_values_at_the_save():
    t = torch.randn(3, 128)  # whole groups: no padding copies it
    want = _alone(t, 4).unpack()
    batches = PackBatches()
    p = batches.minmax(t, 4, 64)
    view = batches.minmax(t[1], 4, 64)  # a view of it: copied as saved too
    tail = batches.minmax(t[:, 100:], 4, 64)  # strided, padded: copied by reshape
    saved = t.clone()
    t.mul_(5)  # an in-place op after the save (the batch is still open)
    batches.code()
    assert torch.equal(p.unpack(), want)
    assert torch.equal(view.unpack(), _alone(saved[1], 4).unpack())
    assert torch.equal(tail.unpack(), _alone(saved[:, 100:], 4).unpack())


def test_a_tensor_saved_twice_is_copied_at_each_save():
    """Its values at each save, even where no version counter saw them change (``.data``)."""
    t = torch.randn(200)
    batches = PackBatches()
    first = batches.minmax(t, 4, 64)
    before = t.clone()
    t.data.mul_(3)  # no version bump
    again = batches.minmax(t, 4, 64)
    batches.code()
    assert torch.equal(first.unpack(), _alone(before, 4).unpack())
    assert torch.equal(again.unpack(), _alone(t, 4).unpack())


def test_a_failed_pass_is_said_at_each_read():
    batches = PackBatches()
    p = batches.minmax(torch.randn(100), 4, 64)
    (batch,) = batches._open.values()
    batch._code = lambda slots, data: (_ for _ in ()).throw(MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        batches.code()
    with pytest.raises(RuntimeError, match=r"could not code the batch.*MemoryError"):
        p.unpack()


def test_a_batch_is_coded_before_it_passes_its_capacity():
    tensors = [torch.randn(130) for _ in range(3)]  # 192 elements each, padded
    batches = PackBatches(capacity=400)
    first, second = (batches.minmax(t, 4, 64) for t in tensors[:2])
    assert first.done is None
    third = batches.minmax(tensors[2], 4, 64)
    assert first.done is not None and second.done is not None and third.done is None
    batches.code()
    for t, p in zip(tensors, (first, second, third), strict=True):
        assert torch.equal(p.unpack(), _alone(t, 4).unpack())


def test_reading_a_tensor_codes_its_batch_first():
    t, u = torch.randn(100), torch.randn(50)
    batches = PackBatches()
    p, q = batches.minmax(t, 4, 64), batches.minmax(u, 4, 64)
    assert torch.equal(q.unpack(), _alone(u, 4).unpack())  # read before the forward ends
    assert p.done is not None and len(batches) == 0
    assert torch.equal(p.unpack(), _alone(t, 4).unpack())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masks_in_a_batch_are_the_masks_alone(dtype):
    g = torch.Generator().manual_seed(2)
    relu = ELEMENTWISE["relu"]("relu", (), {})
    hardsigmoid = ELEMENTWISE["hardsigmoid"]("hardsigmoid", (), {})
    cases = [(relu, 5), (relu, 64), (hardsigmoid, 13), (relu, 1), (hardsigmoid, 200)]
    batches = PackBatches()
    placed, alone = [], []
    for spec, n in cases:
        t = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
        opts = PackOptions(bits=4, spec=spec)
        alone.append(pack_elementwise(t, opts))
        placed.append(pack_elementwise(t, PackOptions(bits=4, spec=spec, batches=batches)))
    assert all(p.done is None for p in placed)
    batches.code()
    for a, p in zip(alone, placed, strict=True):
        assert isinstance(p.done, CodePacked) and isinstance(a, CodePacked)
        assert torch.equal(p.done.codes, a.codes) and p.share == a.nbytes == p.nbytes
        assert torch.equal(p.unpack(), a.unpack())


def test_stochastic_rounding_and_other_backends_code_each_tensor_alone():
    t, batches = torch.randn(100), PackBatches()
    opts = PackOptions(bits=4, stochastic=True, batches=batches)
    assert isinstance(pack_minmax(t, opts), MinMaxPacked)
    assert isinstance(pack_minmax(t, PackOptions(bits=4, batches=batches)), batching.Batched)


def _count_calls(monkeypatch, name: str, *modules) -> list[int]:
    """Replace ``name`` in ``modules`` by a wrapper noting the size of each call's first
    argument; returns that list."""
    calls: list[int] = []
    original = getattr(modules[0], name)

    def counted(x, *args, **kwargs):
        calls.append(x.numel())
        return original(x, *args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, name, counted)
    return calls


class _Small(nn.Module):
    """A tiny transformer block and a ReLU MLP: LayerNorm, attention, GELU, ReLU masks."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(48), nn.LayerNorm(48)
        self.qkv, self.proj = nn.Linear(48, 144), nn.Linear(48, 48)
        self.fc1, self.fc2 = nn.Linear(48, 100), nn.Linear(100, 48)
        self.mlp = nn.Sequential(nn.Linear(48, 37), nn.ReLU(), nn.Linear(37, 48), nn.ReLU())
        self.head = nn.Linear(48, 5)
        self.read_inside = None  # an engine: see forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, 2, 24).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        if self.read_inside is not None:  # a gradient inside the forward reads saved tensors
            open_before = len(self.read_inside._batches)
            torch.autograd.grad(x.sum(), self.norm1.bias, retain_graph=True)
            self.open_inside = (open_before, len(self.read_inside._batches))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(self.mlp(x).mean(1))


def _run(batch_numel: int | None, inside: bool = False):
    """Gradients and stats of one S2A step of ``_Small`` in float64, batching as given."""
    torch.manual_seed(0)
    model = _Small().double()
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    with apply_s2a(model, S2AConfig(head="head", min_numel=1)) as handle:
        if batch_numel is not None:
            handle.engine.batch_numel = batch_numel
        if inside:
            model.read_inside = handle.engine
        for _ in range(2):  # the second step with the codebooks fitted
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), torch.tensor([1, 3])).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, handle.stats(), model


def test_the_engine_codes_a_forwards_small_tensors_in_batches_with_the_same_results(
    monkeypatch,
):
    passes = _count_calls(monkeypatch, "minmax_codes", minmax, batching)
    alone_grads, alone_stats, _ = _run(0)
    alone = len(passes)
    passes.clear()
    grads, stats, _ = _run(None)
    assert stats == alone_stats and stats["by_kind"]["fused_attention"]["tensors"] == 4
    assert grads.keys() == alone_grads.keys() and len(grads) > 5
    for name, grad in grads.items():
        assert torch.equal(grad, alone_grads[name]), name
    # Min-max coded per step: the two norms' inputs, attention's q, k, v and its output
    # (the fused backward's); batched, one pass per forward for each group size (the norms'
    # rows of 48 take groups of 16).
    assert alone == 2 * 6 and len(passes) == 2 * 2


def test_a_backward_inside_the_forward_reads_codes_from_the_batch():
    alone_grads, alone_stats, _ = _run(0, inside=True)
    grads, stats, model = _run(None, inside=True)
    assert model.open_inside == (2, 0)  # the reads coded the open batches, mid-forward
    assert stats == alone_stats
    for name, grad in grads.items():
        assert torch.equal(grad, alone_grads[name]), name


def test_a_coded_batch_is_decoded_in_one_pass_and_each_tensor_again_alone(monkeypatch):
    passes = _count_calls(monkeypatch, "dequantize_minmax", batching)
    tensors = _tensors(torch.float32)[:-1]  # (zeros are coded alone)
    batches = PackBatches()
    placed = [batches.minmax(t, 4, 64) for t in tensors]
    batches.code()
    first = [p.unpack() for p in reversed(placed)][::-1]  # backward reads the last first
    assert len(passes) == 1  # one pass for the whole batch
    for t, p, out in zip(tensors, placed, first, strict=True):
        want = _alone(t, 4).unpack()
        assert torch.equal(out, want)
        out.add_(1)  # a backward that writes into what it read changes no later read
        assert torch.equal(p.unpack(), want)  # read again (a second backward): alone
    assert p.decoder is not None and p.decoder.outputs == {}  # nothing left held


def test_masks_of_one_op_are_decoded_in_one_pass(monkeypatch):
    passes = _count_calls(monkeypatch, "unpack_lookup", batching)
    relu = ELEMENTWISE["relu"]("relu", (), {})
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g) for n in (5, 64, 13, 200)]
    batches = PackBatches()
    placed = [pack_elementwise(t, PackOptions(bits=4, spec=relu, batches=batches)) for t in tensors]
    batches.code()
    for t, p in zip(tensors, placed, strict=True):
        assert torch.equal(p.unpack(), pack_elementwise(t, PackOptions(bits=4, spec=relu)).unpack())
    assert len(passes) == 1


class _NanSavedTwice(nn.Module):
    """A tensor with a NaN (kept as it is) saved by a LayerNorm of 48 (groups of 16) and by
    a product (groups of 64), and ``h @ h.t()``: two views of one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.norm, self.l2 = nn.Linear(48, 48), nn.LayerNorm(48), nn.Linear(48, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nan_at_5 = torch.where(torch.arange(48) == 5, math.nan, 1.0).to(x.dtype)
        h = self.l1(x) * nan_at_5
        return self.norm(h).sum() + (h * self.l2(x)).sum() + (h @ h.t()).sum()


class _KeptThenChanged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x) * torch.where(torch.arange(16) == 3, math.nan, 1.0).to(x.dtype)
        y = h * h  # saves h, which no code holds: kept as it is
        h.add_(1)  # changed in place after its save
        return self.l2(y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tensors_no_code_holds_are_kept_counted_and_refused_as_without_batching(dtype):
    def run(batch_numel: int, build: type[nn.Module], width: int):
        torch.manual_seed(0)
        model = build().to(dtype)
        with apply_s2a(model, S2AConfig(head=None, min_numel=1)) as handle:
            handle.engine.batch_numel = batch_numel
            model(torch.randn(4, width, dtype=dtype)).sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            return grads, handle.stats()

    alone_grads, alone_stats = run(0, _NanSavedTwice, 48)
    grads, stats = run(BATCH_NUMEL, _NanSavedTwice, 48)
    assert stats == alone_stats and stats["stored_bytes"] > 0  # once each, as alone
    for got, want in zip(grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for batch_numel in (0, BATCH_NUMEL):
        with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
            run(batch_numel, _KeptThenChanged, 16)


def test_a_coded_batch_keeps_its_codes_not_its_values():
    """What decodes a batch in one pass held the batch's values (a closure over them): a
    full-precision copy of every small tensor stayed alive until backward, uncounted (a
    reviewer's ViT-Ti at batch 1: 10.5 MiB beside 3.3 MiB counted)."""
    import gc

    def alive() -> set[int]:  # float64 tensors of the batch's sizes, by id
        gc.collect()
        sizes = (4032, 3 * 4032)
        return {
            id(o)
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.dtype == torch.float64 and o.numel() in sizes
        }

    before = alive()
    batches = PackBatches()
    placed = [batches.minmax(torch.randn(4001, dtype=torch.float64), 4, 64) for _ in range(3)]
    batches.code()  # each padded to 4032 (63 groups), 12096 together
    assert not alive() - before and all(p.decoder is not None for p in placed)
    assert torch.equal(placed[0].unpack(), placed[0].done.unpack())
