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
from lightning_s2a.engine.batching import PackBatches
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
    assert len(batches) == 1 and all(p.done is None for p in placed)  # nothing coded yet
    batches.code()
    assert len(batches) == 0
    for t, p in zip(tensors, placed, strict=True):
        alone, got = _alone(t, bits), p.done
        if t.count_nonzero() == 0:  # a tensor of zeros is kept as it is, alone as here
            assert alone.raw is not None and torch.equal(p.unpack(), t)
            continue
        assert isinstance(got, MinMaxPacked) and alone.raw is None
        assert torch.equal(got.codes, alone.codes)
        assert torch.equal(got.offset, alone.offset) and torch.equal(got.scale, alone.scale)
        assert p.share == p.nbytes == alone.nbytes
        out, want = p.unpack(), alone.unpack()
        assert out.dtype == t.dtype and out.shape == t.shape and out.stride() == want.stride()
        assert torch.equal(out, want)
    assert placed[3].unpack().is_contiguous(memory_format=torch.channels_last)


def test_each_tensor_is_kept_where_its_own_codes_do_not_hold_it():
    g = torch.Generator().manual_seed(1)
    normal = torch.randn(100, generator=g)
    nan, inf, huge, tiny = normal.clone(), normal.clone(), normal.clone(), normal * 1e-9
    nan[3], inf[70], huge[99] = math.nan, math.inf, 1e6
    tensors = [normal, nan, normal * 2, inf, huge, tiny, normal * 3]
    batches = PackBatches()
    placed = [batches.minmax(t, 4, 64) for t in tensors]
    batches.code()
    for t, p in zip(tensors, placed, strict=True):
        alone = _alone(t, 4)
        if alone.raw is not None:  # NaN, infinity, beyond fp16, underflow: kept exactly
            assert isinstance(p.done, batching._KeptCopy)
            torch.testing.assert_close(p.unpack(), t, rtol=0, atol=0, equal_nan=True)
            assert p.nbytes == t.numel() * 4
        else:  # its neighbours' values change nothing in its codes
            assert torch.equal(p.done.codes, alone.codes)
            assert torch.equal(p.unpack(), alone.unpack())
    kept = [isinstance(p.done, batching._KeptCopy) for p in placed]
    assert kept == [False, True, False, True, True, True, False]


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


def test_a_view_saved_again_shares_one_copy_and_is_counted_as_alone():
    t = torch.randn(200)
    batches = PackBatches()
    first, again = batches.minmax(t, 4, 64), batches.minmax(t, 4, 64)
    (batch,) = batches._open.values()
    assert len(batch.slots) == 1 and len(batch.members) == 2
    kept: list[int] = []
    big = torch.full((200,), 1e6)
    one, two = batches.minmax(big, 4, 64), batches.minmax(big, 4, 64)
    for p in (first, again, one, two):
        p.on_kept = kept.append
    batches.code()
    assert first.done is again.done and torch.equal(again.unpack(), _alone(t, 4).unpack())
    # Kept as it is: counted once, as two saves of one tensor kept alone are.
    assert one.done is two.done and torch.equal(two.unpack(), big)
    assert kept == [200 * 4 - one.share, -two.share]


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
    passes: list[int] = []
    codes = minmax.minmax_codes

    def counted(x, *args, **kwargs):
        passes.append(x.numel())
        return codes(x, *args, **kwargs)

    monkeypatch.setattr(minmax, "minmax_codes", counted)
    monkeypatch.setattr(batching, "minmax_codes", counted)
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
    passes: list[int] = []
    decode = batching.dequantize_minmax

    def counted(packed, *args):
        passes.append(packed.numel())
        return decode(packed, *args)

    monkeypatch.setattr(batching, "dequantize_minmax", counted)
    tensors = _tensors(torch.float32)
    batches = PackBatches()
    placed = [batches.minmax(t, 4, 64) for t in tensors]
    batches.code()
    first = [p.unpack() for p in reversed(placed)][::-1]  # backward reads the last first
    assert len(passes) == 1  # one pass for the whole batch
    for t, p, out in zip(tensors, placed, first, strict=True):
        want = _alone(t, 4).unpack()
        assert torch.equal(out, want)
        if isinstance(p.done, MinMaxPacked):  # (a tensor kept as it is is itself, as alone)
            out.add_(1)  # a backward that writes into what it read changes no later read
        assert torch.equal(p.unpack(), want)  # read again (a second backward): alone
    assert p.decoder is not None and p.decoder.outputs == {}  # nothing left held


def test_masks_of_one_op_are_decoded_in_one_pass(monkeypatch):
    passes: list[int] = []
    lookup = batching.unpack_lookup

    def counted(packed, *args):
        passes.append(packed.numel())
        return lookup(packed, *args)

    monkeypatch.setattr(batching, "unpack_lookup", counted)
    relu = ELEMENTWISE["relu"]("relu", (), {})
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g) for n in (5, 64, 13, 200)]
    batches = PackBatches()
    placed = [pack_elementwise(t, PackOptions(bits=4, spec=relu, batches=batches)) for t in tensors]
    batches.code()
    for t, p in zip(tensors, placed, strict=True):
        assert torch.equal(p.unpack(), pack_elementwise(t, PackOptions(bits=4, spec=relu)).unpack())
    assert len(passes) == 1
