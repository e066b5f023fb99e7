"""The saved-tensor engine on small models: recognition, exactness, accounting, safety."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.engine.kept import Kept
from lightning_s2a.engine.recognition import row_widths
from tests.conftest import assert_close_in_norm, cosine


class GELUActivation(nn.Module):
    """Shaped like HF transformers' activation module: calls the functional GELU."""

    def forward(self, x):
        return nn.functional.gelu(x)


class MLP(nn.Module):
    def __init__(self, act: nn.Module | None, width=256, classes=10):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.act = act
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.fc1(x)
        h = self.act(h) if self.act is not None else F.gelu(h)  # bare F.gelu in user code
        return self.head(self.fc2(h).softmax(-1) * 4)

    def get_classifier(self):
        return self.head


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    model(x).square().mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize(
    "act",
    [None, nn.GELU(), GELUActivation(), timm.layers.GELU()],
    ids=["F.gelu", "nn", "hf", "timm"],
)
def test_gelu_is_recognised_however_it_is_called(act):
    model = MLP(act)
    x = torch.randn(32, 64)
    with apply_s2a(model, bits=4) as handle:
        model(x)
        kinds = handle.stats()["by_kind"]
    gelu_bytes = 32 * 256 * 4
    assert kinds["elementwise"]["raw_bytes"] == gelu_bytes
    assert kinds["elementwise"]["stored_bytes"] == gelu_bytes // 8  # 4-bit codes, no side info
    assert kinds["softmax"]["tensors"] == 1
    # the head's input feeds its weight's gradient: kept exact
    assert kinds["trainable"]["stored_bytes"] == kinds["trainable"]["raw_bytes"] == 32 * 256 * 4


class ShrinkNet(nn.Module):
    """Step derivatives beyond the ReLU family: hard/softshrink, PReLU with a frozen slope
    (per channel), RReLU in eval. They got 4-bit min-max codes (input-gradient cosine
    0.92-0.97) instead of exact 1-bit masks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(128, 128) for _ in range(4))
        self.acts = nn.ModuleList(
            [nn.Hardshrink(0.3), nn.Softshrink(0.7), nn.PReLU(128, init=0.1), nn.RReLU()]
        )
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = act(layer(x))
        return self.head(x)

    def get_classifier(self):
        return self.head


def test_shrink_prelu_and_rrelu_masks_give_bit_identical_gradients():
    torch.manual_seed(0)
    model = ShrinkNet().eval()  # RReLU's slope is its mean in eval
    x = torch.randn(64, 128) * 3
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, S2AConfig(bits=4)) as handle:
        assert not model.acts[2].weight.requires_grad  # frozen: its slope needs no values
        approx = _grads(model, x)
        kinds = handle.stats()["by_kind"]
    assert torch.equal(exact, approx)
    elementwise = kinds["elementwise"]  # one bit for each tensor they save
    assert elementwise["tensors"] >= 4
    assert elementwise["stored_bytes"] == elementwise["tensors"] * 64 * 128 // 8


class MaskNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(128, 128) for _ in range(5))
        self.acts = [
            nn.ReLU(),
            nn.ReLU6(),
            nn.LeakyReLU(0.2),
            nn.Hardtanh(-0.5, 0.5),
            nn.Dropout(0.3),
        ]
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = act(layer(x))
        x = F.relu(x, inplace=True)
        return self.head(x)

    def get_classifier(self):
        return self.head


def test_masks_give_bit_identical_gradients():
    model = MaskNet().train()
    x = torch.randn(64, 128) * 3
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, S2AConfig(bits=2)) as handle:
        approx = _grads(model, x)
        kinds = handle.stats()["by_kind"]
    assert torch.equal(exact, approx)
    # ReLU, ReLU6, LeakyReLU, Hardtanh, in-place ReLU: one bit each; dropout noise: one bit
    assert kinds["elementwise"]["stored_bytes"] == 5 * 64 * 128 // 8
    assert kinds["dropout"]["stored_bytes"] == 64 * 128 // 8 + 4


def test_pass_through_modules_get_no_hooks_and_a_raised_dropout_still_counts():
    """nn.Identity and dropouts of p=0 hand their input back and save nothing, so the engine
    hooks them not (half of a timm ViT's modules); a dropout raised after apply_s2a still has
    its mask coded and counted, in its parent's part, with the exact gradient."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(64, 64), nn.Identity(), nn.Dropout(0.0))
            self.live = nn.Dropout(0.2)
            self.head = nn.Linear(64, 4)

        def forward(self, x):
            return self.head(self.live(self.block(x)))

        def get_classifier(self):
            return self.head

    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(32, 64)
    with apply_s2a(model, S2AConfig(bits=4)) as handle:
        hooked = {n for n, m in model.named_modules() if m._forward_pre_hooks}
        assert hooked == {"", "block", "block.0", "live", "head"}
        model.block[2].p = 0.5  # raised after apply_s2a: no hooks of its own
        approx = _grads(model, x)  # (_grads seeds the dropout draws)
        stats = handle.stats()
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    assert torch.equal(exact, approx)
    # both masks, one bit an element, and the 4 bytes of each mask's scale
    assert stats["by_kind"]["dropout"]["stored_bytes"] == 2 * (32 * 64 // 8 + 4)
    assert stats["by_kind"]["dropout"]["tensors"] == 2
    assert stats["by_part"]["backbone"]["tensors"] >= 2


def _independent_saved_bytes(output, params):
    """Bytes autograd keeps, found by walking the graph and reading each node's saved tensors:
    each view's own bytes (what raw counts), and the bytes of the distinct storages they hold
    (what is kept alive)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen, total, stack, visited = set(), 0, [output.grad_fn], set()
    held: dict[int, int] = {}
    left: dict[int, int] = {}  # views of one storage in other shapes: at most its bytes
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        # built-in nodes expose _saved_* attributes; custom Functions expose saved_tensors
        for attr in [a for a in dir(node) if a.startswith("_saved_")] + ["saved_tensors"]:
            try:
                value = getattr(node, attr, None)
            except RuntimeError:
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if not isinstance(t, torch.Tensor) or not t.dim():
                    continue  # a wrapped Python number (x * 2.5): no saved-tensor hook sees it
                ptr = t.untyped_storage().data_ptr()
                key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if ptr in param_storages or key in seen:
                    continue
                seen.add(key)
                held[ptr] = t.untyped_storage().nbytes()
                left.setdefault(ptr, t.untyped_storage().nbytes())
                claimed = min(t.numel() * t.element_size(), left[ptr])
                left[ptr] -= claimed
                total += claimed
        stack.extend(n for n, _ in node.next_functions)
    return total, sum(held.values())


@pytest.mark.parametrize(
    "name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "swin_tiny_patch4_window7_224"]
)
def test_accounting_matches_an_independent_count(name):
    kwargs = {"depths": (1, 1, 1, 1)} if name.startswith("swin") else {}
    model = timm.create_model(name, num_classes=10, **kwargs).train()
    x = torch.randn(2, 3, 224, 224)
    with apply_s2a(model, S2AConfig(compress=False)) as handle:
        out = model(x)
        counted, held = _independent_saved_bytes(out, [*model.parameters(), *model.buffers()])
        stats = handle.stats()
    assert counted > 0
    assert stats["raw_bytes"] == counted
    # compress=False keeps everything: whole storages (ViT's head input x[:, 0] holds every
    # token; counted at its own bytes until 2026-12-07)
    assert stats["stored_bytes"] == held >= counted
    with apply_s2a(model, S2AConfig(bits=4)) as handle:
        model(x)
        assert handle.stats()["raw_bytes"] == counted


def test_a_kept_slice_does_not_keep_its_whole_storage():
    """timm's ViT feeds its head ``x[:, 0]`` of the final norm's output, kept exact for the
    head's gradient: kept as a view it would hold every token; counted, only the slice."""
    from torch.multiprocessing.reductions import StorageWeakRef

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=4, depth=2, img_size=32, patch_size=8
    ).double()
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2])
    refs = []
    model.norm.register_forward_hook(
        lambda m, a, out: refs.append(StorageWeakRef(out.untyped_storage()))
    )
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(bits=4, compress=compress)) as handle:
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            # while autograd holds the graph: the tokens stay alive only uncompressed
            assert refs.pop().expired() == compress
            trainable = handle.stats()["by_kind"]["trainable"]
            loss.backward()
            grads[compress] = model.head.weight.grad.clone()
        if compress:  # the head's input, 2 x 192 float64, kept and counted as such
            assert trainable["stored_bytes"] == 2 * 192 * 8
    assert_close_in_norm(grads[True], grads[False], rel=1e-12)  # the head input stays exact


def test_a_kept_slice_saved_twice_is_copied_once():
    """A slice saved by two ops (one token fed to two heads; an LSTM's per-step gates) was
    copied at each save: the compressed run stored twice what the uncompressed one kept."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 64)
            self.h1, self.h2 = nn.Linear(64, 5), nn.Linear(64, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            token = F.gelu(self.body(x))[:, 0]  # 2 x 64, a view of 2 x 100 x 64
            return self.h1(token) + self.h2(token)

    torch.manual_seed(0)
    model, x = TwoHeads().double(), torch.randn(2, 100, 16, dtype=torch.float64)
    with apply_s2a(model, S2AConfig(head="h1,h2")) as handle:
        model(x).sum().backward()
        trainable = handle.stats()["by_kind"]["trainable"]
    assert trainable["tensors"] == 2  # one copy, counted once
    assert trainable["stored_bytes"] == trainable["raw_bytes"] == 2 * 64 * 8


def test_a_view_and_its_conjugate_get_copies_of_their_own():
    from lightning_s2a.engine.kept import compact

    v = torch.randn(64, 32, dtype=torch.complex64)[:2]  # a small view: copied
    copies: dict = {}
    plain, conj = compact(v, copies), compact(v.conj(), copies)
    assert torch.equal(plain, v) and torch.equal(conj.resolve_conj(), v.conj().resolve_conj())
    assert compact(v, copies) is plain  # the same view again: the same copy


@pytest.mark.parametrize("width", [48, 96])
def test_layer_norm_rows_of_another_width_than_the_group_keep_their_gradient(width):
    """A ViT whose width is no multiple of 64: its class token (timm starts it at 1e-6)
    shared groups with patch tokens, and the backbone's gradient fell to cosine 0.10 (48)
    and 0.89 (96) against the uncompressed run."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=4,
        depth=2,
        img_size=32,
        patch_size=8,
        embed_dim=width,
        num_heads=2,
    ).double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(bits=4, compress=compress)):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads[compress] = torch.cat(
                [
                    p.grad.reshape(-1)
                    for n, p in model.named_parameters()
                    if p.requires_grad and not n.startswith("head")
                ]
            )
    assert cosine(grads[True], grads[False]) > 0.98


class _OffsetNormNet(nn.Module):
    """A LayerNorm whose inputs sit on a large common value with a small spread."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift
        self.a, self.n = nn.Linear(16, 64), nn.LayerNorm(64)
        self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 5)

    def forward(self, x):
        return self.head(F.gelu(self.b(self.n(self.a(x) * 0.01 + self.shift))))

    def get_classifier(self):
        return self.head


@pytest.mark.parametrize("bits", [4, 8])
def test_a_large_common_offset_keeps_the_norms_gradient(bits):
    """fp16 offsets keep 11 bits: at 1000.3 +- 0.01 a group's offset moved by more than its
    span, its values clamped to it, and a bias gradient read cosine 0.017 (55x off), at 4
    and at 8 bits. Such groups now count as not fitting: the tensor is kept exact."""
    torch.manual_seed(0)
    model = _OffsetNormNet(1000.3).double()
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 5, (64,))
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(modules=["bias"], bits=bits, compress=compress)):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads[compress] = model.a.bias.grad.clone()
    assert cosine(grads[True], grads[False]) > 0.99  # 0.998 at 4 bits; 0.017 before


def test_minmax_groups_whose_offset_or_step_fp16_cannot_hold_do_not_fit():
    from lightning_s2a.engine.minmax import dequantize_minmax, quantize_minmax

    g = torch.Generator().manual_seed(0)
    near = 1000.3 + 0.01 * torch.randn(64, generator=g)  # fp16 steps 0.5 apart there
    wide = 1000.3 + 30 * torch.randn(64, generator=g)
    constant = torch.full((64,), 1000.3)
    fits = quantize_minmax(torch.cat([near, wide, constant]), 4, 64, with_fits=True)[3]
    assert fits.tolist() == [False, True, True]
    packed = quantize_minmax(torch.cat([wide, constant]), 4, 64)
    out = dequantize_minmax(*packed, 128, 4, 64, torch.float32)
    span = float(wide.max() - wide.min())
    assert (out[:64] - wide).abs().max() <= span / 15  # within a step (half, plus fp16)
    assert (out[64:] - constant).abs().max() <= 1000.3 * 2**-11
    # a step under fp16's smallest subnormal rounds to 0: the group would decode flat
    tiny = -1e-6 + 3e-6 * torch.rand(64, generator=g)
    assert quantize_minmax(torch.cat([tiny, wide]), 8, 64, with_fits=True)[3].tolist() == [
        False,
        True,
    ]
    assert quantize_minmax(tiny, 4, 64, with_fits=True)[3].tolist() == [True]  # 2e-7: held


class _PlaneNormNet(nn.Module):
    """Two convs, each followed by a norm over 14 x 14 planes (instance or group norm with
    one channel per group), channel scales spread 0.1x to 10x."""

    def __init__(self, norm):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 32, 3, padding=1), norm(32)
        self.c2, self.n2 = nn.Conv2d(32, 32, 3, padding=1), norm(32)
        self.head = nn.Linear(32, 5)
        with torch.no_grad():
            scale = torch.exp(torch.linspace(-2.3, 2.3, 32))[torch.randperm(32)].view(-1, 1, 1, 1)
            self.c1.weight.mul_(scale)
            self.c2.weight.mul_(scale)

    def forward(self, x):
        x = F.gelu(self.n1(self.c1(x)))
        x = F.gelu(self.n2(self.c2(x)))
        return self.head(x.mean((2, 3)))

    def get_classifier(self):
        return self.head


@pytest.mark.parametrize(
    "norm",
    [lambda c: nn.InstanceNorm2d(c, affine=True), lambda c: nn.GroupNorm(c, c)],
    ids=["instance", "group"],
)
def test_norm_planes_of_no_power_of_two_keep_their_gradient(norm):
    """A 14 x 14 plane (196 values) is no multiple of the 64-value group: groups spanned
    planes of channels 100x apart, and the backbone's gradient cosine was 0.50."""
    torch.manual_seed(0)
    model = _PlaneNormNet(norm).double()
    x = torch.randn(4, 3, 14, 14, dtype=torch.float64)
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(bits=4, compress=compress)):
            model.zero_grad()
            model(x).square().sum().backward()
            grads[compress] = torch.cat(
                [
                    p.grad.reshape(-1)
                    for n, p in model.named_parameters()
                    if p.requires_grad and not n.startswith("head")
                ]
            )
    assert cosine(grads[True], grads[False]) > 0.995


class _InPlaceAfterSave(nn.Module):
    """Changes sigmoid's saved output in place: autograd's error without S2A."""

    def __init__(self, n: int, in_place: bool = True) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, 3)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.a(x))
        z = self.b(y)
        y = y.mul_(2.0) if self.in_place else y * 2.0
        return self.head(z + y)


@pytest.mark.parametrize("compress, n", [(False, 64), (True, 16)])
def test_a_kept_tensor_changed_in_place_is_autograds_error(compress, n):
    """With saved-tensor hooks PyTorch checks no versions: a tensor kept as it is (all of them
    with compress=False, small ones otherwise) and then changed gave wrong gradients."""
    torch.manual_seed(0)
    model, x = _InPlaceAfterSave(n).double(), torch.randn(32, n, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()  # plain PyTorch
    with apply_s2a(model, S2AConfig(head="head", compress=compress)):
        out = model(x).sum()
        with pytest.raises(RuntimeError, match=r"modified by an inplace operation.*S2A keeps"):
            out.backward()


def test_a_coded_tensor_changed_in_place_keeps_its_values_from_the_save():
    torch.manual_seed(0)
    model, x = _InPlaceAfterSave(64).double(), torch.randn(32, 64, dtype=torch.float64)
    reference = copy.deepcopy(model)
    reference.in_place = False  # the same function, computed out of place
    for p_name, p in reference.named_parameters():
        p.requires_grad_(p_name.endswith("bias") or p_name.startswith("head"))
    reference(x).square().sum().backward()
    with apply_s2a(model, S2AConfig(head="head")):  # sigmoid's 2048 outputs get codes
        model(x).square().sum().backward()
    assert_close_in_norm(model.a.bias.grad, reference.a.bias.grad, rel=0.05)


class _TorchAttention(nn.Module):
    """torch's own nn.MultiheadAttention (torchvision's ViT uses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(64, 4, batch_first=True), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def test_torch_multihead_attention_is_compressed():
    """Its in_proj_weight (3 x 64 x 64) is an argument of the attention op; it made every
    smaller tensor look like a statistic, kept whole (stored equalled raw)."""
    torch.manual_seed(0)
    model, x = _TorchAttention().double(), torch.randn(2, 16, 64, dtype=torch.float64)
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(head="head", compress=compress)) as handle:
            model.zero_grad()
            model(x).square().sum().backward()
            grads[compress] = model.mha.in_proj_bias.grad.clone()
            # without attention weights it runs SDPA inside: fused attention, 8-bit codes
            attention = handle.stats()["by_kind"]["fused_attention"]
    assert attention["stored_bytes"] * 4 < attention["raw_bytes"]
    assert cosine(grads[True], grads[False]) > 0.99


class _TrainModeBatchNorm(nn.Module):
    """A BatchNorm in training mode on 1x1 planes, after a conv that spreads channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.conv = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 128, 1)
        self.bn, self.head = nn.BatchNorm2d(128), nn.Linear(128, 3)
        with torch.no_grad():
            self.conv.bias.copy_(torch.randn(128) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.bn(self.conv(F.gelu(self.pre(x))))).mean((2, 3)))


def test_batch_norm_inputs_in_training_mode_are_coded_per_channel():
    """Groups in memory order mixed 64 channels of a 1x1 plane: the gradient below the
    BatchNorm (scaled by each channel's inverse std in backward) fell to cosine -0.07."""
    torch.manual_seed(0)
    model, x = _TrainModeBatchNorm().double(), torch.randn(16, 16, 1, 1, dtype=torch.float64)
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(head="head", bn_mode="train", compress=compress)):
            model.zero_grad()
            model(x).square().sum().backward()
            grads[compress] = model.pre.bias.grad.clone()
    assert cosine(grads[True], grads[False]) > 0.99


def test_vit_base_bias_only_stores_at_most_a_fifth():
    # 1/5.4 since fused attention keeps 8 bits (1/7.1 with it at 4: see fused_operands)
    model = timm.create_model("vit_base_patch16_224").train()
    with apply_s2a(model, bits=4) as handle:
        model(torch.randn(2, 3, 224, 224))  # the ratio does not depend on the batch
        stats = handle.stats()
    assert stats["raw_bytes"] > 125 * 2**20  # a real ViT-B/16: 140 MiB per two images
    assert stats["stored_bytes"] * 5 <= stats["raw_bytes"]


def test_parameters_buffers_indices_and_small_tensors_are_never_touched():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.MaxPool2d(2, return_indices=False), nn.Flatten()
    )
    model.add_module("fc", nn.Linear(8 * 15 * 15, 4))
    handle = apply_s2a(model, S2AConfig(head="fc", min_numel=100, bn_mode="train"))
    seen = []
    engine = handle.engine
    real = engine._pack_activation
    engine._pack_activation = lambda t: seen.append(t) or real(t)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    handle.remove()
    storages = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    assert all(t.untyped_storage().data_ptr() not in storages for t in seen)
    kinds = handle.stats()["by_kind"]
    # max-pool keeps integer window offsets, stored as they are; BN's per-channel stats are
    # tiny: exact
    ints = [t for t in seen if not t.is_floating_point() and t.dtype != torch.bool]
    int_bytes = sum(t.numel() * t.element_size() for t in ints)
    assert ints and kinds["generic"]["stored_bytes"] >= int_bytes
    assert kinds["norm"]["tensors"] == 3  # input + save_mean + save_invstd


def test_autocast_weight_copies_are_left_alone_and_grads_match():
    torch.manual_seed(0)
    model = MLP(nn.GELU())
    x = torch.randn(32, 64)
    with apply_s2a(model, S2AConfig(compress=False)), torch.autocast("cpu", dtype=torch.bfloat16):
        exact = _grads(model, x)
    with apply_s2a(model, bits=4) as handle:
        kept = []
        real = handle.engine._pack_activation

        def spy(t):
            out = real(t)
            if isinstance(out, Kept) and out.t is t:  # kept as it is, not even copied
                kept.append(t)
            return out

        handle.engine._pack_activation = spy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = _grads(model, x)
    weight_copies = [
        t
        for t in kept
        if t.dtype == torch.bfloat16 and t.shape in {(256, 64), (64, 256), (256, 256)}
    ]
    assert weight_copies, "frozen weights' bf16 copies reach the hook and must pass unchanged"
    assert cosine(exact, approx) > 0.99


class StdConvNet(nn.Module):
    """Weight-standardized convolutions, as timm's StdConv2d and NF-ResNet's ScaledStdConv2d:
    the weight the conv sees is computed from the parameter in every forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    @staticmethod
    def _std_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        flat = w.reshape(w.shape[0], -1)
        w = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).reshape_as(w)
        return F.conv2d(x, w, conv.bias, padding=1)

    def forward(self, x):
        h = F.relu(self._std_conv(self.conv1, x))
        h = F.relu(self._std_conv(self.conv2, h))
        return self.head(h.mean((2, 3)))

    def get_classifier(self):
        return self.head


def test_weights_computed_in_forward_are_kept_exact():
    """A standardized weight has no grad_fn: it is a constant of the trained graph, not an
    activation. The frozen conv saves it for the input gradient; coding it in 4 bits (as an
    activation) bent NF-ResNet's backbone gradient to cosine 0.993. Here every other saved
    tensor is exact (ReLU masks, the head's input), so the gradients must match exactly."""
    torch.manual_seed(0)
    model = StdConvNet().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, bits=4) as handle:
        approx = _grads(model, x)
        stats = handle.stats()
    assert_close_in_norm(approx, exact, rel=1e-12)
    assert stats["stored_bytes"] < stats["raw_bytes"]  # the ReLU masks are still 1-bit codes


class LossInside(nn.Module):
    """A model that computes its own loss in forward (HF's ``model(x, labels=y).loss``)."""

    def __init__(self, loss: str) -> None:
        super().__init__()
        self.loss = loss
        self.body = nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.LayerNorm(256))
        self.head = nn.Linear(256, 1000)

    def forward(self, x, labels):
        logits = self.head(self.body(x))
        if self.loss == "cross_entropy":
            return F.cross_entropy(logits, labels)
        if self.loss == "bce":
            target = F.one_hot(labels, 1000).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, target)
        return -F.log_softmax(logits, -1).gather(1, labels[:, None]).mean()

    def get_classifier(self):
        return self.head


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "log_softmax"])
def test_a_loss_computed_inside_forward_is_kept_exact(loss):
    # What a loss saves comes after the trainable head; coded in 4 bits it bent an HF ViT's
    # head gradient to cosine 0.94. Kept exact, the head's gradient is the uncompressed one.
    torch.manual_seed(0)
    model = LossInside(loss).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    labels = torch.randint(0, 1000, (8,))

    def head_grad(config):
        with apply_s2a(model, config) as handle:
            model.zero_grad()
            model(x, labels).backward()
            return model.head.weight.grad.clone(), handle.stats()["by_kind"]

    exact, _ = head_grad(S2AConfig(compress=False))
    coded, kinds = head_grad(S2AConfig(bits=4))
    assert torch.equal(coded, exact)
    assert kinds["loss"]["stored_bytes"] == kinds["loss"]["raw_bytes"] >= 8 * 1000 * 8
    assert kinds["elementwise"]["stored_bytes"] < kinds["elementwise"]["raw_bytes"]  # GELU coded
    # op_bits can still ask for codes
    _, kinds = head_grad(S2AConfig(bits=4, op_bits={"loss": 8}))
    assert kinds["loss"]["stored_bytes"] < kinds["loss"]["raw_bytes"]


class HeadForms(nn.Module):
    """A body and a head whose trainable weight reaches its op in another form."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.body = nn.Sequential(nn.Linear(16, 256), nn.GELU())
        self.head = nn.Linear(256, 10)
        if form == "weight_norm":
            self.head = nn.utils.parametrizations.weight_norm(self.head)

    def forward(self, x):
        h, w = self.body(x), self.head.weight
        if self.form == "transposed":
            return h @ w.T + self.head.bias
        if self.form == "scaled":
            return F.linear(h, w * 0.5, self.head.bias)
        if self.form == "cosine":
            return F.linear(F.normalize(h, dim=-1), F.normalize(w, dim=-1)) * 10
        if self.form == "keyword":
            return F.linear(h, weight=F.normalize(w, dim=-1))
        return self.head(h)  # weight_norm: the weight is computed from two parameters

    def get_classifier(self):
        return self.head


@pytest.mark.parametrize("form", ["transposed", "scaled", "cosine", "keyword", "weight_norm"])
def test_a_head_weight_in_another_form_keeps_its_input_exact(form):
    # The head's input feeds the head weight's gradient, and is kept exact; recognised only by
    # the Parameter itself, a view (W.T) or a computed weight (weight norm, cosine classifier)
    # left it to 4-bit codes (head gradient cosine 0.996, 10% relative error).
    torch.manual_seed(0)
    model = HeadForms(form).double()
    x = torch.randn(8, 16, dtype=torch.float64)

    def head_grads(config):
        with apply_s2a(model, config) as handle:
            model.zero_grad()
            model(x).square().sum().backward()
            grads = [p.grad.clone() for p in model.head.parameters() if p.grad is not None]
            return grads, handle.stats()["by_kind"]

    exact, _ = head_grads(S2AConfig(compress=False))
    coded, kinds = head_grads(S2AConfig(bits=4))
    assert len(exact) >= 1 and all(torch.equal(a, b) for a, b in zip(coded, exact, strict=True))
    assert kinds["trainable"]["stored_bytes"] == kinds["trainable"]["raw_bytes"] > 0
    assert kinds["elementwise"]["stored_bytes"] < kinds["elementwise"]["raw_bytes"]


class _ScoresHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(64, 10)  # 640 weights: as many as q at batch 5

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        return self.head(s.softmax(-1).flatten(1))


def test_an_activation_as_large_as_a_trainable_weight_is_still_coded():
    # q (5, 8, 16) has as many elements as the head's weight; it is no weight (nothing
    # trainable within a few autograd steps), so the matmul's operands stay coded.
    torch.manual_seed(0)
    model = _ScoresHead()
    with apply_s2a(model, S2AConfig(head="head", min_numel=1)) as handle:
        model(torch.randn(5, 8, 16)).sum().backward()
        kinds = handle.stats()["by_kind"]
    assert kinds["matmul"]["stored_bytes"] < kinds["matmul"]["raw_bytes"] / 4
    # only the head's input, a view of softmax's output: one storage, counted once
    assert kinds["trainable"]["tensors"] == 1
    assert kinds["softmax"]["raw_bytes"] + kinds["trainable"]["raw_bytes"] == 5 * 64 * 4
    assert kinds["trainable"]["stored_bytes"] == 5 * 64 * 4  # kept as it is


class BiasedAttention(nn.Module):
    """Attention with a learned-position float mask (as TinyViT and Swin-V2 pass one): SDPA's
    math path on CPU then saves the attention probabilities, a tensor shaped like no input."""

    def __init__(self, tokens=49, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.head(self.proj(out.transpose(1, 2).reshape(b, n, c)).mean(1))

    def get_classifier(self):
        return self.head


def test_attention_probabilities_are_compressed_and_statistics_kept():
    torch.manual_seed(0)
    model = BiasedAttention()
    x = torch.randn(4, 49, 32)
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, bits=4) as handle:
        approx = _grads(model, x)
        attention = handle.stats()["by_kind"]["attention"]
    # kept whole as "statistics" before (shaped like no input): stored equalled raw
    assert attention["stored_bytes"] * 4 < attention["raw_bytes"]
    assert cosine(exact, approx) > 0.995


class _ConvBlock(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.act(self.bn(self.conv(x))), 2, ceil_mode=True)


class _CheckpointedConvs(nn.Module):
    """A frozen conv, BatchNorm and max-pool (all rewritten by the surgery) in a checkpoint,
    as timm's set_grad_checkpointing() does on CNNs."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.stem, self.block, self.head = (
            nn.Conv2d(3, 8, 3, padding=1),
            _ConvBlock(),
            nn.Linear(8, 3),
        )
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint(self.block, F.relu(self.stem(x)), use_reentrant=self.reentrant)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_rewritten_ops_match_plain_pytorch(reentrant):
    """Rewrites inside a non-reentrant checkpoint saved other tensors than its recomputation
    (which runs without the engine): CheckpointError. Inside another owner's hooks the
    engine now leaves every op as it is."""
    torch.manual_seed(0)
    model = _CheckpointedConvs(reentrant).double()
    model.block.bn.eval()  # as S2A holds it (bn_mode="eval")
    x = torch.randn(2, 3, 15, 15, dtype=torch.float64, requires_grad=reentrant)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("head"))
    model.zero_grad()
    model(x).square().sum().backward()
    plain = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(head="head", compress=compress)):
            model.zero_grad()
            model(x).square().sum().backward()
            grads[compress] = torch.cat(
                [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]
            )
    assert_close_in_norm(grads[False], plain, rel=1e-12)
    assert cosine(grads[True], plain) > 0.999


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_regions_compose(reentrant):
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = MLP(nn.GELU())
            self.b = nn.Sequential(nn.Linear(10, 64), nn.GELU())

        def forward(self, x):
            h = checkpoint(self.a, x, use_reentrant=reentrant)
            return self.a(self.b(h))

        def get_classifier(self):
            return self.a.head

    model = Blocks()
    x = torch.randn(16, 64, requires_grad=reentrant)
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, bits=4):
        approx = _grads(model, x)
    assert cosine(exact, approx) > 0.999


@pytest.mark.parametrize("how", ["timm", "reentrant", "non-reentrant"])
def test_checkpointed_regions_recompute_from_their_exact_inputs(how):
    # torch.utils.checkpoint saves each region's inputs under the engine's hooks, outside
    # any operator: they were coded as "generic" min-max, and backward recomputed every
    # block from the codes (class-token rows sharing groups: backbone cosine 0.89).
    def grads(checkpointing: bool, compress: bool) -> tuple[torch.Tensor, dict]:
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=4,
            embed_dim=96,
            num_heads=3,
            depth=3,
            num_classes=5,
        ).double()
        if checkpointing and how == "timm":
            model.set_grad_checkpointing(True)
        elif checkpointing:
            model.blocks = _Checkpointed(model.blocks, reentrant=how == "reentrant")
        with apply_s2a(model, S2AConfig(compress=compress)) as handle:
            F.cross_entropy(model(x), y).backward()
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            grad = torch.cat([p.grad.reshape(-1) for n, p in named if not n.startswith("head")])
            return grad, handle.stats()["by_kind"]

    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    exact, _ = grads(False, False)
    with pytest.warns(UserWarning, match="checkpointed region's inputs are kept exact"):
        coded, kinds = grads(True, True)
    assert kinds["checkpoint"]["tensors"] == 3  # one input per block, none coded
    assert kinds["checkpoint"]["stored_bytes"] == kinds["checkpoint"]["raw_bytes"] > 0
    assert "generic" not in kinds
    assert cosine(coded, exact) > 0.9995  # 0.89 with the inputs coded


class _Checkpointed(nn.Module):
    """Runs each block of ``blocks`` through ``torch.utils.checkpoint``."""

    def __init__(self, blocks: nn.Sequential, reentrant: bool) -> None:
        super().__init__()
        self.inner, self.reentrant = blocks, reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.inner:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return x


def test_second_order_gradients_through_derivative_codes_are_an_error():
    # A derivative code's points make f' right, not f'': a gradient penalty through tanh got
    # second-order gradients at cosine 0.73 to plain PyTorch, silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)

    def penalty() -> torch.Tensor:
        (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return gx.square().sum()

    handle = apply_s2a(model, S2AConfig(head="2"))
    with pytest.raises(RuntimeError, match=r"create_graph=True .* derivative code"):
        penalty()
    F.mse_loss(model(x), torch.zeros(32, 1, dtype=torch.float64)).backward()  # first order: fine
    handle.stop_engine()  # the way out the error names
    model.zero_grad()
    penalty().backward()
    around = [_grad_or_zero(p).clone() for p in model.parameters() if p.requires_grad]
    handle.remove()
    for p in model.parameters():
        p.requires_grad_(p is model[0].bias or p is model[2].weight or p is model[2].bias)
    model.zero_grad()
    penalty().backward()
    plain = [_grad_or_zero(p) for p in model.parameters() if p.requires_grad]
    assert len(plain) == 3 and plain[0].abs().sum() > 0
    for a, b in zip(around, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.norm()))


def _grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def test_unpack_twice_returns_the_same_data():
    model = MLP(nn.GELU())
    x = torch.randn(32, 64)
    with apply_s2a(model, bits=4):
        out = model(x).square().mean()
        out.backward(retain_graph=True)
        first = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        out.backward()
        second = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_remove_restores_the_model_exactly():
    model = timm.create_model("resnet18", num_classes=10)
    model.layer1[0].bn1.weight.requires_grad_(False)  # a user's own flag must come back too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    x = torch.randn(2, 3, 64, 64)
    before = model.eval()(x)
    handle = apply_s2a(model)
    assert sum(p.requires_grad for p in model.parameters()) < len(flags)
    model.train()(x).sum().backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    assert all(
        torch.equal(state[k], v)
        for k, v in model.state_dict().items()
        if "running" not in k and "num_batches" not in k
    )
    model.load_state_dict(state)
    assert torch.equal(model.eval()(x), before)
    apply_s2a(model).remove()  # can be applied again after removal


def test_hooks_are_popped_when_forward_raises():
    class Boom(MLP):
        def forward(self, x):
            F.gelu(self.fc1(x))
            raise RuntimeError("boom")

    model = Boom(nn.GELU())
    handle = apply_s2a(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(4, 64))
    assert torch._C._len_torch_function_stack() == 0
    # no pack hook left behind: tensors saved now are plain tensors
    a = torch.randn(2048, requires_grad=True)
    b = F.gelu(a)
    assert isinstance(b.grad_fn._saved_self, torch.Tensor)
    handle.remove()


class _Failing(nn.Module):
    """GELU blocks whose forward raises after the first (``fail``), as an out-of-memory
    error would, or catches an error of its own inside and goes on (``inner``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)
        self.fail = self.inner = False

    def forward(self, x):
        h = F.gelu(self.a(x))
        if self.fail:
            raise RuntimeError("out of memory")
        if self.inner:
            try:
                raise ValueError("handled inside")
            except ValueError:
                h = F.gelu(self.b(h))
        return self.head(F.gelu(self.b(h)))


@pytest.mark.parametrize("retry", ["after", "inside_except", "hook"])
def test_a_forward_that_raised_adds_nothing_to_the_steps_bytes(retry):
    """An out-of-memory retry (the error caught in the training step, the forward run again)
    counted the failed forward's saved tensors in the step's account, although they were
    freed with the exception: the step's bytes read up to twice what backward kept. Retried
    inside the ``except`` block, the retry itself began while an exception was handled; the
    error may also come from a hook on an inner module."""
    torch.manual_seed(0)
    model = _Failing().double()
    handle = apply_s2a(model, S2AConfig(head="head", min_numel=1))
    x = torch.randn(8, 16, dtype=torch.float64)
    grads = []
    for fail in (False, True):
        handle.engine.begin_step()
        model.zero_grad()
        model.fail = fail
        if retry == "hook" and fail:
            model.fail = False

            def boom(*args):
                raise RuntimeError("out of memory")

            hook = model.head.register_forward_hook(boom)
        try:
            out = model(x)
        except RuntimeError:
            if retry == "hook":
                hook.remove()
            model.fail = False
            if retry == "inside_except":
                out = model(x)
        if retry != "inside_except" and fail:
            model.fail = False
            out = model(x)
        out.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        if not fail:
            plain = handle.engine.step_stats()
    assert handle.engine.step_stats() == plain and plain["raw_bytes"] > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # a forward that raised leaves stats() at the last one that returned (it read zeros)
    last = handle.stats()
    model.fail = True
    with pytest.raises(RuntimeError):
        model(x)
    model.fail = False
    assert handle.stats() == last
    # A forward that handles an error of its own and returns counts in full.
    model.inner = True
    model(x).sum().backward()
    assert handle.stats()["raw_bytes"] > plain["raw_bytes"]
    handle.remove()


def test_no_grad_forward_is_not_intercepted_and_keeps_last_stats():
    model = MLP(nn.GELU())
    with apply_s2a(model) as handle:
        model(torch.randn(8, 64))
        stats = handle.stats()
        with torch.no_grad():
            model(torch.randn(3, 64))
        assert handle.stats() == stats


def test_codebooks_are_fitted_per_call_site_and_refreshed():
    model = MLP(nn.GELU())
    fits = []
    with apply_s2a(model, codebook_refresh=3) as handle:
        for _ in range(12):
            model(torch.randn(8, 64))
            books = handle.engine.codebooks
            assert list(books) == [("act", "gelu", 0)]
            fits.append(books[("act", "gelu", 0)].fitted_at)
    # Refitted 1, 1, 2 forwards after the first fit, then every codebook_refresh (3).
    assert sorted(set(fits)) == [1, 2, 3, 5, 8, 11]


def test_a_blank_first_forward_shapes_the_codes_for_one_forward_only():
    """A first forward with autograd on an untypical batch (a shape check on zeros) fitted
    every derivative codebook for the next 1000 forwards: all boundaries at one value, and
    the real batches' gradients bent (a torchvision EfficientNet's backbone cosine 0.59)."""
    torch.manual_seed(0)
    model = MLP(nn.GELU()).double()
    x = torch.randn(64, 64, dtype=torch.float64) * 3
    with apply_s2a(model, S2AConfig(compress=False)):
        _grads(model, x)
        exact = model.fc1.bias.grad.clone()  # reaches fc1 through GELU's codes only
    with apply_s2a(model, bits=4):
        model(torch.zeros(64, 64, dtype=torch.float64)).sum()  # autograd on, never backward
        _grads(model, x)  # the second forward: codes refitted on real data
        refitted = model.fc1.bias.grad.clone()
    # 0.02 here; 0.15 with the codebook of the blank batch
    assert_close_in_norm(refitted, exact, 0.05)


def test_bitsandbytes_backend():
    model = MLP(nn.GELU())
    x = torch.randn(32, 64)
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = _grads(model, x)
    with apply_s2a(model, backend="bnb", bnb_quant_type="fp4") as handle:
        approx = _grads(model, x)
        softmax = handle.stats()["by_kind"]["softmax"]
    assert cosine(exact, approx) > 0.99
    assert softmax["stored_bytes"] < softmax["raw_bytes"] / 6


def test_bitsandbytes_backend_keeps_the_widths_it_cannot_code_and_short_norm_rows():
    """bitsandbytes codes 4 bits in blocks of 32 or more: op_bits (and calibration's 8 bits)
    were coded in 4 bits whatever was asked, and a LayerNorm of width 48 (groups of 16)
    failed inside bitsandbytes. Both take the min-max codes now."""
    tokens = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    stored = {}
    for backend, op_bits in (("bnb", {}), ("bnb", {"norm": 8}), ("torch", {"norm": 8})):
        torch.manual_seed(0)
        model = FrozenEmbedding()
        with apply_s2a(model, backend=backend, op_bits=op_bits, min_numel=1) as handle:
            model(tokens).sum().backward()  # the norm's 48-wide rows: groups of 16
            stored[backend, len(op_bits)] = handle.stats()["by_kind"]["norm"]["stored_bytes"]
    assert stored["bnb", 1] == stored["torch", 1] != stored["bnb", 0]


class FrozenEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 48)
        self.norm = nn.LayerNorm(48)
        self.fc = nn.Linear(48, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, tokens):
        return self.head(self.fc(self.norm(self.embed(tokens))).mean(1))

    def get_classifier(self):
        return self.head


def test_activations_computed_without_autograd_are_still_compressed():
    """A frozen embedding's output has no grad_fn, like a weight computed in forward, but it
    is an activation (no weight has its size): the LayerNorm input is coded in 4 bits."""
    torch.manual_seed(0)
    model = FrozenEmbedding()
    tokens = torch.randint(0, 100, (8, 64))
    with apply_s2a(model, bits=4) as handle:
        model(tokens).sum().backward()
        norm = handle.stats()["by_kind"]["norm"]
    assert norm["stored_bytes"] * 4 < norm["raw_bytes"]


class HandNorm(nn.Module):
    """A layer norm written out, as in ConvNeXt's reference code and HF's ConvNeXt: its
    per-token standard deviation ``(B, L, 1)`` is saved by ``sqrt`` and ``div``."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        v = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(v + 1e-6)) + self.bias


class HandNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.norm = HandNorm(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)).mean(1))

    def get_classifier(self):
        return self.head


def test_per_row_statistics_of_any_op_are_kept_exact():
    """Tokens whose norms differ 100x shared a min-max group of the hand-written norm's
    standard deviation: the small ones' step was wider than their own value (input-gradient
    cosine 0.65 once B * L reached min_numel). Statistics with a size-1 dimension, 16x
    smaller than what the forward saved before them, are kept as they are."""
    torch.manual_seed(0)
    model = HandNormNet().double()
    x = torch.randn(8, 257, 64, dtype=torch.float64)
    x = x * torch.empty(8, 257, 1, dtype=torch.float64).uniform_(-2.3, 2.3).exp()

    def input_grad():
        xg = x.clone().requires_grad_(True)
        model(xg).square().sum().backward()
        return xg.grad

    with apply_s2a(model, S2AConfig(compress=False)):
        exact = input_grad()
    with apply_s2a(model, bits=4):
        coded = input_grad()
    assert cosine(exact.flatten(), coded.flatten()) > 0.998


class _RowNormNet(nn.Module):
    """A hand-written row norm over ``width`` features (RMSNorm as LLaMA and T5 write it,
    a standardization, ``F.normalize``), every third token 1000x smaller (padding)."""

    def __init__(self, width: int, norm: str):
        super().__init__()
        self.a, self.fc = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 5)
        self.norm = norm
        scale = torch.ones(1, 50, 1)
        scale[:, ::3] = 1e-3
        self.register_buffer("scale", scale)

    def forward(self, x):
        h = self.a(x) * self.scale
        if self.norm == "rms":
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.norm == "standardize":
            h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True) + 1e-6)
        else:
            h = F.normalize(h, dim=-1)
        return self.head(F.gelu(self.fc(h)).mean(1))


@pytest.mark.parametrize("width", [96, 100, 48])
@pytest.mark.parametrize("norm", ["rms", "standardize", "normalize"])
def test_a_hand_written_row_norm_over_a_width_off_the_group_keeps_its_rows_apart(norm, width):
    """Its saved input, min-max coded in groups of 64 in memory order, mixed rows of 96:
    a token 1000x smaller than its neighbour took the neighbour's step, and the bias before
    the norm came out 4x to 100x off at 4 bits (nn.RMSNorm on the same data: 0.4%). Tensors
    whose last dimension is one of the model's feature widths are coded along their rows."""
    torch.manual_seed(0)
    model = _RowNormNet(width, norm).double()
    x = torch.randn(4, 50, width, dtype=torch.float64)
    grads = []
    for cfg in (S2AConfig(head="head", compress=False), S2AConfig(head="head", bits=4)):
        with apply_s2a(model, cfg):
            model.zero_grad()
            model(x).square().sum().backward()
            grads.append(model.a.bias.grad.clone())
    exact, coded = grads
    assert (coded - exact).norm() / exact.norm() < 0.03


def test_row_widths_are_the_feature_widths_off_the_group():
    """Linear features, norm sizes and other modules' 1-D parameters; not channels."""
    model = nn.Sequential(
        nn.Conv2d(3, 40, 3), nn.BatchNorm2d(40), nn.GroupNorm(4, 40), nn.Linear(96, 128),
        nn.LayerNorm(100), nn.Linear(128, 192), HandNorm(48),
    )  # fmt: skip
    assert row_widths(model, 64) == {96, 100, 48}
    assert row_widths(model, 32) == {100, 48}
    model.append(nn.Linear(192, 7))  # a 7-class head: its classes are no feature width
    assert row_widths(model, 64, heads=["7"]) == {96, 100, 48}
    assert row_widths(model, 64) == {96, 100, 48, 7}


class _Squeezed(nn.Module):
    """Squeeze-excitation at 7x7 and a ``classes``-way head: ``x * gate`` saves an NCHW map
    whose last dimension, 7, is no feature row."""

    def __init__(self, classes: int):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        h = F.gelu(self.conv(x))
        h = h * torch.sigmoid(self.gate(h.mean((2, 3), keepdim=True)))
        return self.head(h.mean((2, 3)))


def test_a_head_with_as_many_classes_as_a_map_is_wide_costs_its_maps_nothing():
    """A 7-class head made 7 a 'feature width': every (N, C, 7, 7) map saved for min-max
    codes was padded row by row (EfficientNet-B0 stored 3.4% more, MobileNetV3 6.3%)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 7, 7)
    generic = []
    for classes in (7, 10):
        model = _Squeezed(classes)
        with apply_s2a(model, S2AConfig(head="head")) as handle:
            model(x).sum().backward()
            generic.append(handle.stats()["by_kind"]["generic"]["stored_bytes"])
    assert generic[0] == generic[1] > 0


class Gated(nn.Module):
    """Squeeze-excitation as timm and torchvision write it: a gate ``(N, C, 1, 1)``."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        gate = torch.sigmoid(self.reduce(x.mean((2, 3), keepdim=True)))
        return self.head((x * gate).mean((2, 3)))

    def get_classifier(self):
        return self.head


def test_a_gate_broadcast_over_its_feature_map_is_kept_exact():
    """The gate is saved by its sigmoid and by the product with the feature map: kept as it
    is (once: one storage), while the feature map is coded."""
    torch.manual_seed(0)
    model = Gated()
    x = torch.randn(32, 64, 8, 8, requires_grad=True)
    with apply_s2a(model, bits=4) as handle:
        model(x).sum().backward()
        kinds = handle.stats()["by_kind"]
    gate_bytes = 32 * 64 * 4
    assert kinds["elementwise"]["stored_bytes"] == kinds["elementwise"]["raw_bytes"] == gate_bytes
    assert kinds["generic"]["stored_bytes"] * 6 < kinds["generic"]["raw_bytes"]


def test_only_reductions_of_saved_tensors_count_as_statistics():
    """A size-1 dimension is no reduction by itself: a time-major batch of one (L, 1, E) or a
    single-frame clip (N, C, 1, H, W) was kept whole once 16x smaller than the largest."""
    from lightning_s2a.engine.recognition import reduced

    big = torch.Size((8, 257, 64))
    assert reduced(torch.empty(8, 257, 1), 8 * 257 * 64, {big})
    assert reduced(torch.empty(8, 64, 1, 1), 8 * 64 * 196, {torch.Size((8, 64, 14, 14))})
    assert not reduced(torch.empty(512, 1, 64), 512 * 512 * 16, {torch.Size((512, 512))})
    assert not reduced(torch.empty(4, 512, 1, 8, 8), 4 * 64 * 1 * 64 * 64 * 16, {big})
    assert not reduced(torch.empty(8, 257, 1), 8 * 257 * 8, {big})  # not 16x smaller


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 3)).double()


def test_a_forward_the_engine_stays_out_of_is_said_once():
    """Under save_on_cpu (other saved-tensor hooks) the engine stays out: nothing compressed,
    nothing counted, and stats() still shows the last forward it took. Said once, not
    silently; torch.func.grad runs (its wrapped parameters have no storage to read: it
    failed with "Cannot access storage of TensorWrapper", also with compress=False), with
    PyTorch's own gradients."""
    import warnings

    model = _mlp()
    x = torch.randn(32, 16, dtype=torch.float64)
    with apply_s2a(model, head=None) as handle:
        model(x).sum().backward()
        before = handle.stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with torch.autograd.graph.save_on_cpu():
                    model(torch.cat([x, x])).sum().backward()
        said = [w for w in caught if "S2A stays out" in str(w.message)]
        assert len(said) == 1 and handle.stats() == before and handle.engine.forwards == 1

        params = {n: p.detach() for n, p in model.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(
                params
            )
    model.zero_grad()
    model(x).sum().backward()
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())


def test_calibrate_true_without_anything_calibrating_is_said_once():
    import warnings

    model = _mlp()
    x = torch.randn(32, 16, dtype=torch.float64)
    with apply_s2a(model, head=None, calibrate=True) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                model(x).sum().backward()
        said = [w for w in caught if "calibrate=True) is not carried out" in str(w.message)]
        assert len(said) == 1 and not handle.engine.calibrated
    with apply_s2a(model, head=None, calibrate=True) as handle:
        handle.calibrate(lambda: model(x).sum())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).sum().backward()
        assert handle.engine.calibrated and not any("calibrate" in str(w.message) for w in caught)


class _GraphNet(nn.Module):
    """A graph network's layer: a sparse adjacency times GELU features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(16, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sparse.mm(adjacency, F.gelu(self.a(x))))


def test_a_saved_sparse_tensor_is_kept_and_counted_by_its_parts():
    """torch.sparse.mm saves its sparse operand: the engine read its storage and failed
    ("Cannot access storage of SparseTensorImpl")."""
    torch.manual_seed(0)
    n = 50
    index = torch.randint(0, n, (2, 200))
    adjacency = torch.sparse_coo_tensor(index, torch.rand(200, dtype=torch.float64), (n, n))
    adjacency = adjacency.coalesce()
    model, x = _GraphNet().double(), torch.randn(n, 16, dtype=torch.float64)
    grads = []
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(compress=compress, head="head", min_numel=1)) as handle:
            model.zero_grad(set_to_none=True)
            model(x, adjacency).square().sum().backward()
            grads.append(model.a.bias.grad.clone())
            stats = handle.stats()
    assert cosine(grads[1], grads[0]) > 0.999
    # kept as it is, counted by its indices (int64) and values (float64), exactly
    sparse = adjacency._indices().numel() * 8 + adjacency._values().numel() * 8
    assert stats["by_kind"]["generic"] == {
        "raw_bytes": sparse,
        "stored_bytes": sparse,
        "tensors": 1,
    }


def test_codes_work_under_a_float64_default_dtype():
    """torch.set_default_dtype(torch.float64) made every derivative code fail
    (index_select: the interval grid's last boundary took the default dtype)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 3))
    x = torch.randn(32, 16)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with apply_s2a(model, S2AConfig(head="2", min_numel=1)) as handle:
            model(x).square().sum().backward()
            assert handle.stats()["by_kind"]["elementwise"]["stored_bytes"] > 0
    finally:
        torch.set_default_dtype(before)


class _Expanded(nn.Module):
    """GELU of a per-sample mean, broadcast over the tokens before (or after) the op."""

    def __init__(self, expand_first: bool) -> None:
        super().__init__()
        self.expand_first = expand_first
        self.a, self.head = nn.Linear(16, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        m = h.mean(1, keepdim=True)
        g = F.gelu(m.expand_as(h)) if self.expand_first else F.gelu(m).expand_as(h)
        return self.head((g + h).mean(1))


def test_an_expanded_view_is_packed_as_the_tensor_it_repeats():
    """GELU of an expanded view saves the view: it was coded at its logical size (more than
    the tensor itself: 25 KB for 16 KB), and a weight's autocast copy broadcast by matmul
    (MultiheadAttention, batch_first) was coded as an activation, not kept as a weight."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, 16, dtype=torch.float64)
    stats, grads = {}, {}
    for expand_first in (True, False):
        torch.manual_seed(1)
        model = _Expanded(expand_first).double()
        with apply_s2a(model, S2AConfig(head="head", min_numel=1)) as handle:
            model(x).square().sum().backward()
            stats[expand_first] = handle.stats()["by_kind"]["elementwise"]
            grads[expand_first] = model.a.bias.grad.clone()
    # the same bytes as GELU of the tensor itself, and the same codes: the same gradient
    # (summed over the tokens in another order)
    assert stats[True] == stats[False]
    assert_close_in_norm(grads[True], grads[False], 1e-12)

    torch.manual_seed(0)
    attention = nn.MultiheadAttention(64, 4, batch_first=True)
    tokens = torch.randn(4, 20, 64)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = attention, nn.Linear(64, 3)

        def forward(self, t):
            return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))

    net = Net()
    with apply_s2a(net, S2AConfig(head="head")) as handle:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(tokens).float().square().sum().backward()
        kinds = handle.stats()["by_kind"]
    assert all(k["stored_bytes"] <= k["raw_bytes"] for k in kinds.values()), kinds


def test_views_of_one_storage_in_other_shapes_count_its_bytes_once():
    """Swin's attention is saved 4-D by softmax and 3-D by the next matmul: one allocation
    in an uncompressed run, counted twice (raw bytes 4.7% high on Swin-T, in S2A's favour)."""

    class TwoViews(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.v, self.head = nn.Linear(16, 8), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):  # x: (4, 16, 16)
            a = self.q(x).view(4, 2, 8, 8).softmax(-1)  # saved 4-D by softmax
            out = a.view(8, 8, 8) @ self.v(x).view(8, 8, 16)  # and 3-D by the matmul
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = TwoViews()
    with apply_s2a(model, S2AConfig(head="head", compress=False, min_numel=1)) as handle:
        model(torch.randn(4, 16, 16)).sum().backward()
        stats = handle.stats()
    softmax, matmul = stats["by_kind"]["softmax"], stats["by_kind"]["matmul"]
    assert softmax["raw_bytes"] == softmax["stored_bytes"] == 4 * 2 * 8 * 8 * 4
    # the matmul's other operand (v) is its own; the attention's 3-D view adds nothing
    assert matmul["tensors"] == 2
    assert matmul["raw_bytes"] == matmul["stored_bytes"] == 8 * 8 * 16 * 4


class _OutsideScaled(nn.Module):
    def __init__(self, scale: nn.Parameter) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(16, 64), nn.Linear(64, 3)
        self.scales = [scale]  # not registered: from outside the model

    def forward(self, x):
        return self.head(F.gelu(self.a(x)) * self.scales[0])


def test_a_model_that_met_an_outside_parameter_still_copies_and_pickles():
    """Parameters from outside the model seen in calls are noted weakly (a freed one's
    address may become a new parameter of the model's, which must still be checked): the
    note is no state of the model's, so copies and pickles start without it."""
    import io

    outside = nn.Parameter(torch.ones(64))
    torch.manual_seed(0)
    model = _OutsideScaled(outside)
    handle = apply_s2a(model, S2AConfig(head="head"))
    model(torch.randn(8, 16)).sum().backward()
    assert outside in handle.engine._outside_ids
    copied = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    copied(torch.randn(8, 16)).sum().backward()
    # held weakly: once freed it is no longer noted (its address may be a new parameter's,
    # one of the model's that must be checked; the set of ids also grew without bound)
    import gc

    model.scales.clear(), copied.scales.clear()
    del outside
    gc.collect()
    assert len(handle.engine._outside_ids) == 0
    handle.remove()


class _TextMatched(nn.Module):
    """Frozen class embeddings from outside the model, passed to forward (CLIP-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, 96)

    def forward(self, x, text):
        return self.head(self.fc2(F.relu(self.fc1(x)))) @ text.t()  # matmul saves text.t()

    def get_classifier(self):
        return self.head


def test_a_parameter_from_outside_the_model_is_kept_not_coded():
    """A frozen parameter handed to the forward was coded in 4 bits as if it were an
    activation (its gradient through the head relerr 0.08) and counted as 153,600 raw
    bytes of a 24,576-byte forward; it is alive anyway, so it is kept and not counted."""
    torch.manual_seed(0)
    text = nn.Parameter(torch.randn(200, 96, dtype=torch.float64), requires_grad=False)
    x, y = torch.randn(16, 64, dtype=torch.float64), torch.arange(16)
    grads, stats = {}, {}
    for compress in (None, False, True):
        torch.manual_seed(1)
        model = _TextMatched().double()
        handle = apply_s2a(model, S2AConfig(compress=bool(compress)))
        if compress is None:
            handle.remove()  # the same trainable set, plain PyTorch
            for name, p in model.named_parameters():
                p.requires_grad_(name.endswith("bias") or name.startswith("head"))
        F.cross_entropy(model(x, text), y).backward()
        grads[compress] = torch.cat(
            [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
        )
        if compress is not None:
            stats[compress] = handle.stats()
    # the ReLU mask is exact and the head's input kept: nothing else is saved
    assert torch.equal(grads[True], grads[None]) and torch.equal(grads[False], grads[None])
    activations = 16 * 96 * 8 * 2  # fc1's output (its mask) and the head's input
    assert stats[True]["raw_bytes"] == stats[False]["raw_bytes"] == activations
    assert "matmul" not in stats[True]["by_kind"]


class _Interruptible(nn.Module):
    """GELU blocks; ``interrupt`` raises KeyboardInterrupt inside the second (a Ctrl-C in a
    notebook); a list input runs the model on each item (the model calling itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)
        self.interrupt = False

    def forward(self, x):
        if isinstance(x, list):
            return torch.cat([self(item) for item in x])
        h = F.gelu(self.a(x))
        if self.interrupt:
            raise KeyboardInterrupt
        return self.head(F.gelu(self.b(h)))


def _installed() -> bool:
    """True while any saved-tensor hooks or torch function mode is on this thread."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None or torch._C._len_torch_function_stack() > 0


def _mlp_grad(mlp, z):
    mlp.zero_grad()
    mlp(z).pow(2).sum().backward()
    return mlp[0].weight.grad.clone()


@pytest.mark.parametrize("then", ["forward", "remove", "stop_engine"])
def test_a_forward_interrupted_by_keyboard_interrupt_leaves_nothing_installed(then):
    """KeyboardInterrupt skips PyTorch's always-called forward hooks: the saved-tensor hooks
    and the operator mode stayed on the thread, coding every later forward of any module
    (an unrelated MLP's gradient 3% off), the model's next forward never opened an account
    and remove() left them there. The next root forward, remove() or stop_engine() (what
    the Lightning callback's on_exception calls) ends it."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1)).double()
    z = torch.randn(32, 16, dtype=torch.float64)
    clean = _mlp_grad(mlp, z)
    model = _Interruptible().double()
    handle = apply_s2a(model, S2AConfig(head="head", min_numel=1))
    x = torch.randn(8, 16, dtype=torch.float64)
    model.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model.interrupt = False
    assert _installed()  # what PyTorch leaves: the reason for the fix
    step = handle.engine.step
    if then == "forward":
        with pytest.warns(UserWarning, match="never returned"):
            model(x[:4]).sum().backward()
        assert handle.engine.step == step + 1 and handle.stats()["raw_bytes"] > 0
    else:
        getattr(handle, then)()
    assert not _installed()
    assert torch.equal(_mlp_grad(mlp, z), clean)
    handle.remove()


def test_a_forward_driven_through_parts_is_recovered_too():
    """An interrupted forward that ran through the model's parts (forward_features, a
    LightningModule calling its encoder) was never recovered: no root call comes."""
    torch.manual_seed(0)
    model = _Interruptible().double()
    handle = apply_s2a(model, S2AConfig(head="head", min_numel=1))
    x = torch.randn(8, 16, dtype=torch.float64)

    def parts(interrupt: bool) -> torch.Tensor:
        h = F.gelu(model.a(x))
        if interrupt:
            raise KeyboardInterrupt
        return model.head(F.gelu(model.b(h)))

    with pytest.raises(KeyboardInterrupt):
        parts(True)
    with pytest.raises(KeyboardInterrupt):  # interrupted inside a part, its hooks open
        model.interrupt = True
        model(x)
    model.interrupt = False
    with pytest.warns(UserWarning, match="never returned"):
        parts(False).sum().backward()
    assert not _installed() and handle.engine._depth == 0
    handle.remove()


def test_a_model_calling_itself_is_no_interrupted_forward(recwarn):
    torch.manual_seed(0)
    model = _Interruptible().double()
    handle = apply_s2a(model, S2AConfig(head="head", min_numel=1))
    x = torch.randn(8, 16, dtype=torch.float64)
    with torch.no_grad():  # nothing activates: the nested call is still no interruption
        model([x[:4], x[4:]])
    model([x[:4], x[4:]]).sum().backward()
    assert not [w for w in recwarn if "never returned" in str(w.message)]
    assert not _installed() and handle.engine._depth == 0
    # both items' tensors are in the forward's one account
    single = handle.stats()["raw_bytes"]
    model(x).sum().backward()
    assert handle.stats()["raw_bytes"] == single
    handle.remove()


def test_a_forward_in_another_thread_is_no_interrupted_forward(recwarn):
    """DataParallel's replicas run forwards in threads: one thread's forward starting while
    another's runs was taken for an interrupted forward (a RuntimeError popping an empty
    mode stack, depth -1)."""
    import threading

    torch.manual_seed(0)
    model = _Interruptible().double()
    handle = apply_s2a(model, S2AConfig(head="head", min_numel=1))
    x = torch.randn(8, 16, dtype=torch.float64)
    started, release, errors = threading.Event(), threading.Event(), []

    def wait(module, args, output):
        started.set()
        release.wait(10)

    hook = model.a.register_forward_hook(wait)
    first = threading.Thread(target=lambda: model(x))
    first.start()
    started.wait(10)
    hook.remove()
    try:
        with torch.no_grad():
            model(x)  # this thread, while the other's forward is open
    except Exception as err:
        errors.append(err)
    release.set()
    first.join(10)
    assert not errors and not [w for w in recwarn if "never returned" in str(w.message)]
    assert handle.engine._depth == 0 and not _installed()
    handle.remove()


class _SliceNet(nn.Module):
    """GELU saves h (coded); the head saves h[:, 0] (kept, compacted into a copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        h = self.a(x)
        return self.head(h[:, 0]) + self.b(F.gelu(h)).mean(1)[:, :3]


def test_raw_bytes_do_not_depend_on_compression():
    """A kept slice is copied (compact) before it is counted: its raw bytes were charged to
    the copy's storage, not to what is left of the original's (one allocation uncompressed),
    so the compressed run's raw bytes were 33792 where the uncompressed run's are 32768."""
    raws = []
    for compress in (False, True):
        torch.manual_seed(0)
        model = _SliceNet()
        with apply_s2a(model, S2AConfig(compress=compress, head="head", min_numel=1)) as handle:
            model(torch.randn(4, 32, 16)).sum().backward()
            raws.append(handle.stats()["raw_bytes"])
    assert raws[0] == raws[1] == 4 * 32 * 64 * 4  # h, whose slice adds nothing


class _TwoCopies(nn.Module):
    """Saves two tensors of the same values in one forward (mul keeps both operands)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, 64), nn.Linear(64, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h.clone() * h.clone())


def test_stochastic_rounding_draws_its_own_noise_for_each_tensor():
    """Every tensor of a forward was rounded with the same seed: equal values got equal
    codes and unrelated tensors correlated errors. A rerun still draws the same noise."""
    torch.manual_seed(0)
    model, x = _TwoCopies(), torch.randn(32, 16)
    with apply_s2a(model, head="head", stochastic_rounding=True, min_numel=1) as handle:
        decoded = []
        for _ in range(2):
            handle.engine.step = 5  # the same step twice: a resumed run
            nodes, todo = [], [model(x).grad_fn]
            while todo:  # the graph's nodes, breadth first
                node = todo.pop(0)
                nodes.append(node)
                todo += [f for f, _ in node.next_functions if f is not None]
            mul = next(n for n in nodes if type(n).__name__ == "MulBackward0")
            decoded.append((mul._saved_self.clone(), mul._saved_other.clone()))
        (first, second), again = decoded[0], decoded[1]
        assert not torch.equal(first, second)  # same values, different noise
        assert torch.equal(first, again[0]) and torch.equal(second, again[1])


def test_a_copy_made_inside_a_forward_starts_outside_one():
    """A deep copy (an EMA copy taken in a hook) made while a forward ran carried its open
    depth: the copy's first forward failed on an assertion."""
    torch.manual_seed(0)
    model = _Interruptible()
    apply_s2a(model, S2AConfig(head="head", min_numel=1))
    copies = []
    hook = model.b.register_forward_hook(lambda m, a, o: copies.append(copy.deepcopy(model)))
    model(torch.randn(4, 16)).sum().backward()
    hook.remove()
    twin = copies[0]
    engine = next(iter(twin._forward_pre_hooks.values())).func.__self__  # the copy's own
    assert engine is not next(iter(model._forward_pre_hooks.values())).func.__self__
    twin(torch.randn(4, 16)).sum().backward()
    assert twin.head.bias.grad is not None and not _installed()
    assert engine._depth == 0 and engine.stats()["stored_bytes"] > 0


class _MaxOverTokens(torch.autograd.Function):
    """A user's own max over tokens: backward compares the saved input with the saved max."""

    @staticmethod
    def forward(ctx, x):
        v = x.amax(dim=1)
        ctx.save_for_backward(x, v)
        return v

    @staticmethod
    def backward(ctx, g):
        x, v = ctx.saved_tensors
        return g.unsqueeze(1) * (x == v.unsqueeze(1))


class _CustomPooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(_MaxOverTokens.apply(self.l1(x)))


def _custom_grads(**overrides):
    torch.manual_seed(0)
    model = _CustomPooled().double()
    x = torch.randn(4, 8, 16, dtype=torch.float64)
    with apply_s2a(model, head="head", **overrides) as handle:
        model(x).sum().backward()
        kinds = handle.stats()["by_kind"]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, kinds


def test_what_a_custom_function_saves_is_kept_exact_and_said():
    """Coded as generic min-max, the saved input no longer equalled the saved max, and the
    bias gradient below it was exactly zero, without a word."""
    plain, _ = _custom_grads(compress=False)
    with pytest.warns(UserWarning, match="custom autograd Function.*op_bits=\\{'custom': 4\\}"):
        grads, kinds = _custom_grads()
    assert plain["l1.bias"].abs().sum() > 0
    assert all(torch.equal(grads[n], plain[n]) for n in plain)
    assert kinds["custom"]["tensors"] == 2
    assert kinds["custom"]["stored_bytes"] == kinds["custom"]["raw_bytes"] == (4 * 8 + 4) * 32 * 8
    # asked for, they are coded, and nothing is said (nor where nothing is compressed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, coded = _custom_grads(op_bits={"custom": 4})
        _custom_grads(compress=False)
    assert coded["custom"]["stored_bytes"] < coded["custom"]["raw_bytes"]


class _Cumulative(_CustomPooled):
    def forward(self, x):
        return self.head(torch.cumprod(torch.atan(self.l1(x)), dim=1))


def test_a_torch_op_outside_the_tables_is_generic_not_custom():
    """Ops the mode sees but no table names (cumprod, atan) are coded as generic; only what
    torch saves with no op running is a custom Function's (a review found them all labelled
    custom, warned about, and kept exact, S2A's own max-pool Function included)."""
    torch.manual_seed(0)
    model = _Cumulative().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with apply_s2a(model, head="head") as handle:
            model(torch.randn(4, 8, 16, dtype=torch.float64)).sum().backward()
            kinds = handle.stats()["by_kind"]
    assert "custom" not in kinds
    assert kinds["generic"]["stored_bytes"] < kinds["generic"]["raw_bytes"]


def _peaked_vit():
    """A timm ViT whose attention is as peaked as a pretrained one (qkv weights scaled)."""
    torch.manual_seed(1)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=4, num_classes=10
    ).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model.eval()


def _peaked_grads(**overrides):
    model = _peaked_vit()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    with apply_s2a(model, **overrides) as handle:
        F.cross_entropy(model(x), y).backward()
        kinds = handle.stats()["by_kind"]
        grads = torch.cat(
            [
                p.grad.flatten()
                for n, p in model.named_parameters()
                if p.grad is not None and not n.startswith("head.")
            ]
        )
    return grads, kinds


def test_a_fused_attentions_saved_tensors_keep_8_bits():
    """SDPA's backward recomputes the probabilities from the saved query and key and takes
    ``rowsum(dO * out)`` from the saved output: at 4 bits peaked attention lost the gradient."""
    exact, _ = _peaked_grads(compress=False)
    grads, kinds = _peaked_grads()
    four, _ = _peaked_grads(op_bits={"fused_attention": 4})  # as before 2026-12-07
    assert cosine(grads, exact) > 0.998
    assert cosine(four, exact) < 0.97
    # q, k, v and out of each block's attention, 8-bit codes plus an fp16 offset and scale
    # per 64 values: 8 * 4 * 17 * 24 = 13056 values each
    fused = kinds["fused_attention"]
    assert fused["tensors"] == 2 * 4
    assert fused["raw_bytes"] == 2 * 4 * 13056 * 8
    assert fused["stored_bytes"] == 2 * 4 * (13056 + 13056 // 64 * 4)


class _Sdpa3d(nn.Module):
    """One head of attention through SDPA with 3-D ``(B, L, E)`` arguments, or the same as
    4-D ``(B, 1, L, E)``."""

    def __init__(self, four_d: bool):
        super().__init__()
        self.four_d = four_d
        self.q, self.k, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        if self.four_d:
            o = F.scaled_dot_product_attention(q[:, None], k[:, None], x[:, None], scale=3.0)
            return self.head(o[:, 0])
        return self.head(F.scaled_dot_product_attention(q, k, x, scale=3.0))

    def get_classifier(self):
        return self.head


def test_fused_attention_on_3d_arguments_keeps_8_bits():
    """The CPU kernel saves 3-D arguments as ``(1, B, L, E)`` views, which were not matched:
    coded at 4 bits as plain attention, q and k bias gradients at cosine 0.59."""
    grads, stored = {}, {}
    for four_d in (False, True):
        torch.manual_seed(0)
        model = _Sdpa3d(four_d).double()
        x = torch.randn(4, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for compress in (False, True):
            with apply_s2a(model, S2AConfig(modules=["bias"], compress=compress)) as handle:
                model.zero_grad()
                model(x).square().sum().backward()
                grads[four_d, compress] = torch.cat([model.q.bias.grad, model.k.bias.grad])
                stored[four_d, compress] = handle.stats()["by_kind"]
    assert cosine(grads[False, True], grads[False, False]) > 0.99
    assert stored[False, True] == stored[True, True]  # as the 4-D call: fused, 8 bits
    assert stored[False, True]["fused_attention"]["tensors"] == 4


class _CrossAttention3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, c):
        o = F.scaled_dot_product_attention(self.q(x) * 3, self.k(c) * 3, self.v(c))
        return self.head(o.mean(1))

    def get_classifier(self):
        return self.head


def test_the_log_sum_exp_of_3d_cross_attention_stays_exact():
    """The CPU kernel saves a 3-D call's log-sum-exp as (1, B, L): where B * L was a data
    tensor's size (512 queries over 64 keys of 8) it was coded at 4 bits, q and v bias
    gradients 5% off."""
    torch.manual_seed(0)
    model = _CrossAttention3d().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 512, 8, dtype=torch.float64, generator=g)
    c = torch.randn(4, 64, 8, dtype=torch.float64, generator=g)
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(compress=compress)) as handle:
            model.zero_grad()
            model(x, c).square().sum().backward()
            grads[compress] = torch.cat([model.q.bias.grad, model.v.bias.grad])
            kinds = handle.stats()["by_kind"]
    lse = kinds.get("attention", {"raw_bytes": 0, "stored_bytes": 0})
    assert lse["stored_bytes"] == lse["raw_bytes"]  # kept exact, as a statistic
    assert cosine(grads[True], grads[False]) > 0.9999


def test_forward_mode_ad_runs_as_without_s2a():
    """Under forward-mode AD the rewrites' Functions had no jvp ("You must implement the jvp
    function") and what ops saved could not be read; now torch's own ops run there."""
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tangent = torch.randn_like(x)

    def jvp():
        with forward_ad.dual_level():
            primal, out = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent)))
        return primal, out

    expected = jvp()
    with apply_s2a(model) as handle:
        got = jvp()
        model(x).sum().backward()  # and a training step after it compresses as before
        stats = handle.stats()
    assert 0 < stats["stored_bytes"] < stats["raw_bytes"]
    assert torch.equal(got[0], expected[0]) and torch.allclose(got[1], expected[1], rtol=1e-10)


class _ChangedAfterSave(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        z = self.b(h)  # saves h
        return self.head(z + h.mul_(2))  # h changed in place after its save


def test_a_tensor_changed_after_its_save_under_a_dual_level_is_refused_as_by_pytorch():
    """With a forward-mode AD level open the pack hook returned tensors bare, which skips
    autograd's version check: a bias gradient at cosine -0.72 to the right one, silently."""
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    model, x = _ChangedAfterSave().double(), torch.randn(4, 8, dtype=torch.float64)
    with forward_ad.dual_level():
        out = model(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()  # plain PyTorch
    for compress in (False, True):
        with apply_s2a(model, head="head", compress=compress):
            with forward_ad.dual_level():
                out = model(x)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()


def test_an_engine_pickled_before_new_state_was_added_still_runs(monkeypatch):
    """A model saved with torch.save by the previous version lacked the drift checks' state
    and failed its first forward after loading with an AttributeError."""
    import pickle

    from lightning_s2a.engine.hooks import SavedTensorEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 2))
    apply_s2a(model, head="2")
    model(torch.randn(32, 8)).sum().backward()
    getstate = SavedTensorEngine.__getstate__

    def as_before(self):  # what the previous version pickled
        state = getstate(self)
        for name in ("_drift_checks", "_drift_positions", "_warned_grad_inside"):
            state.pop(name)
        return state

    monkeypatch.setattr(SavedTensorEngine, "__getstate__", as_before)
    loaded = pickle.loads(pickle.dumps(model))
    for _ in range(3):  # past the codebook's first fits: the drift check runs
        loaded(torch.randn(32, 8)).sum().backward()


class _GradInside(nn.Module):
    """A forward that turns autograd on inside (called from a no_grad evaluation loop)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        with torch.enable_grad():
            return self.head(F.gelu(self.a(x)))


def test_a_forward_that_turns_autograd_on_inside_is_said_to_run_uncompressed():
    """Entered under no_grad, the engine never started: the forward's saves went
    uncompressed and uncounted, stats() showing an earlier forward, without a word."""
    torch.manual_seed(0)
    model, x = _GradInside(), torch.randn(4, 8)
    with apply_s2a(model, head="head") as handle:
        model(x).sum().backward()  # compressed
        before = handle.stats()
        with torch.no_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model.head(x[:, :2].repeat(1, 8))  # nothing with a gradient: nothing said
            with pytest.warns(UserWarning, match="began without autograd"):
                out = model(x)
        assert out.requires_grad and handle.stats() == before
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x)  # said once


class _CallsAnother(nn.Module):
    """Calls a model it does not register (an S2A'd model of its own, or a trainable
    module) inside its forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3))

    def forward(self, x):
        return self.body(x) + self.__dict__["other"](x)


def _inner() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3)
    )


@pytest.mark.parametrize("inner_compress", [True, False])
def test_an_s2a_model_inside_another_s2a_models_forward_runs_under_its_own_engine(
    inner_compress,
):
    """The inner model's engine stood aside for the outer's hooks, and the outer engine coded
    the inner's tensors at its own widths: the inner head's input at 4 bits (cosine 0.997),
    its compress=False ignored, its stats 0."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    grads = {}
    for compress in (False, True):
        torch.manual_seed(1)
        outer, inner = _CallsAnother().double(), _inner().double()
        outer.__dict__["other"] = inner
        h_out = apply_s2a(outer, head="body.2", compress=compress)
        h_in = apply_s2a(inner, head="4", compress=compress and inner_compress)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "S2A stays out"
            F.cross_entropy(outer(x), y).backward()
        grads[compress] = inner[4].weight.grad.clone()
        stats = h_in.stats()
        assert stats["raw_bytes"] > 0
        assert (stats["stored_bytes"] < stats["raw_bytes"]) == (compress and inner_compress)
        assert "trainable" in stats["by_kind"]
        h_out.remove(), h_in.remove()
    assert torch.equal(grads[True], grads[False])  # its head's input kept exact


def test_a_trainable_module_from_outside_the_model_keeps_its_input_exact():
    """An unregistered trainable Linear called inside the S2A'd forward had its saved input
    coded as a frozen Linear's: its weight's gradient from 4-bit codes."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 8, dtype=torch.float64), torch.randint(0, 3, (256,))
    grads = {}
    for compress in (False, True):
        torch.manual_seed(1)
        outer = _CallsAnother().double()
        extra = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 3)).double()
        outer.__dict__["other"] = extra  # trains in full, outside S2A
        with apply_s2a(outer, head="body.2", compress=compress):
            F.cross_entropy(outer(x), y).backward()
        grads[compress] = [p.grad.clone() for p in extra.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False], strict=True))


class _Attention(nn.Module):
    """One attention layer three ways: nn.MultiheadAttention without weights, SDPA with a
    float mask, SDPA cross-attention on fp32 inputs under bf16 autocast."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(16, 48)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        if self.how == "mha":
            x = self.proj(x)[..., :16]  # an activation (an input as it is reads as a constant)
            h = self.mha(x, x, x, need_weights=False)[0]
        else:
            q, k, v = self.proj(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
            if self.how.startswith("float_mask"):
                # per image and head, as large as q (a smaller one is kept whole)
                bias = torch.linspace(-3, 3, q.numel(), dtype=x.dtype).view((*q.shape[:-1], -1))
                with torch.autocast("cpu", torch.bfloat16, enabled=self.how.endswith("autocast")):
                    h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float()
            else:  # cross-attention: keys and values of half the tokens, cast by autocast
                k, v = k[:, :, ::2], v[:, :, ::2]
                with torch.autocast("cpu", torch.bfloat16):
                    h = F.scaled_dot_product_attention(q, k, v).float()
            h = h.transpose(1, 2).flatten(2)
        return self.head(h.mean(1))


@pytest.mark.parametrize(
    ("how", "fused"),
    [("mha", 4), ("float_mask", 5), ("float_mask_autocast", 5), ("cross_autocast", 4)],
)
def test_fused_attention_is_found_inside_mha_with_masks_and_under_autocast(how, fused):
    """A review found each at 4 bits: MHA runs SDPA inside one call (torchvision's ViT, cosine
    0.016 with peaked attention), a float mask enters the recomputed exponential, and
    autocast's casts of fp32 inputs are not the arguments' tensors (cross-attention)."""
    torch.manual_seed(0)
    model = _Attention(how)
    with apply_s2a(model, head="head", min_numel=1) as handle:
        model(torch.randn(2, 8, 16)).sum().backward()
        kinds = handle.stats()["by_kind"]
    # q, k, v, out (and the mask, or autocast's cast of it); the log-sum-exp stays exact
    assert kinds["fused_attention"]["tensors"] == fused
    assert kinds["attention"]["stored_bytes"] == kinds["attention"]["raw_bytes"]
    coded = [k for k, v in kinds.items() if v["stored_bytes"] < v["raw_bytes"]]
    assert coded == ["fused_attention"]


class _BiasedAttention(nn.Module):
    """SDPA with a float bias larger than q (TinyViT's position biases), dropout on: the
    math path, which saves reshaped q, k and v."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(16, 24), nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(2, 8, 8), requires_grad=False)

    def forward(self, x):
        q, k, v = self.proj(x).view(*x.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
        bias = self.bias.expand(x.shape[0], 2, 8, 8) * 1.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1)
        return self.head(h.transpose(1, 2).flatten(2).mean(1))


def test_an_attention_mask_is_no_data_for_the_statistics_rule():
    """Counted among the op's data, a bias larger than q made the math path's reshaped q, k
    and v look like statistics, kept whole (tiny_vit_5m_224 compressed 5.0x, now 6.5x)."""
    torch.manual_seed(0)
    model = _BiasedAttention().train()
    with apply_s2a(model, head="head", min_numel=1) as handle:
        model(torch.randn(1, 8, 16)).sum().backward()
        attention = handle.stats()["by_kind"]["attention"]
    assert attention["stored_bytes"] * 2 < attention["raw_bytes"]  # 764 of 2304 (1424 before)


class _FunctionalBody(nn.Module):
    """A hand-written CNN whose ``forward_features`` applies its activations and norm with
    functional ops between its submodule calls (a common style)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.ln, self.fc = nn.LayerNorm(16), nn.Linear(16, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.c2(F.gelu(self.c1(x))))
        return F.layer_norm(x.permute(0, 2, 3, 1), (16,), self.ln.weight, self.ln.bias)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(F.relu(x) * 3.0 - 1.0).mean((1, 2)))  # its own GELU codebook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("entry", ["features_then_head", "forward"])
def test_what_an_entry_method_saves_in_its_own_body_is_coded(entry):
    """``model.forward_features(x)`` ran the ops written in its own body (between submodule
    calls) with no hooks installed: kept full-size and uncounted, silently (a reviewer's
    CNN: 10.6 MB kept, 4 KB reported). Every way in now codes and counts the same tensors."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    results = {}
    for way in ("call", entry):
        torch.manual_seed(1)
        model = _FunctionalBody().double()
        handle = apply_s2a(model, head="fc")
        if way == "call":
            out = model(x)
        elif way == "features_then_head":
            out = model.forward_head(model.forward_features(x))
        else:
            out = model.forward(x)
        out.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results[way] = (handle.stats(), grads)
        handle.remove()
        assert "forward_features" not in vars(model)  # the class's method again
    (ref_stats, ref_grads), (stats, grads) = results["call"], results[entry]
    assert ref_stats["by_kind"]["elementwise"]["tensors"] >= 4  # GELUs, SiLU, ReLU's mask
    assert stats["raw_bytes"] == ref_stats["raw_bytes"]
    assert stats["stored_bytes"] == ref_stats["stored_bytes"] < ref_stats["raw_bytes"] / 4
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def test_an_entry_method_runs_the_copys_engine_and_leaves_with_remove():
    torch.manual_seed(0)
    model = _FunctionalBody()
    handle = apply_s2a(model, head="fc")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    twin.forward_head(twin.forward_features(x)).sum().backward()
    assert twin.forward_features.engine.model is twin and twin.forward_features.owner is twin
    assert twin.forward_features.engine.stats()["stored_bytes"] > 0
    assert handle.stats()["raw_bytes"] == 0  # the original's engine saw nothing
    assert model.forward_features.__doc__ == _FunctionalBody.forward_features.__doc__
    assert str(inspect.signature(model.forward_head)) == "(x: 'torch.Tensor') -> 'torch.Tensor'"
    handle.remove()
    assert "forward_features" not in vars(model) and "forward_head" not in vars(model)


def _decorated(method):
    def wrapper(self, x):  # no functools.wraps: a local function pickle cannot name
        return method(self, x)

    return wrapper


class _Decorated(_FunctionalBody):
    @_decorated
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(x)


def test_entry_methods_follow_replicas_pickles_and_failed_entries(monkeypatch, tmp_path):
    """nn.DataParallel's replicas copy the owner's __dict__ shallowly: a replica ran its
    forward_features on the original module (its weights, its device). A forward_* that
    pickle cannot name failed torch.save(model). An entry whose engine refused to start
    (torch.compile) left the engine open: the next forward warned of an interrupted one."""
    import lightning_s2a.engine.boundaries as boundaries

    torch.manual_seed(0)
    model = _Decorated()
    apply_s2a(model, head="fc")
    x = torch.randn(2, 3, 8, 8)
    replica = model.__new__(type(model))
    replica.__dict__ = model.__dict__.copy()  # as Module._replicate_for_data_parallel
    replica._parameters = {}
    replica._modules = {k: copy.deepcopy(m) for k, m in model._modules.items()}
    twin = copy.deepcopy(model)  # its own module, the replica's weights
    with torch.no_grad():
        for p in (*replica.parameters(), *twin.parameters()):
            p.mul_(2.0)
        assert not torch.allclose(replica(x), model(x))
        torch.testing.assert_close(replica(x), twin(x), rtol=0, atol=0)
    torch.save(model, tmp_path / "model.pt")  # the decorated method is found again on load
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded.forward_features(x), model.forward_features(x))

    def refuse(*args):
        raise RuntimeError("refused")

    monkeypatch.setattr(boundaries, "check_not_traced", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        model.forward_features(x)
    assert model.forward_features.engine._depth == 0
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never returned")
        model(x).sum().backward()


class _InputNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.head = nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 5)

    def forward(self, x):
        return self.head(F.gelu(self.fc(self.ln(x))).mean(1))


def test_a_model_input_as_large_as_a_weight_is_coded():
    """An input of 2 x 32 x 64 values, as many as fc's weight, was taken for "a weight in
    another form" (computed without autograd, a weight's size) and kept exact: 10x the bytes
    of the same input at 33 tokens. The forward's own inputs are no weights."""
    stored = {}
    for tokens in (32, 33):
        torch.manual_seed(0)
        model = _InputNorm()
        with apply_s2a(model, S2AConfig(head="head")) as handle:
            model(torch.randn(2, tokens, 64)).sum().backward()
            norm = handle.stats()["by_kind"]["norm"]
            stored[tokens] = norm["stored_bytes"] / norm["raw_bytes"]
    assert stored[32] == pytest.approx(stored[33], rel=0.02) and stored[32] < 0.2


class _CrossAttention(nn.Module):
    """Cross-attention of ``queries`` tokens over ``keys`` tokens: nn.MultiheadAttention, or
    SDPA with values of another width than queries and keys (its math path on CPU)."""

    def __init__(self, how, queries, keys):
        super().__init__()
        self.how, self.queries, self.keys = how, queries, keys
        self.proj = nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.proj(x)
        q, mem = h[:, : self.queries], h[:, -self.keys :]
        if self.how == "mha":
            out = self.mha(q, mem, mem, need_weights=False)[0]
        elif self.how == "sdpa":  # two heads of width 8 (a fused path on CPU)
            heads = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(heads(q), heads(mem), heads(mem))
            out = out.transpose(1, 2).flatten(2)
        else:  # two heads of width 4 for queries and keys, 8 for values
            heads = lambda t, w: t[..., : 2 * w].unflatten(-1, (2, w)).transpose(1, 2)  # noqa: E731
            out = F.scaled_dot_product_attention(heads(q, 4), heads(mem, 4), heads(mem, 8))
            out = out.transpose(1, 2).flatten(2)
        return self.head(out.mean(1))


@pytest.mark.parametrize("how", ["mha", "sdpa_value_width"])
@pytest.mark.parametrize(("queries", "keys"), [(4, 24), (24, 4)])
def test_cross_attentions_shorter_side_is_coded_not_taken_for_statistics(how, queries, keys):
    """The query and output of 4 queries over 24 keys (or the key and value of 4 keys under
    24 queries), split into heads, have fewer elements than the longer operand: they were
    taken for statistics like the log-sum-exp and kept whole instead of coded."""
    torch.manual_seed(0)
    model = _CrossAttention(how, queries, keys)
    with apply_s2a(model, head="head", min_numel=1) as handle:
        model(torch.randn(2, 24, 16)).sum().backward()
        kinds = handle.stats()["by_kind"]
    if how == "mha":  # fused: q, k, v and out coded, the log-sum-exp (2, 2, queries) whole
        assert kinds["fused_attention"]["tensors"] == 4
        lse = 2 * 2 * queries * 4
        assert kinds["attention"] == {"raw_bytes": lse, "stored_bytes": lse, "tensors": 1}
    else:  # the math path: every tensor it saves is data, coded (1.7x and 2.7x before)
        assert kinds["attention"]["tensors"] == 5
        assert kinds["attention"]["stored_bytes"] * 4 < kinds["attention"]["raw_bytes"]


@pytest.mark.parametrize(("queries", "keys"), [(40, 5), (40, 6), (80, 10)])
def test_the_log_sum_exp_stays_exact_whatever_the_lengths(queries, keys):
    """With queries == keys x head_dim (8), a key split into heads has as many elements as the
    log-sum-exp: a first rule by element counts took one for the other and coded the lse."""
    torch.manual_seed(0)
    model = _CrossAttention("sdpa", queries, keys)
    with apply_s2a(model, head="head", min_numel=1) as handle:
        model(torch.randn(2, max(queries, keys), 16)).sum().backward()
        kinds = handle.stats()["by_kind"]
    lse = 2 * 2 * queries * 4  # (batch, heads, queries) in float32
    assert kinds["attention"] == {"raw_bytes": lse, "stored_bytes": lse, "tensors": 1}
    assert kinds["fused_attention"]["tensors"] == 4


def test_a_padded_log_sum_exp_is_a_statistic():
    """CUDA's memory-efficient attention pads the lse's rows to a multiple of 32: for one to
    three queries (attention pooling) it has more elements than the query itself."""
    from lightning_s2a.engine.attention import attention_shapes, statistics
    from lightning_s2a.engine.recognition import Call

    for batch, heads, rows, dim in ((8, 12, 1, 64), (8, 6, 2, 32), (8, 3, 197, 64)):
        q = torch.zeros(batch, heads, rows, dim)
        call = Call(kind="attention", arg_shapes=frozenset({tuple(q.shape)}))
        call.lse, call.data_numels = attention_shapes("scaled_dot_product_attention", (q, q, q), {})
        padded = -(-rows // 32) * 32
        assert statistics(torch.zeros(batch, heads, padded), call)
        assert statistics(torch.zeros(batch, heads, rows), call)
        assert not statistics(torch.zeros(batch, heads, rows, dim // 2), call)  # data


@pytest.mark.parametrize("compress", [True, False])
def test_a_kept_view_counts_the_storage_it_holds(compress):
    # A trainable head's input, a[:, :66] of 128 columns, is kept exact and not copied (more
    # than half its storage): the whole storage stays alive until backward, and was counted
    # at the view's own bytes (135,168 of the 262,144 held; 2026-12-07).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 128)
            self.head = nn.Linear(66, 3)

        def forward(self, x):
            a = torch.tanh(self.fc(x))
            return self.head(a[:, :66])

    torch.manual_seed(0)
    model = Net()
    handle = apply_s2a(model, S2AConfig(head="head", compress=compress))
    F.cross_entropy(model(torch.randn(512, 32)), torch.zeros(512, dtype=torch.long)).backward()
    kinds = handle.stats()["by_kind"]
    held = 512 * 128 * 4  # the tanh output's whole storage
    # raw: tanh's save claimed the storage, and the view's own bytes fall within it
    assert (kinds["elementwise"]["raw_bytes"], kinds["trainable"]["raw_bytes"]) == (held, 0)
    if compress:  # tanh's save is coded: the view alone holds the storage
        assert kinds["trainable"]["stored_bytes"] == held
    else:  # tanh keeps it whole, and the view adds nothing: counted once
        kept = kinds["trainable"]["stored_bytes"] + kinds["elementwise"]["stored_bytes"]
        assert kept == held
    handle.remove()


def test_an_expanded_view_counts_raw_as_the_view_it_is():
    # m = h[:, :1].expand_as(h), saved by a mul, holds h's storage: raw counted the narrowed
    # base (2 KiB) instead, 33% low against the uncompressed run (2026-12-07).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 128)
            self.head = nn.Linear(128, 5)

        def forward(self, x):
            h = self.fc(x)
            return self.head(torch.sigmoid(h) * h[:, :1].expand_as(h))

    torch.manual_seed(0)
    model = Net()
    with apply_s2a(model, S2AConfig(head="head", compress=False)) as handle:
        out = model(torch.randn(512, 64))
        counted, held = _independent_saved_bytes(out, list(model.parameters()))
        stats = handle.stats()
    assert (stats["raw_bytes"], stats["stored_bytes"]) == (counted, held)
