"""The hierarchical side network: shapes, wiring against a hand-built reference, no backbone
bytes, gradients, errors, adapters, and a user's segmentation module under Lightning."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_s2a import S2ACallback, S2AConfig, apply_s2a
from lightning_s2a.structure.hierarchical import Tap, as_map, map_stride, token_grid
from tests.conftest import adapter_round_trip, assert_close_in_norm, cosine
from tests.lightning_helpers import quiet_trainer
from tests.test_structure import SIZE, SMALL

STRIDES = (8, 16, 32)


def _no_head(family: str) -> nn.Module:
    model = SMALL[family]()
    model.reset_classifier(0)
    return model


@pytest.mark.parametrize("family", list(SMALL))
def test_pyramid_shapes_and_nothing_stored_by_the_backbone(family):
    model = _no_head(family).train()
    x = torch.randn(2, *SIZE)
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=SIZE)
    with apply_s2a(model, cfg, compress=False) as handle:
        pyramid = model(x)
        width = model.s2a_side.proj[0].out_channels
        assert [tuple(f.shape) for f in pyramid] == [
            (2, width, math.ceil(64 / s), math.ceil(64 / s)) for s in STRIDES
        ]
        sum(f.square().mean() for f in pyramid).backward()
        assert set(handle.stats()["by_part"]) == {"side"}  # the backbone stored 0 bytes
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(n.startswith("s2a_side.") for n in trained)
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
        assert "side: hierarchical" in handle.summary()
        assert "output the pyramid" in handle.summary()


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_with_a_head_the_side_classifies(family):
    model = SMALL[family]().train()
    x, y = torch.randn(2, *SIZE), torch.tensor([1, 2])
    with apply_s2a(model, modules="side", side="hierarchical", input_size=SIZE) as handle:
        out = model(x)
        assert out.shape == (2, 10)
        F.cross_entropy(out, y).backward()
        assert set(handle.stats()["by_part"]) == {"side"}
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0
            for p in model.s2a_side.parameters()
            if p.requires_grad
        )


def _block_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: outs.setdefault(n, o)) for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [outs[n] for n in names]


def _reference(side: nn.Module, maps: list[torch.Tensor], reduction: int) -> list[torch.Tensor]:
    """The pyramid by hand: tap i of n feeds level i * 3 // n at 64/8, 64/16, 64/32."""
    sizes = [(8, 8), (4, 4), (2, 2)]
    pyramid, s = [], None
    for level, size in enumerate(sizes):
        if s is not None:
            s = F.adaptive_avg_pool2d(s, size)
        for i, m in enumerate(maps):
            if i * 3 // len(maps) != level:
                continue
            if m.shape[-1] > size[1]:
                m = F.adaptive_avg_pool2d(m, size)
            b, c, h, w = m.shape
            m = m.reshape(b, c // reduction, reduction, h, w).mean(2)
            z = side.proj[i](m)
            if z.shape[-1] != size[1]:
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            s = z if s is None else s + z
        s = side.levels[level](s)
        pyramid.append(s)
    return pyramid


@pytest.mark.parametrize(
    "name, factory, to_map",
    [
        (  # 4 register tokens + class token before the 4x4 patch grid
            "vit+registers",
            lambda: timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, depth=3, img_size=64, reg_tokens=4
            ),
            lambda o: o[:, 5:].reshape(o.shape[0], 4, 4, -1).permute(0, 3, 1, 2),
        ),
        ("swin", lambda: _no_head("swin"), lambda o: o.permute(0, 3, 1, 2)),
        ("resnet", lambda: _no_head("resnet"), lambda o: o),
    ],
)
def test_pyramid_matches_a_hand_built_reference(name, factory, to_map):
    # float64 and compress=False: the wiring (token grid, prefix tokens, layouts, levels,
    # resizing, channel groups) must reproduce the reference to rounding.
    torch.manual_seed(0)
    model = factory().double().eval()
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=SIZE)
    handle = apply_s2a(model, cfg, compress=False)
    names = [b.name for b in handle.structure.blocks]
    pyramid = model(x)
    maps = [to_map(o) for o in _block_outputs(model, names, x)]
    with torch.no_grad():
        expected = _reference(model.s2a_side, maps, cfg.side_reduction)
    handle.remove()
    for got, want in zip(pyramid, expected, strict=True):
        assert_close_in_norm(got, want, 1e-12, name)


def test_token_grid_finds_the_patch_grid_and_prefix_tokens():
    assert token_grid(197, (224, 224), None) == (16, 1)  # ViT-B/16 with a class token
    assert token_grid(196, (224, 224), None) == (16, 0)  # no class token
    assert token_grid(201, (224, 224), 5) == (16, 5)  # the model says: class + 4 registers
    assert token_grid(14 * 20 + 1, (224, 320), None) == (16, 1)  # not square
    # a count the model gives that leaves no grid (CaiT's main blocks carry no class token)
    assert token_grid(196, (224, 224), 1) == (16, 0)
    with pytest.raises(ValueError, match=r"do not make a \(H/s\) x \(W/s\) grid.*input_size"):
        token_grid(100, (16, 16), None)
    # 16-pixel patches of 100 px, no class token: a 6x6 grid cut from the image. Every
    # leading count at dividing strides first took 11 tokens for class tokens and laid the
    # other 25 out as 5x5 patches of 20 pixels.
    assert token_grid(36, (100, 100), None) == (16, 0)
    assert token_grid(37, (100, 100), None) == (16, 1)


def test_tokens_are_laid_out_row_by_row_after_the_prefix():
    grid = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 6, 1).expand(1, 6, 2)
    tokens = torch.cat([torch.full((1, 1, 2), -1.0), grid], dim=1)  # class token first
    m = as_map(tokens, Tap("tokens", 2, stride=8, prefix=1), (16, 24))
    assert m.shape == (1, 2, 2, 3)
    assert torch.equal(m[0, 0], torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    with pytest.raises(RuntimeError, match=r"expected 2x2 patch tokens after 1.*got 7"):
        as_map(tokens, Tap("tokens", 2, stride=8, prefix=1), (16, 16))


def test_another_input_size_gives_a_pyramid_at_that_size():
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=64, dynamic_img_size=True
    )
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=SIZE)
    with apply_s2a(model, cfg):
        pyramid = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape[-2:]) for f in pyramid] == [(12, 16), (6, 8), (3, 4)]


def test_map_strides_hold_at_sizes_other_than_the_probed_one():
    # At 100 px ResNet's maps are 25, 13, 7 and 4 cells: strides were taken as 4, 8, 14
    # and 25, and a 224 px batch (14 cells at stride 16) was refused as a wrong input.
    model = _no_head("resnet")
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 100, 100))
    with apply_s2a(model, cfg):
        assert sorted({t.stride for t in model.s2a_side.taps}) == [4, 8, 16, 32]
        for size in (100, 224, 70):
            pyramid = model(torch.randn(1, 3, size, size))
            assert [tuple(f.shape[-2:]) for f in pyramid] == [
                (math.ceil(size / s),) * 2 for s in STRIDES
            ]
    assert map_stride(100, 7) == 16 and map_stride(300, 10) == 32 and map_stride(70, 17) == 4
    # strides that are no power of two: ConvMixer-768/32 (patch 7), ConvMixer-1024/20 (patch 14)
    assert map_stride(224, 32) == 7 and map_stride(672, 96) == 7 and map_stride(224, 16) == 14
    patch7 = _PatchSeven()
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 70, 70))
    with apply_s2a(patch7, cfg):
        assert {t.stride for t in patch7.s2a_side.taps} == {7}
        assert [tuple(f.shape[-2:]) for f in patch7(torch.randn(1, 3, 140, 140))] == [
            (math.ceil(140 / s),) * 2 for s in STRIDES
        ]
    # probed where a stride of 7 and one of 8 read alike (97 px: 13 cells): the check
    # bounds the stride by the probe instead of guessing one (8 refused 224 px)
    with apply_s2a(patch7, cfg.replace(input_size=(3, 97, 97))):
        for size in (97, 130, 224):
            assert len(patch7(torch.randn(1, 3, size, size))) == len(STRIDES)


class _Unpadded(nn.Module):
    """Inception-v3's stem in small: convolutions without padding lose pixels at each stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.blocks = nn.Sequential(
            nn.Conv2d(8, 8, 3), nn.Conv2d(8, 16, 3, stride=2), nn.Conv2d(16, 16, 3, stride=2)
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(inputs[-1]))  # the image last: a first one is no image


def test_maps_of_convolutions_without_padding_fit_their_input():
    """At its own 299 px Inception-v3's stride-2 map has 147 cells, neither rounding of
    299 / 2: the hierarchical side refused the very size it was probed at."""
    model = _Unpadded()
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 99, 99))
    with apply_s2a(model, cfg):
        for size in (99, 131):
            assert len(model(torch.randn(1, 3, size, size))) == len(STRIDES)
        with pytest.raises(RuntimeError, match=r"took the input size 64x64"):  # a wrong size
            model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 99, 99))


class _PatchSeven(nn.Module):
    """ConvMixer / Sequencer in small: 7-pixel patches, then maps at that stride."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=7)
        self.blocks = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def test_a_padded_patch_grid_is_laid_out():
    # timm's dynamic_img_pad pads 72 px to a 5x5 grid of 16-pixel patches: refused before,
    # and applied at 72 px the stride was taken as 14 (72 // 14 == 5).
    assert token_grid(26, (72, 72), 1) == (16, 1)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        depth=2,
        img_size=64,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )
    for applied in ((3, 64, 64), (3, 72, 72)):
        cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=applied)
        with apply_s2a(model, cfg):
            assert {t.stride for t in model.s2a_side.taps} == {16}
            pyramid = model(torch.randn(1, 3, 72, 72))
            assert [tuple(f.shape[-2:]) for f in pyramid] == [(9, 9), (5, 5), (3, 3)]


def test_the_image_size_comes_from_keyword_arguments_too():
    model = _no_head("resnet")
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=SIZE)
    with apply_s2a(model, cfg):
        pyramid = model(x=torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape[-2:]) for f in pyramid] == [(16, 16), (8, 8), (4, 4)]


class _AuxFirst(nn.Module):
    """Takes a 4-D tensor that is not the image, which a caller may pass first."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Conv2d(c, 16, 3, stride=2, padding=1) for c in (3, 16, 16))

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x if aux is None else x + aux.mean()


def test_a_block_map_that_does_not_fit_the_input_size_is_a_clear_error():
    model = _AuxFirst()
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32)
    with apply_s2a(model, cfg):
        model(aux=torch.randn(1, 1, 32, 32), x=x)  # aux happens to have the image's size
        # a first 4-D argument without the image's channels is passed over for the image
        pyramid = model(aux=torch.randn(1, 1, 5, 5), x=x)
        assert [tuple(f.shape[-2:]) for f in pyramid] == [(4, 4), (2, 2), (1, 1)]
        with pytest.raises(RuntimeError, match=r"took the input size 5x5.*gave a 16x16 map"):
            model(aux=torch.randn(1, 3, 5, 5), x=x)


@pytest.mark.parametrize("side", ["pooled", "hierarchical"])
def test_under_autocast_without_a_head_the_side_still_trains(side):
    # Without a head the side's output replaces the model's own: its cast to the model's
    # output dtype (bf16 -> fp32 under autocast) must stay in the graph.
    torch.manual_seed(0)
    model = _no_head("convnext").train()
    head = nn.Linear(model.num_features, 3)
    cfg = S2AConfig(modules=["side"], side=side, head=None, input_size=SIZE)
    with apply_s2a(model, cfg), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model(torch.randn(2, *SIZE))
        if side == "hierarchical":
            features = torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)
            head = nn.Linear(features.shape[1], 3)
        F.cross_entropy(head(features.float()), torch.tensor([0, 2])).backward()
        side_params = [p for p in model.s2a_side.parameters() if p.requires_grad]
        assert side_params and all(p.grad is not None for p in side_params)


def test_a_tensor_operator_given_the_pyramid_says_what_it_is():
    """A classifier of the user's outside the backbone reads the pyramid (a list) as if it
    were features: the error names the pyramid and side='pooled', not torch's bare
    "argument 'input' must be Tensor, not list". As a list it still works: pooled, cat."""
    torch.manual_seed(0)
    model = _no_head("vit").train()
    classifier = nn.Linear(model.num_features, 3)
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=SIZE)
    with apply_s2a(model, cfg), torch.autocast("cpu", dtype=torch.bfloat16):
        pyramid = model(torch.randn(2, *SIZE))
        assert isinstance(pyramid, list) and len(pyramid) == 3
        with pytest.raises(TypeError, match=r"linear\(\) got S2A's feature pyramid.*'pooled'"):
            classifier(pyramid)
        with pytest.raises(AttributeError, match=r"\.mean got S2A's feature pyramid"):
            pyramid.mean(dim=1)
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in pyramid], dim=1)
        means = type(pyramid)(f.mean(dim=(2, 3)) for f in pyramid)
        assert torch.equal(torch.cat(means, dim=1), pooled)  # list arguments take it as before
        leaves, spec = torch.utils._pytree.tree_flatten(pyramid)  # DDP and compile flatten it
        assert len(leaves) == 3 and type(torch.utils._pytree.tree_unflatten(leaves, spec)) is type(
            pyramid
        )


def test_gradients_at_4_bits_follow_the_exact_ones():
    # The side network's own GELU, GroupNorm and resizing are coded at 4 bits; its gradients
    # must stay close to those of the uncompressed run (the backbone is exact either way).
    torch.manual_seed(0)
    model = SMALL["convnext"]().train()
    x, y = torch.randn(4, *SIZE), torch.tensor([1, 2, 3, 4])

    def grads(compress: bool) -> torch.Tensor:
        handle = apply_s2a(
            model, modules="side", side="hierarchical", input_size=SIZE, compress=compress
        )
        model.s2a_side.load_state_dict(init)
        F.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.s2a_side.parameters()])
        handle.remove()
        return g

    probe = apply_s2a(model, modules="side", side="hierarchical", input_size=SIZE)
    init = {k: v.clone() for k, v in model.s2a_side.state_dict().items()}
    probe.remove()
    exact, coded = grads(False), grads(True)
    assert cosine(coded, exact) >= 0.99
    assert not torch.equal(coded, exact)  # something was coded


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"modules": ["side"], "side": "pyramid"}, r"side: 'pyramid' is not one of"),
        ({"modules": ["bias"], "side": "hierarchical"}, r"acts only with the 'side' module"),
        ({"modules": ["side"], "side": "hierarchical", "side_strides": (16, 8)}, "increasing"),
        ({"modules": ["side"], "side": "hierarchical", "side_strides": ()}, "increasing"),
        ({"modules": ["side"], "side_strides": (4, 8)}, r"only with side='hierarchical'"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        S2AConfig(**fields)


class _Tokens(nn.Module):
    """Token input, no image (not a Sequential: its forward would run the side network)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_a_non_image_input_is_a_clear_error():
    model = _Tokens()
    cfg = S2AConfig(
        modules=["side"], side="hierarchical", head="layers.2", blocks="layers.*", input_size=(4, 8)
    )
    with pytest.raises(ValueError, match=r"needs an image input \(C, H, W\)"):
        apply_s2a(model, cfg)


@pytest.mark.parametrize(
    "name, match",
    [
        ("hiera_tiny_224", "keeps its tokens in another order"),  # its maps were scrambled
        ("nest_tiny", r"gives a 4x16 map of a 64x64 input \(strides 16 and 4\)"),
    ],
)
def test_blocks_that_are_no_row_by_row_image_grid_are_refused(name, match):
    """Hiera's unrolled tokens were laid out row by row, the right values in the wrong
    places (silently); NesT's (blocks, tokens) outputs were accepted, then failed each call."""
    model = timm.create_model(name, num_classes=0, img_size=64)
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 64, 64))
    with pytest.raises(ValueError, match=match):
        apply_s2a(model, cfg)
    with apply_s2a(model, cfg.replace(side="pooled")):  # an average reads no order
        assert model(torch.randn(1, 3, 64, 64)).dim() == 2


def test_a_small_non_square_map_fits_a_common_stride():
    """A ResNet's 2x2 last stage of a 40x48 input reads stride 16 or 32 by its height and 32
    by its width: refused as strided unevenly by a first version of that check."""
    model = timm.create_model("resnet18", num_classes=0)
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 40, 48))
    with apply_s2a(model, cfg):
        assert [tuple(f.shape[-2:]) for f in model(torch.randn(1, 3, 40, 48))] == [
            (5, 6),
            (3, 3),
            (2, 2),
        ]


class _SuffixToken(nn.Module):
    """Tokens with one extra token and no ``num_prefix_tokens``: taken for a leading one."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.blocks(torch.cat([t, self.cls.expand(len(t), -1, -1)], 1))[:, -1]


def test_a_guessed_count_of_leading_tokens_is_said():
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 32, 32))
    with apply_s2a(_SuffixToken(), cfg) as handle:
        assert "1 leading token(s) taken for class/register tokens" in handle.summary()
    with apply_s2a(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0), cfg) as h:
        assert "leading token(s)" not in h.summary()  # timm's num_prefix_tokens says it


class _Reversed(nn.Module):
    """Runs its blocks in reverse order: taps would meet the wrong projections."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in reversed(self.blocks):
            x = b(x)
        return x


def test_blocks_that_run_out_of_order_are_a_clear_error():
    cfg = S2AConfig(modules=["side"], side="hierarchical", head=None, input_size=(3, 16, 16))
    model = _Reversed()
    with apply_s2a(model, cfg), pytest.raises(RuntimeError, match=r"ran after 0 taps"):
        model(torch.randn(1, 3, 16, 16))


def test_adapter_round_trip(tmp_path):
    cfg = S2AConfig(modules=["side"], side="hierarchical", input_size=SIZE)
    model, fresh, x = adapter_round_trip(SMALL["resnet"], cfg, tmp_path, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


class SegModule(pl.LightningModule):
    """A user's segmentation project: its own encoder under ``.encoder``, its own head over the
    pyramid, its own optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
        )
        self.seg = nn.Conv2d(32, 3, 1)  # the side's width, set in the callback below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = self.encoder(x)
        size = pyramid[0].shape[-2:]
        fused = sum(F.interpolate(f, size=size, mode="bilinear") for f in pyramid)
        return F.interpolate(self.seg(fused), size=x.shape[-2:], mode="bilinear")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_segmentation_project_trains_the_side_and_its_own_head(tmp_path):
    pl.seed_everything(0)
    module = SegModule()
    frozen = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 3, (8, 32, 32), generator=g)
    callback = S2ACallback(
        backbone="encoder",
        modules=["side"],
        side="hierarchical",
        side_strides=(4, 8, 16),
        side_width=32,
    )
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    head_before = module.seg.weight.detach().clone()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    handle = callback.handle
    assert handle is not None and "side: hierarchical" in handle.summary()
    assert module.encoder.s2a_side.levels[0].pw.weight.grad is not None
    for k, v in frozen.items():  # the backbone did not move
        assert torch.equal(module.encoder.state_dict()[k], v), k
    assert not torch.equal(module.seg.weight, head_before)  # the user's own head trained
    assert module(x[:1]).shape == (1, 3, 32, 32)
