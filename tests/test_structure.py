"""Structural modules (bias, prompt, side) and the frozen-op surgery, through apply_s2a."""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.engine.accounting import SavedBytesCounter
from lightning_s2a.pretrained import efficientnet_lite0_imagenet
from lightning_s2a.structure.head import head_guess
from tests.conftest import assert_close_in_norm, trainable_grads

SMALL = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=3, img_size=64),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=10,
        depths=(1, 1, 1, 1),
        img_size=64,
        window_size=2,
    ),
    "resnet": lambda: timm.create_model("resnet18", num_classes=10),
    "convnext": lambda: timm.create_model("convnext_atto", num_classes=10),
    "effnet": lambda: timm.create_model("tf_efficientnet_lite0", num_classes=10),
}
SIZE = (3, 64, 64)


def _full_finetune_bytes(model, x) -> int:
    with SavedBytesCounter(model) as counter:
        model(x)
    return counter.raw_bytes


@pytest.mark.parametrize(
    "factory",
    [
        lambda: timm.create_model("resnet18", num_classes=10),
        lambda: timm.create_model("convnext_atto", num_classes=10),
        lambda: efficientnet_lite0_imagenet(10),
    ],
    ids=["resnet18", "convnext_atto", "lite0(imagenet)"],
)
def test_surgery_is_exact(factory):
    # In float64: the two paths differ only by rounding (eval BatchNorm's native kernel fuses
    # its multiply-add, the rewrite rounds twice), but in float32 a pretrained network with
    # small running variances amplifies that to ~6e-4 on some CPUs. In float64 they agree to
    # ~1e-14, so a real difference (a wrong eps, a lost gradient term) cannot hide.
    model = factory().train().double()
    x, y = torch.randn(2, *SIZE, dtype=torch.float64), torch.tensor([1, 7])
    cfg = S2AConfig(compress=False, modules=("bias",))
    with apply_s2a(model, cfg.replace(surgery=False)) as handle:
        out_plain = model(x)
        plain = trainable_grads(model, x, y)
        plain_kinds = handle.stats()["by_kind"]
    with apply_s2a(model, cfg) as handle:
        out_cut = model(x)
        cut = trainable_grads(model, x, y)
        cut_kinds = handle.stats()["by_kind"]
    assert_close_in_norm(out_cut, out_plain, 1e-10, "logits")
    assert_close_in_norm(cut, plain, 1e-10, "gradients")
    # frozen convs stored their inputs before and store nothing now; eval BatchNorm keeps only
    # its per-channel scale
    assert plain_kinds["linear"]["raw_bytes"] > 0 and "linear" not in cut_kinds
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        assert cut_kinds["norm"]["raw_bytes"] * 50 < plain_kinds["norm"]["raw_bytes"]
    else:  # LayerNorm (ConvNeXt) is not frozen-op surgery's business
        assert cut_kinds["norm"] == plain_kinds["norm"]


@pytest.mark.parametrize(
    "factory",
    [lambda: timm.create_model("resnet50"), lambda: efficientnet_lite0_imagenet()],
    ids=["resnet50", "lite0(imagenet)"],
)
def test_bias_only_cnn_stores_a_twentieth_of_full_finetuning(factory):
    model = factory().train()
    # Saved bytes grow linearly with the batch on both sides, so batch 2 gives batch 8's ratio.
    x = torch.randn(2, 3, 224, 224)
    full = _full_finetune_bytes(model, x)
    with apply_s2a(model, modules="bias", bits=4) as handle:
        model(x)
        stored = handle.stats()["stored_bytes"]
    assert stored * 20 <= full, (stored, full)


def test_vit_base_bias_prompt_memory_and_trainable_fraction():
    model = timm.create_model("vit_base_patch16_224", num_classes=100).train()
    x = torch.randn(2, 3, 224, 224)  # the ratio does not depend on the batch
    full = _full_finetune_bytes(model, x)
    with apply_s2a(model, modules="bias+prompt", bits=4) as handle:
        model(x)
        stored = handle.stats()["stored_bytes"]
        count, fraction = handle.trainable_parameters()
    assert stored * 8 <= full, (stored, full)  # 8.6x (fused attention at 8 bits)
    assert fraction <= 0.01, fraction
    assert count > 12 * 8 * (197 + 768)  # prompts of rank 8 on 12 blocks are in there


@pytest.mark.parametrize("family", list(SMALL))
def test_prompt_starts_as_identity_and_learns(family):
    model = SMALL[family]().eval()
    x = torch.randn(2, *SIZE)
    before = model(x)
    with apply_s2a(model, modules="prompt", input_size=SIZE) as handle:
        prompts = [m for n, m in model.named_modules() if n.endswith("s2a_prompt")]
        assert prompts and len(prompts) == len(handle.structure.blocks)
        # B = 0: the model is unchanged (up to fp32 rounding: surgery rewrites eval BatchNorm)
        assert_close_in_norm(model(x), before, 1e-5)
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        assert all(p.B.grad is not None and p.B.grad.abs().sum() > 0 for p in prompts)
        head = {id(p) for p in model.get_classifier().parameters()}
        backbone = [p for n, p in model.named_parameters() if "s2a_" not in n and id(p) not in head]
        assert not any(p.requires_grad for p in backbone)  # prompt alone: biases stay frozen
        # A random B, not a constant: a constant shifts all channels of a position equally,
        # and the next LayerNorm takes that shift out again.
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            prompts[0].B.copy_(torch.randn(prompts[0].B.shape, generator=g) * 0.1)
        change = (model(x) - before).norm() / before.norm()
        assert change > 1e-2, change  # a thousand times the rounding allowed above
        kinds = handle.stats()["by_part"]
        assert kinds.get("prompt", {"stored_bytes": 0})["stored_bytes"] == 0
    assert not any("s2a_prompt" in n for n, _ in model.named_modules())


def test_prompt_on_another_resolution_is_a_clear_error():
    """Another size with as many tokens (16x64 where the prompt was sized at 32x32, patch 8:
    4x4 patches, then 2x8) passed the token-count check, and each prompt row was added to
    another patch, silently; also through forward_features."""
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, depth=2, img_size=64, dynamic_img_size=True
    )
    with (
        apply_s2a(model, modules="prompt", input_size=SIZE),
        pytest.raises(RuntimeError, match=r"input_size"),
    ):
        model(torch.randn(1, 3, 32, 32))
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, depth=2, img_size=32, patch_size=8,
        dynamic_img_size=True,
    )  # fmt: skip
    with apply_s2a(model, modules="prompt", input_size=(3, 32, 32)):
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        for call in (model, model.forward_features):
            with pytest.raises(RuntimeError, match=r"a 4x4 grid .* makes a 2x8 grid"):
                call(torch.randn(1, 3, 16, 64))


class _Latents(nn.Module):
    """Perceiver-style: patches cross-attended into 4 latent tokens, at any image size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.queries = nn.Parameter(torch.randn(1, 4, 16))
        self.pool = nn.MultiheadAttention(16, 2, batch_first=True)
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3))
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        p = self.embed(x).flatten(2).transpose(1, 2)
        z, _ = self.pool(self.queries.expand(len(x), -1, -1), p, p)
        return self.head(self.blocks(z).mean(1))


def test_prompts_on_tokens_that_are_no_patches_run_at_any_size():
    """4 latents read as a 2x2 patch grid at 32 px were refused at 64 px (a review caught
    the grid check, written for patches, refusing them)."""
    torch.manual_seed(0)
    model = _Latents()
    cfg = S2AConfig(modules=["prompt"], head="head", input_size=(3, 32, 32), blocks="blocks.*")
    with apply_s2a(model, cfg):
        for size in (32, 64):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 3)


@pytest.mark.parametrize("family", list(SMALL))
def test_side_backbone_stores_nothing(family):
    model = SMALL[family]().train()
    x = torch.randn(2, *SIZE)
    with apply_s2a(model, modules="side", input_size=SIZE, compress=False) as handle:
        out = model(x)
        assert out.shape == (2, 10)
        F.cross_entropy(out, torch.tensor([1, 2])).backward()
        parts = handle.stats()["by_part"]
        assert set(parts) == {"side"}  # the backbone (and the unused old head) stored 0 bytes
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained and all(n.startswith("s2a_side.") for n in trained)
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert not hasattr(model, "s2a_side")


@pytest.mark.parametrize("mods", ["bias+side", "prompt+side"])
def test_side_does_not_combine(mods):
    with pytest.raises(ValueError, match=r"'side' runs the backbone without autograd"):
        apply_s2a(SMALL["vit"](), modules=mods, input_size=SIZE)
    with pytest.raises(ValueError, match=r"'side' runs the backbone without autograd"):
        S2AConfig(modules=mods)  # at construction: the CLI says so before building anything


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            *[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)]
        )
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


class _Unrepeated(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.encoder(x).mean(1))


def test_unknown_model_needs_named_blocks_for_prompt():
    with pytest.raises(ValueError, match=r"cannot find the blocks of _Unrepeated.*not the Li.*"):
        apply_s2a(_Unrepeated(), modules="prompt", head="fc", input_size=(5, 16))
    # a Sequential of Sequential blocks: the inner lists are the blocks (they were not found)
    with apply_s2a(Plain(), modules="prompt", head="fc", input_size=(5, 16)) as h:
        assert [b.name for b in h.structure.blocks] == ["encoder.0", "encoder.1", "encoder.2"]
        assert h.structure.block_rule == "repeated blocks: 3 x Sequential"
    model = Plain()
    with apply_s2a(model, modules="prompt", head="fc", blocks="encoder.*", input_size=(5, 16)) as h:
        assert [b.name for b in h.structure.blocks] == ["encoder.0", "encoder.1", "encoder.2"]
        assert [b.layout for b in h.structure.blocks] == ["tokens"] * 3
    with pytest.raises(ValueError, match=r"blocks=.*matches no submodule"):
        apply_s2a(Plain(), modules="prompt", head="fc", blocks="decoder.*", input_size=(5, 16))


class _MlpBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + F.gelu(self.fc(self.norm(x)))


class ChannelsLast(nn.Module):
    """Swin-V2 / MambaOut style: a conv stem, then blocks on (B, H, W, C) maps."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[_MlpBlock(dim) for _ in range(3)])
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


@pytest.mark.parametrize("size", [(3, 32, 32), (3, 32, 48)], ids=["square", "wide"])
def test_channels_last_blocks_are_read_as_channels_last(size):
    # (B, 8, 8, 24) blocks were taken for (B, C=8, H=8, W=24): a pooled side network of
    # width 8 // 4 = 2 read each image row as a channel, and nothing said so.
    model = ChannelsLast()
    with apply_s2a(model, modules="side", head="fc", input_size=size) as h:
        assert [b.layout for b in h.structure.blocks] == ["nhwc"] * 3
        assert h.structure.side_rule.startswith("pooled, width 8,")  # 24 // 4, at least 8
        assert model.s2a_side.proj[0].in_features == 6  # each tap pooled to 24 // 4 channels
        x = torch.randn(2, *size)
        assert model(x).shape == (2, 5)
    # channels-first maps of the same sizes stay channels first
    resnet = timm.create_model("resnet10t", num_classes=5)
    with apply_s2a(resnet, modules="side", input_size=size) as h:
        assert {b.layout for b in h.structure.blocks} == {"nchw"}
        assert resnet(torch.randn(2, *size)).shape == (2, 5)


class _TwoStagesChannelsLast(nn.Module):
    """torchvision Swin at 384 px in small: a first stage whose (B, 8, 8, 8) maps read both
    ways (C == H == W), then a merged stage on (B, 4, 4, 32) maps, channels last."""

    def __init__(self, second_stage: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.first = nn.Sequential(_MlpBlock(8), _MlpBlock(8))
        self.second = nn.Sequential(_MlpBlock(32), _MlpBlock(32)) if second_stage else None
        self.fc = nn.Linear(32 if second_stage else 8, 5)

    def forward(self, x):
        x = self.first(self.stem(x).permute(0, 2, 3, 1))
        if self.second is not None:
            b, h, w, c = x.shape  # 2x2 patch merging
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
            x = self.second(x.reshape(b, h // 2, w // 2, 4 * c))
        return self.fc(x.mean((1, 2)))


def test_a_map_that_reads_both_ways_takes_the_layout_of_the_other_blocks():
    # (B, 8, 8, 8) was read channels first, PyTorch's convention: the side averaged image
    # rows as channels, and nothing said so.
    model = _TwoStagesChannelsLast()
    blocks = ["first.0", "first.1", "second.0", "second.1"]
    with apply_s2a(model, modules="side", head="fc", blocks=blocks, input_size=(3, 32, 32)) as h:
        assert [b.layout for b in h.structure.blocks] == ["nhwc"] * 4
    # no other 4-D block: a forward at twice the size tells (spatial dimensions grow)
    alone = _TwoStagesChannelsLast(second_stage=False)
    with apply_s2a(alone, modules="side", head="fc", blocks="first.*", input_size=(3, 32, 32)) as h:
        assert {b.layout for b in h.structure.blocks} == {"nhwc"}
    convs = _Wrapped(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)))
    with apply_s2a(
        convs, modules="prompt", head=None, blocks="inner.*", input_size=(3, 16, 16)
    ) as h:
        assert {b.layout for b in h.structure.blocks} == {"nchw"}
    # a model that takes one size only: an error naming the field that says it
    fixed = _FixedSize(alone)
    with pytest.raises(
        ValueError,
        match=r"reads as channels first or channels last alike.*"
        r"block_layout='nchw'",
    ):
        apply_s2a(
            fixed, modules="side", head="inner.fc", blocks="inner.first.*", input_size=(3, 32, 32)
        )
    with apply_s2a(
        fixed,
        modules="side",
        head="inner.fc",
        blocks="inner.first.*",
        block_layout="nhwc",
        input_size=(3, 32, 32),
    ) as h:
        assert {b.layout for b in h.structure.blocks} == {"nhwc"}


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class _FixedSize(_Wrapped):
    def forward(self, x):
        assert x.shape[-2:] == (32, 32), "this model takes 32x32 images only"
        return self.inner(x)


class _Dense(nn.ModuleDict):
    """A DenseNet-style block (timm's DenseBlock): its forward runs every child it holds."""

    def __init__(self) -> None:
        super().__init__({"l1": nn.Linear(16, 16), "l2": nn.Linear(16, 16)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = x + torch.tanh(layer(x))
        return x


def test_a_prompt_on_a_container_block_is_added_once_and_held_outside_it(tmp_path):
    # A prompt module added to a Sequential block ran as its last layer, and the hook added
    # the prompt a second time; a DenseNet-style block called it with its own input.
    from lightning_s2a import load_adapter, save_adapter

    torch.manual_seed(0)
    model = Plain().double()
    model.encoder[1] = _Dense().double()
    base = copy.deepcopy(model)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    config = S2AConfig(modules="prompt", head="fc", blocks="encoder.*", input_size=(5, 16))
    handle = apply_s2a(model, config)
    names = [f"s2a_prompt_encoder_{i}" for i in range(3)]
    assert sorted(n for n, _ in model.named_children() if n.startswith("s2a")) == names
    assert all("s2a" not in n for n, _ in model.encoder.named_modules())
    prompts = [getattr(model, n) for n in names]
    with torch.no_grad():
        for prompt in prompts:
            prompt.B.normal_()  # B starts at zero: make each prompt count
    h = x
    for block, prompt in zip(base.encoder, prompts, strict=True):
        h = block(h) + prompt.prompt()  # each prompt added once, after its block
    torch.testing.assert_close(model(x), base.fc(h.mean(1)), rtol=0, atol=1e-12)
    model(x).sum().backward()
    assert all(p.A.grad.abs().sum() > 0 and p.B.grad.abs().sum() > 0 for p in prompts)
    assert "prompt" in handle.summary().split("part")[1]
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    handle.remove()
    assert not any(n.startswith("s2a") for n, _ in model.named_children())


def test_a_model_that_runs_its_children_cannot_hold_a_prompt_or_side():
    def unit() -> nn.Sequential:
        return nn.Sequential(nn.Linear(16, 16), nn.GELU())

    model = nn.Sequential(unit(), unit(), nn.Linear(16, 4))
    for modules in ("prompt", "side"):
        config = S2AConfig(modules=modules, head="2", blocks=["0", "1"], input_size=(5, 16))
        with pytest.raises(
            ValueError,
            match=r"forward of Sequential.*runs its children.*Wrap the model in an nn.Mod",
        ):
            apply_s2a(model, config)
        assert len(model) == 3 and all(p.requires_grad for p in model.parameters())  # undone
    # A block that is no container holds its own prompt, whatever its parent is.
    config = S2AConfig(modules="prompt", head="2", blocks=["0.0", "1.0"], input_size=(5, 16))
    with apply_s2a(model, config):
        assert [n for n, _ in model.named_modules() if n.endswith("s2a_prompt")] == [
            "0.0.s2a_prompt",
            "1.0.s2a_prompt",
        ]
        assert model(torch.randn(2, 5, 16)).shape == (2, 5, 4)


class _LoopStage(nn.Module):
    """timm's RegStage: no container, but its forward runs every child it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Linear(16, 16)
        self.b2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = torch.tanh(block(x))
        return x


class _Looped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s1, self.s2 = _LoopStage(), _LoopStage()
        self.act = nn.ReLU()  # a block without parameters
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.s2(self.s1(x))).mean(1))


def test_a_prompt_on_a_block_that_runs_its_children_is_held_by_its_parent():
    torch.manual_seed(0)
    model = _Looped().double()
    base = copy.deepcopy(model)
    blocks = ["s1", "s2", "act", "s1"]  # s1 named twice: one prompt
    config = S2AConfig(modules="prompt", head="fc", blocks=blocks, input_size=(5, 16))
    with apply_s2a(model, config) as handle:
        held = sorted(n for n, _ in model.named_modules() if "s2a_prompt" in n)
        # the loops' prompts live in the model; the ReLU holds its own, in the model's dtype
        assert held == ["act.s2a_prompt", "s2a_prompt_s1", "s2a_prompt_s2"]
        assert model.act.s2a_prompt.A.dtype == torch.float64
        assert [b.name for b in handle.structure.blocks] == ["s1", "s2", "act"]
        prompts = [model.s2a_prompt_s1, model.s2a_prompt_s2, model.act.s2a_prompt]
        with torch.no_grad():
            for prompt in prompts:
                prompt.B.normal_()
        x = torch.randn(3, 5, 16, dtype=torch.float64)
        h = base.s1(x) + prompts[0].prompt()  # each prompt once, after its block
        h = base.s2(h) + prompts[1].prompt()
        h = base.act(h) + prompts[2].prompt()
        torch.testing.assert_close(model(x), base.fc(h.mean(1)), rtol=0, atol=1e-12)


def test_an_adapter_with_prompts_inside_a_looping_block_says_why_it_does_not_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lightning_s2a import load_adapter, save_adapter

    torch.manual_seed(0)
    model = _Looped()
    base = copy.deepcopy(model)
    config = S2AConfig(modules="prompt", head="fc", blocks=["s1", "s2"], input_size=(5, 16))
    with apply_s2a(model, config):
        save_adapter(model, tmp_path / "new.safetensors")
    # the names the previous version gave these prompts (inside s1 and s2, run twice)
    tensors = load_file(tmp_path / "new.safetensors")
    with safe_open(tmp_path / "new.safetensors", "pt") as f:
        metadata = f.metadata()
    old = {
        k.replace("s2a_prompt_s1.", "s1.s2a_prompt.").replace("s2a_prompt_s2.", "s2.s2a_prompt."): v
        for k, v in tensors.items()
    }
    save_file(old, tmp_path / "old.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"prompts sit inside blocks that run their children"):
        load_adapter(copy.deepcopy(base), tmp_path / "old.safetensors")
    load_adapter(copy.deepcopy(base), tmp_path / "new.safetensors").remove()


def test_prompts_are_made_like_their_block_output_before_frozen_weights_are_cast():
    # A prompt took the dtype of its block's first parameter after the cast (bf16 on a
    # Linear block), or of the model's (a ReLU block): trainable parameters in bf16/fp16,
    # which a GradScaler refuses to unscale.
    model = _Looped()
    config = S2AConfig(
        modules="prompt",
        head="fc",
        blocks=["s2", "act"],
        input_size=(5, 16),
        frozen_dtype="bfloat16",
    )
    with apply_s2a(model, config):
        assert model.s2.b1.weight.dtype == torch.bfloat16  # the frozen weights were cast
        prompts = {n: p.dtype for n, p in model.named_parameters() if "s2a_prompt" in n}
        assert len(prompts) == 4 and set(prompts.values()) == {torch.float32}


def test_the_dry_forward_puts_back_each_module_s_own_mode():
    # model.train(was_training) after the dry forward turned a user's eval-mode submodule
    # (a frozen BatchNorm, a disabled dropout) back to training.
    model = _Looped()
    model.s1.eval()
    config = S2AConfig(modules="prompt", head="fc", blocks=["s1", "s2"], input_size=(5, 16))
    with apply_s2a(model, config):
        assert model.training and model.s2.training
        assert not model.s1.training and not model.s1.b1.training


def test_bias_works_on_any_module_without_blocks():
    model = Plain()
    with apply_s2a(model, head="fc") as handle:
        model(torch.randn(3, 5, 16)).sum().backward()
        assert handle.stats()["by_kind"]["elementwise"]["tensors"] == 3


class Recurrent(nn.Module):
    def __init__(self, rnn: type[nn.RNNBase]):
        super().__init__()
        self.rnn = rnn(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0].mean(1))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_biases_train_under_bias(rnn):
    """nn.LSTM/GRU name their biases bias_ih_l0, bias_hh_l1_reverse, ...: biases all the same."""
    model = Recurrent(rnn)
    biases = {
        f"rnn.bias_{g}_l{k}{d}" for g in ("ih", "hh") for k in (0, 1) for d in ("", "_reverse")
    }
    assert biases <= {n for n, _ in model.named_parameters()}
    with apply_s2a(model, modules=["bias"], head="fc"):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == biases | {"fc.weight", "fc.bias"}
        model(torch.randn(2, 5, 6)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in biases)
    frozen = [n for n in grads if n.startswith("rnn.weight_")]
    assert len(frozen) == 8 and all(grads[n] is None for n in frozen)


class UserAttention(nn.Module):
    """A user's encoder on ``nn.MultiheadAttention``, whose q/k/v bias is ``in_proj_bias``."""

    def __init__(self, **attn):
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, **attn)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.classifier = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.classifier((h + self.mlp(h)).mean(1))


@pytest.mark.parametrize("kv", [False, True])
def test_multihead_attention_in_proj_bias_trains_under_bias(kv):
    """BitFit trains every bias: MHA's packed ``in_proj_bias`` too, and with
    ``add_bias_kv=True`` its ``bias_k``/``bias_v`` (frozen, silently, until 2026-12-07), with
    the uncompressed run's gradients (float64, 8 bits, so the codes' error is small)."""
    torch.manual_seed(0)
    model = UserAttention(add_bias_kv=kv).double()
    x = torch.randn(4, 40, 6, dtype=torch.float64)
    names = ["in_proj_bias", *(["bias_k", "bias_v"] if kv else [])]
    grads = {}
    for compress in (False, True):
        cfg = S2AConfig(modules=["bias"], head="classifier", bits=8, compress=compress)
        with apply_s2a(model, cfg):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            grads[compress] = torch.cat([getattr(model.attn, n).grad.reshape(-1) for n in names])
    assert {f"attn.{n}" for n in names} <= trainable and "attn.in_proj_weight" not in trainable
    exact, coded = grads[False], grads[True]
    assert exact.abs().sum() > 0
    assert (coded - exact).norm() <= 0.02 * exact.norm()


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_recurrent_layers_save_only_codable_tensors(rnn):
    """oneDNN's LSTM (CPU) saves an opaque uint8 workspace no code can hold; while the engine
    compresses, recurrent layers run on PyTorch's own kernels, whose float gates and states
    are coded: every saved tensor the engine sees is floating, and the gradient stays close
    to the uncompressed run's."""
    torch.manual_seed(0)
    model = Recurrent(rnn)
    model.rnn = rnn(32, 64, num_layers=2, bidirectional=True, batch_first=True)
    model.fc = nn.Linear(128, 3)
    x = torch.randn(32, 20, 32)
    dtypes = Counter()
    with apply_s2a(model, modules=["bias"], head="fc", compress=False):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        exact = trainable_grads_of(model)
    with apply_s2a(model, modules=["bias"], head="fc") as handle:
        pack = handle.engine._pack_activation

        def spy(t):
            dtypes[t.dtype] += t.numel()
            return pack(t)

        handle.engine._pack_activation = spy
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        coded = trainable_grads_of(model)
        stats = handle.stats()
    assert set(dtypes) == {torch.float32} and mkldnn_state_is_kept()
    assert stats["stored_bytes"] < 0.3 * stats["raw_bytes"]
    assert_close_in_norm(coded, exact, rel=0.01)


def test_beit_separate_q_and_v_biases_train_under_bias():
    model = timm.create_model(
        "beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    with apply_s2a(model, modules=["bias"]):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= trainable
    assert "blocks.0.attn.relative_position_bias_table" not in trainable  # no additive bias


class RecurrentHead(nn.Module):
    """A frozen encoder and a trainable LSTM head: its weights reach the op inside a list."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.GELU())
        self.head = nn.LSTM(32, 16, batch_first=True)

    def forward(self, x):
        return self.head(self.encoder(x))[0].mean(1)


def test_a_trainable_recurrent_heads_inputs_stay_exact():
    """The head's weight gradients need its exact inputs and gates: the op is recognised as
    trainable although its weights arrive in a list (float64: the codes elsewhere do not
    touch the head's own gradients)."""
    torch.manual_seed(0)
    model = RecurrentHead().double()
    x = torch.randn(32, 12, 8, dtype=torch.float64)
    grads = {}
    for compress in (False, True):
        with apply_s2a(model, modules=["bias"], head="head", compress=compress):
            model.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            grads[compress] = torch.cat([p.grad.flatten() for p in model.head.parameters()])
    assert_close_in_norm(grads[True], grads[False], rel=1e-12)


def trainable_grads_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def mkldnn_state_is_kept() -> bool:
    """The rewrite puts oneDNN's and cuDNN's switches back as they were."""
    return torch._C._get_mkldnn_enabled() and torch._C._get_cudnn_enabled()


def test_is_bias_knows_recurrent_names():
    from lightning_s2a.engine.ops import is_bias

    cell = {n for n, _ in nn.LSTMCell(3, 4).named_parameters() if is_bias(n)}
    assert cell == {"bias_ih", "bias_hh"}
    names = ("bias", "fc.bias", "rnn.bias_ih_l0", "rnn.bias_hh_l12_reverse", "in_proj_bias")
    for name in (*names, "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"):
        assert is_bias(name), name
    for name in ("rnn.weight_ih_l0", "bias_ih_l", "bias_ih_lx", "biases", "fc.bias_scale"):
        assert not is_bias(name), name


def test_add_bias_and_remove_restore_the_model():
    model = timm.create_model("resnet18", num_classes=10)
    names = [n for n, _ in model.named_parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.conv1.bias is None
    with apply_s2a(model, add_bias=True):
        assert model.conv1.bias is not None and model.conv1.bias.requires_grad
        assert torch.equal(model.conv1.bias, torch.zeros(64))
    assert model.conv1.bias is None
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_add_bias_adds_none_a_forward_never_reads():
    """EVA's attention computes F.linear(x, qkv.weight, cat(q_bias, 0, v_bias)): a bias added
    to qkv was a trainable parameter that never got a gradient, counted as trained."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", num_classes=5, depth=2, img_size=28)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].attn.q_bias is not None
    with pytest.warns(UserWarning, match=r"add_bias: 2 layers' forwards never read a bias "):
        handle = apply_s2a(model, add_bias=True)
    assert all(block.attn.qkv.bias is None for block in model.blocks)
    added = [getattr(m, attr) for m, attr in handle.structure.added_biases]
    model.train()
    model(torch.randn(2, 3, 28, 28)).sum().backward()
    # every trainable parameter trains: q_bias and v_bias among them, and what was added
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.blocks[0].attn.q_bias.grad is not None
    assert all(b.grad is not None for b in added)
    handle.remove()
    assert all(block.attn.qkv.bias is None for block in model.blocks)


class _BiasFreeAttention(nn.Module):
    """nn.MultiheadAttention built with bias=False (packed or separate q/k/v weights)."""

    def __init__(self, kdim: int | None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, bias=False, batch_first=True, kdim=kdim, vdim=kdim)
        self.keys = nn.Linear(8, kdim or 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.keys(x)
        return self.head(self.attn(x, k, k, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("kdim", [None, 6])
def test_add_bias_gives_multihead_attention_its_in_projection_bias(kdim):
    """Its q, k and v projections compute with ``in_proj_bias``, which is no Linear's bias:
    add_bias gave out_proj one and left these three without, silently."""
    torch.manual_seed(0)
    model = _BiasFreeAttention(kdim).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    before = model(x)
    handle = apply_s2a(model, add_bias=True, head="head", input_size=(5, 8))
    attn = model.attn
    assert attn.in_proj_bias.shape == (24,) and attn.out_proj.bias.shape == (8,)
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)  # zero biases
    model(x).sum().backward()
    assert attn.in_proj_bias.grad is not None and attn.in_proj_bias.grad.abs().sum() > 0
    assert "attn.in_proj_bias" in {n for n, p in model.named_parameters() if p.requires_grad}
    handle.remove()
    assert attn.in_proj_bias is None and attn.out_proj.bias is None and model.keys.bias is None


class _AuxNet(nn.Module):
    """An auxiliary head that only the training branch runs (Inception's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.aux = nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 8, 1, bias=False)
        self.head, self.aux_head = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        out = self.head(h.mean((2, 3)))
        if self.training:
            return out + self.aux_head(F.relu(self.aux(h)).mean((2, 3)))
        return out


class _CatBias(nn.Module):
    """Biases its forward reads through torch.cat (a list argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x.flatten(1)[:, :8]
        b = torch.cat([self.q.bias, self.v.bias]) if self.q.bias is not None else 0
        return self.head(torch.cat([x @ self.q.weight.T, x @ self.v.weight.T], 1) + b)


class _MoE(nn.Module):
    """Top-1 routing: a zero input sends every token to one expert."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(12, 4)
        self.experts = nn.ModuleList(nn.Linear(12, 12, bias=False) for _ in range(4))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = x.flatten(1)[:, :12]
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            if (choice == i).any():
                out[choice == i] = expert(x[choice == i])
        return self.head(out)


@pytest.mark.parametrize("model_class", [_AuxNet, _CatBias, _MoE])
def test_add_bias_keeps_biases_the_dry_forward_cannot_rule_out(model_class):
    """The first version dropped a bias the eval forward on zeros did not read: an auxiliary
    head's (training only), one read through torch.cat, an expert's that zeros never route
    to. A bias is dropped only where the layer's weight was read and its bias was not."""
    torch.manual_seed(0)
    model = model_class()
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    without = [m for m in layers if m.bias is None]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="add_bias")
        handle = apply_s2a(model, add_bias=True, head="head", input_size=(3, 8, 8))
    assert all(m.bias is not None and m.bias.requires_grad for m in without)
    handle.remove()


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_batch_norm_mode(bn_mode):
    model = timm.create_model("resnet18", num_classes=10).train()
    model.layer1[0].bn1.eval()  # a user's own choice: this one stays in eval mode
    before = model.bn1.running_mean.clone()
    seen = []
    with apply_s2a(model, bn_mode=bn_mode):
        # registered after S2A's own hook: sees the mode the call runs in
        model.bn1.register_forward_pre_hook(lambda m, a: seen.append(m.training))
        model(torch.randn(2, *SIZE))
        assert seen == [bn_mode == "train"]
        assert model.bn1.training  # outside the call: the mode model.train() set
        assert not model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, before) == (bn_mode == "eval")
    assert model.bn1.training and not model.layer1[0].bn1.training  # as the user left them


def test_summary_table():
    model = SMALL["vit"]()
    with apply_s2a(model, modules="bias+prompt", input_size=SIZE) as handle:
        model(torch.randn(2, *SIZE)).sum().backward()
        text = handle.summary()
        count, _ = handle.trainable_parameters()
    assert "modules=bias+prompt bits=4" in text
    for part in ("backbone", "prompt", "head", "total"):
        assert any(line.startswith(part) for line in text.splitlines()), part
    assert f"{count:,}" in text


def _record_output(into: dict, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    into["side"] = out


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "levit_128s"])
def test_distilled_models_train_both_heads(name):
    """``get_classifier()`` of a distilled model returns two heads: both stay trainable."""
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "depth": 2} if name.startswith("deit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).train()
    size = 32 if name.startswith("deit") else 224
    x = torch.randn(2, 3, size, size)
    heads = [model.head, model.head_dist]
    heads_names = {"head", "head_dist"}
    with apply_s2a(model, S2AConfig(modules=["bias"])) as handle:
        for head in heads:
            assert all(p.requires_grad for p in head.parameters())
        F.cross_entropy(model(x), torch.tensor([1, 3])).backward()
        assert all(p.grad is not None for h in heads for p in h.parameters())
        assert set(handle.stats()["by_part"]) == {"backbone", "head"}
        weights = [n for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
        assert {n.split(".")[0] for n in weights} == {"head", "head_dist"}
    # 'side' replaces every head's output (the model averages them): the output is the
    # side's; with side_merge="add" both heads train under it. Naming one head is refused:
    # the other would be averaged in, frozen (it was, silently, before 2026-12-06).
    blocks = "blocks.*" if name.startswith("deit") else "stages.*"
    side = S2AConfig(modules=["side"], input_size=(3, size, size), blocks=blocks)
    model.eval()
    for merge in ("replace", "add"):
        with apply_s2a(model, side.replace(side_merge=merge)) as handle:
            seen: dict = {}
            model.s2a_side.register_forward_hook(partial(_record_output, seen))
            out = model(x)
            if merge == "replace":
                assert torch.equal(out, seen["side"])
            trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
            assert trained == ({"s2a_side"} if merge == "replace" else {"s2a_side", *heads_names})
            assert handle.stats() is not None
    with pytest.raises(ValueError, match=r"head='head'.*2 heads.*averages.*head='auto'"):
        apply_s2a(model, side.replace(head="head"))
    assert all(p.requires_grad for p in model.parameters())  # undone: flags as they were


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "rule"),
    [
        ("eva02_tiny_patch14_224", {"img_size": 28}, 28, "repeated blocks: 12 x EvaBlock"),
        # its 24 main blocks, not its 2 class-attention blocks
        ("cait_xxs24_224", {"img_size": 32}, 32, "repeated blocks: 24 x LayerScaleBlock"),
        ("xcit_nano_12_p16_224", {"img_size": 32}, 32, "repeated blocks: 12 x XCABlock"),
        ("pvt_v2_b0", {}, 64, "repeated blocks: 8 x Block"),  # stages.*.blocks.*
        ("levit_128s", {"img_size": 64}, 64, "repeated blocks: 9 x LevitBlock"),
        # each stage a Sequential of a downsampling conv, then its blocks (one alone in 3 of 4)
        ("starnet_s050", {}, 32, "repeated blocks: 6 x Block"),
        # blocks are attributes b1, b2... of a stage, in no list: the stages feature_info names
        ("regnetx_002", {}, 32, "timm feature_info: 5 levels"),
    ],
)
def test_prompt_finds_the_repeated_blocks_of_families_outside_the_table(name, kwargs, size, rule):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    config = S2AConfig(modules=["bias", "prompt"], input_size=(3, size, size))
    with apply_s2a(model, config) as handle:
        F.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([1, 2])).backward()
        grad_by_block: dict[str, float] = {}  # by prompt: blocks.3.s2a_prompt, s2a_prompt_s1
        for n, p in model.named_parameters():
            if "s2a_prompt" in n:
                block = n.rpartition(".")[0]
                grad_by_block[block] = grad_by_block.get(block, 0.0) + float(p.grad.abs().sum())
        assert len(grad_by_block) == int(rule.split(": ")[1].split()[0])
        assert all(g > 0 for g in grad_by_block.values())  # every block's prompt learns
        assert rule in handle.summary()


def test_the_input_size_is_read_from_a_patch_embedding_of_several_convs():
    """XCiT's ConvPatchEmbed projects with a stack of convs: built with img_size=32 it was
    sized for 224 and refused its own 32 px as a changed resolution."""
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, num_classes=5)
    with apply_s2a(model, modules="prompt") as handle:
        assert handle.structure.input_size == (3, 32, 32)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


class _Stacked(nn.Module):
    """A user's own model: a ModuleList of blocks, and a Sequential of activations."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.acts = nn.Sequential(nn.GELU(), nn.GELU(), nn.GELU())
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.trunk = nn.ModuleList(_Residual() for _ in range(4))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.acts(self.embed(x))
        for block in self.trunk:
            h = block(h)
        return self.head(h.mean(1))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x).relu()


def test_repeated_blocks_of_a_user_model_are_its_largest_block_list():
    from lightning_s2a.structure.families import find_blocks

    model = _Stacked()
    blocks, _, rule = find_blocks(model, None)
    # trunk's 4 blocks win over layers' 3 Sequentials (lists of lists are stages, not blocks)
    # and over the parameter-free activations.
    assert [b.name for b in blocks] == [f"trunk.{i}" for i in range(4)]
    assert rule == "repeated blocks: 4 x _Residual"
    handle = apply_s2a(model, S2AConfig(modules=["prompt"], head="head", input_size=(5, 6)))
    assert "blocks (4): repeated blocks: 4 x _Residual" in handle.summary()
    handle.remove()


class _Staged(nn.Module):
    """A model with no repeated blocks (each stage a different class), whose timm-style
    ``feature_info`` names its stages."""

    def __init__(self, names: list[str] | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Linear(16, 3)
        names = names or ["stage1", "stage2"]
        self.feature_info = [
            {"num_chs": 8, "reduction": 1, "module": names[0]},
            {"num_chs": 16, "reduction": 2, "module": names[1]},
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def test_blocks_of_a_model_without_repeated_blocks_come_from_its_feature_info():
    from lightning_s2a.structure.families import find_blocks

    torch.manual_seed(0)
    model = _Staged()
    blocks, _, rule = find_blocks(model, None)
    assert [b.name for b in blocks] == ["stage1", "stage2"]
    assert rule == "timm feature_info: 2 levels"
    config = S2AConfig(modules=["prompt"], head="head", input_size=(3, 8, 8))
    with apply_s2a(model, config) as handle:
        assert "blocks (2): timm feature_info: 2 levels" in handle.summary()
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        # the stages are Sequentials, so the model holds their prompts
        prompted = {
            n.removesuffix(".B")
            for n, p in model.named_parameters()
            if n.endswith(".B") and p.grad is not None and p.grad.abs().sum() > 0
        }
        assert prompted == {"s2a_prompt_stage1", "s2a_prompt_stage2"}  # both prompts learn
    # timm's features_only models keep the list in FeatureInfo.info
    wrapped = _Staged()
    wrapped.feature_info = type("FeatureInfo", (), {"info": wrapped.feature_info})()
    assert [b.name for b in find_blocks(wrapped, None)[0]] == ["stage1", "stage2"]
    with pytest.raises(ValueError, match=r"feature_info names \['stage9'\].*S2AConfig\(blocks="):
        find_blocks(_Staged(["stage1", "stage9"]), None)
    no_info = _Staged()
    del no_info.feature_info
    with pytest.raises(ValueError, match=r"cannot find the blocks of _Staged.*feature_info"):
        find_blocks(no_info, None)


class _ConvUnit(nn.Module):
    """A conv-norm-act unit (timm's ConvNormAct): one weight layer."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _Branchy(nn.Module):
    """An Inception-like block: a branch of three conv units beside a 1x1 conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.branch = nn.Sequential(*[_ConvUnit(c) for _ in range(3)])
        self.skip = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.skip(x)


class _Inceptionish(nn.Module):
    def __init__(self, with_info: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(_ConvUnit(4), _ConvUnit(4))
        # blocks between reduction convs: no two of one class in a row
        self.features = nn.Sequential(
            nn.Conv2d(4, 4, 1), _Branchy(), nn.Conv2d(4, 4, 1), _Branchy()
        )
        if with_info:
            self.feature_info = [{"module": "stem"}, {"module": "features"}]


def test_feature_info_names_of_a_flattened_features_only_model_are_found():
    from lightning_s2a.structure.families import find_blocks

    model = _Staged()  # timm's features_only models flatten "stage.1" to "stage_1"
    model.stage_1 = model.stage1
    del model.stage1
    info = [{"module": "stage.1"}, {"module": "stage2"}]
    model.feature_info = type("FeatureInfo", (), {"info": info})()  # as features_only has it
    found, _, _ = find_blocks(model, None)
    assert [b.name for b in found] == ["stage_1", "stage2"]
    # a plain model's list is taken as it is: "stage.1" is missing, "stage_1" is not it
    model.feature_info = info
    with pytest.raises(ValueError, match=r"feature_info names \['stage.1'\]"):
        find_blocks(model, None)


def test_a_features_only_backbone_is_told_to_pass_head_none():
    """head='auto' on timm's features_only ViT suggested its last Linear as the head: a
    block's MLP layer, which would then have trained as one."""
    model = timm.create_model("vit_tiny_patch16_224", features_only=True, img_size=32)
    with pytest.raises(ValueError, match=r"Pass head=None .* a layer of a block, no head"):
        apply_s2a(model)
    with apply_s2a(model, head=None) as handle:
        assert handle.trainable_parameters()[0] > 0  # its biases


def test_blocks_of_several_weight_layers_win_over_more_numerous_conv_units():
    from lightning_s2a.structure.families import find_blocks

    # Two blocks of 4 convolutions each, never two in a row, beside 8 conv-norm-act units:
    # with feature_info its stages are taken, without it the units (what repeats most).
    found, _, rule = find_blocks(_Inceptionish(with_info=True), None)
    assert [b.name for b in found] == ["stem", "features"]
    assert rule == "timm feature_info: 2 levels"
    found, _, rule = find_blocks(_Inceptionish(with_info=False), None)
    assert rule == "repeated blocks: 8 x _ConvUnit"
    # Blocks in a row win over the more numerous units inside them, also after another layer.
    model = _Inceptionish(with_info=True)
    model.features = nn.Sequential(nn.Conv2d(4, 4, 1), _Branchy(), _Branchy(), _Branchy())
    found, _, rule = find_blocks(model, None)
    assert [b.name for b in found] == ["features.1", "features.2", "features.3"]
    assert rule == "repeated blocks: 3 x _Branchy"


class _Stage(nn.Module):
    def __init__(self, first: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(first, _Branchy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_on_a_tie_the_finer_blocks_win_and_a_lone_block_of_their_class_is_taken():
    from lightning_s2a.structure.families import find_blocks

    # Two stages, and two blocks in a row in the first only: 2 stages against 2 blocks.
    model = nn.Module()
    model.stages = nn.Sequential(_Stage(_Branchy()), _Stage(nn.Conv2d(4, 4, 1)))
    found, _, rule = find_blocks(model, None)
    assert rule == "repeated blocks: 3 x _Branchy"
    assert [b.name for b in found] == [
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1.blocks.1",
    ]


class _PairBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


class _PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_PairBlock() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x, _ = block(x)
        return self.head(x)


def test_blocks_that_return_tuples_are_a_clear_error():
    model = _PairNet()
    with pytest.raises(ValueError, match=r"blocks \['blocks.0', .*return \['tuple'\].*blocks="):
        apply_s2a(model, S2AConfig(modules=["prompt"], head="head", input_size=(4, 8)))
    assert all(p.requires_grad for p in model.parameters())
    # no get_classifier(): the error names the model's last Linear as the likely head
    with pytest.raises(
        ValueError, match=r"Name the head, its last Linear: S2AConfig\(head='head'\)"
    ):
        apply_s2a(model, S2AConfig())


def test_head_auto_suggests_an_mlp_head_whole_not_its_last_linear():
    """A user's two-layer head ``classifier = nn.Sequential(Linear, ReLU, Linear)``: the
    error suggested ``head='classifier.2'``, and following it left ``classifier.0`` frozen,
    silently. A Sequential of Linears and parameter-free or vector-only layers ending in the
    last Linear is suggested whole; a convolutional stack ending in one is not."""
    model = nn.Sequential()
    model.encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.classifier = nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4)
    )
    with pytest.raises(ValueError, match=r"the MLP head that ends in its last Linear: "
                       r"S2AConfig\(head='classifier'\)"):  # fmt: skip
        apply_s2a(model, S2AConfig())
    with apply_s2a(model, S2AConfig(head="classifier")):  # the suggestion trains it all
        assert all(p.requires_grad for p in model.classifier.parameters())
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"its last Linear: S2AConfig\(head='3'\)"):
        apply_s2a(net, S2AConfig())


class _SequenceNet(nn.Module):
    """A user's transformer on (batch, tokens, features) input, built from PyTorch's
    encoder layers (sequence first unless ``batch_first=True``)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("modules", [["prompt"], ["side"]])
def test_sequence_first_blocks_are_a_clear_error_and_batch_first_ones_keep_samples_apart(
    modules,
):
    """Sequence-first blocks (S, N, D) were read as one sample of N tokens: a pooled side
    averaged over the batch (one sample's output moved with another's, and came out per
    token) and a prompt failed at the first batch of two with a message about resolution."""
    torch.manual_seed(0)
    config = S2AConfig(modules=modules, head="head", input_size=(5, 6))
    model = _SequenceNet(batch_first=False).double()
    with pytest.raises(ValueError, match=r"encoder.layers.0 \(5, 2, 16\).*batch_first=True"):
        apply_s2a(model, config)
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed

    model = _SequenceNet(batch_first=True).double()
    apply_s2a(model, config)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    other = x.clone()
    other[1:] += 1.0
    with torch.no_grad():
        out, moved = model(x), model(other)
    assert out.shape == (3, 3)
    assert_close_in_norm(moved[0], out[0], 1e-12)  # sample 0 does not see the others
    assert (moved[1:] - out[1:]).abs().max() > 1e-3


class _FoldedNet(nn.Module):
    """Runs each of 4 patches of a sample through its blocks as a sample of its own
    (MobileViT's transformer): the blocks' outputs have 4 rows per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4, 5, 6)
        h = self.encoder(self.embed(x).flatten(0, 1))  # (4 B, 5, 16)
        return self.head(h.unflatten(0, (-1, 4)).mean((1, 2)))


def test_blocks_that_fold_the_batch_take_a_prompt_but_no_side():
    torch.manual_seed(0)
    model = _FoldedNet().double()
    with pytest.raises(ValueError, match=r"encoder.layers.0 \(8, 5, 16\).*fold the batch"):
        apply_s2a(model, modules=["side"], head="head", input_size=(4, 5, 6))
    apply_s2a(model, modules=["prompt"], head="head", input_size=(4, 5, 6))
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    other = x.clone()
    other[1:] += 1.0
    with torch.no_grad():
        out, moved = model(x), model(other)
    assert out.shape == (3, 3)
    assert_close_in_norm(moved[0], out[0], 1e-12)


class _PaddedEncoder(nn.Module):
    """nn.TransformerEncoder as built by default (enable_nested_tensor=True), with a mask."""

    def __init__(self, nested: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask)[:, 0])


def test_a_prompt_fed_a_nested_tensor_says_how_to_keep_the_positions():
    """In eval mode without autograd, nn.TransformerEncoder packs a masked batch into a
    nested tensor: a validation step failed on PyTorch's "NestedTensorImpl doesn't support
    sizes. Please file an issue"."""
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5, 6), torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    for nested in (True, False):
        model = _PaddedEncoder(nested)
        apply_s2a(model, modules=["prompt"], head="head", input_size=(5, 6))
        model(x, mask).sum().backward()  # training: no nested tensor
        model.eval()
        with torch.no_grad():
            if nested:
                with pytest.raises(RuntimeError, match="enable_nested_tensor=False"):
                    model(x, mask)
            else:
                assert model(x, mask).shape == (3, 3)


def test_a_deep_copy_runs_its_own_side_network():
    """An EMA/SWA-style copy made after apply_s2a: its hooks must use the copy's side network,
    not the original's (closures kept pointing at the original)."""
    torch.manual_seed(0)
    model = SMALL[next(iter(SMALL))]().eval()
    handle = apply_s2a(model, modules="side", input_size=SIZE)
    copy_ = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for p in copy_.s2a_side.parameters():
            p.add_(0.5)
        x = torch.randn(2, *SIZE)
        assert not torch.allclose(copy_(x), model(x))
        before = model(x)
        copy_(x)
        assert torch.equal(model(x), before)
    handle.remove()


@pytest.mark.parametrize(
    "family, fields",
    [
        ("vit", {"modules": "bias"}),
        ("resnet", {"modules": "side"}),
        ("vit", {"modules": "side", "side": "hierarchical"}),
    ],
    ids=["bias", "side", "hierarchical"],
)
def test_a_deep_copy_after_training_steps_trains_like_the_original(family, fields):
    """EMA/SWA copies are made after training has run. The engine's cache then held torch's
    own descriptors (a deep copy failed on them), and a copy that shared the original's engine
    had its weights coded like activations and overwrote the original's stats."""
    torch.manual_seed(0)
    model = SMALL[family]().train()
    x, y = torch.randn(2, *SIZE), torch.tensor([1, 2])
    handle = apply_s2a(model, input_size=SIZE, **fields)
    F.cross_entropy(model(x), y).backward()
    copy_ = __import__("copy").deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copy_.eval()(x), model.eval()(x))
    model.train(), copy_.train()
    original = trainable_grads(model, x, y)
    stats = handle.stats()
    copied = trainable_grads(copy_, x, y)
    assert_close_in_norm(copied, original, 1e-6, "the copy's gradients")
    assert handle.stats() == stats  # the copy counts its bytes in its own engine
    handle.remove()
    assert not hasattr(model, "s2a_side") and hasattr(copy_, "s2a_side") == (
        "side" in fields.values()
    )


@pytest.mark.parametrize("frozen_dtype", [None, "bfloat16", "nf4"])
def test_a_deep_copy_of_a_part_copies_only_that_part(frozen_dtype):
    """copy.deepcopy(model.head) (a probe head, a teacher block) reached the engine through the
    part's hooks, and the engine holds the model: every copy took the whole model with it
    (~330 MB for a ViT-B head), and with frozen weights cast, every layer's original too."""
    torch.manual_seed(0)
    model = SMALL["vit"]().train()
    handle = apply_s2a(model, input_size=SIZE, frozen_dtype=frozen_dtype)
    originals = handle.structure.cast_originals
    assert bool(originals) == (frozen_dtype is not None)
    for name in ("head", "blocks.0"):
        outside = [*model.patch_embed.parameters()]
        outside += [t for n, t in originals.items() if not n.startswith(name + ".")]
        memo: dict = {}
        copy.deepcopy(model.get_submodule(name), memo)
        assert not any(id(t) in memo for t in outside)  # nothing outside the part came along
        assert id(model) not in memo
        own = [t for n, t in originals.items() if n.startswith(name + ".")]
        assert all(id(t) in memo for t in own)  # its own originals did: its state dict
        copied = copy.deepcopy(model.get_submodule(name)).state_dict()
        for k, v in model.get_submodule(name).state_dict().items():
            assert torch.equal(copied[k], v), k
    # the copy computes as the part does without S2A, with autograd
    head_copy, x = copy.deepcopy(model.head), torch.randn(2, model.head.in_features)
    plain = nn.Linear(model.head.in_features, model.head.out_features)
    plain.load_state_dict(model.head.state_dict())
    head_copy(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(head_copy.weight.grad, plain.weight.grad)
    handle.remove()


class _DenseHead(nn.Module):
    """A segmentation head: a Linear projection per pixel, then a 1x1 conv classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.classifier = nn.Linear(8, 32), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.classifier(self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class _Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
                for _ in range(2)
            ]
        )
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), _DenseHead()

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class _Averaged(nn.Module):
    """Hugging Face's DeiT-with-teacher layout: no get_classifier(), two parallel heads whose
    outputs the model averages."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(2)]
        )
        self.cls_classifier, self.distillation_classifier = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        h = self.blocks(x).mean(1)
        return (self.cls_classifier(h) + self.distillation_classifier(h)) / 2


def test_parallel_heads_are_named_together():
    """The side replaced the one head named, and half of every prediction came from the
    other, frozen; head='auto' suggested naming the last Linear alone."""
    both = "cls_classifier,distillation_classifier"
    with pytest.raises(ValueError, match=rf"all of its last Linears: S2AConfig\(head='{both}'\)"):
        apply_s2a(_Averaged(), input_size=(5, 16))
    with pytest.raises(ValueError, match=rf"'side' with head='cls_classifier'.*head='{both}'"):
        apply_s2a(_Averaged(), modules="side", head="cls_classifier", input_size=(5, 16))
    with pytest.warns(UserWarning, match=r"\['distillation_classifier'\] beside it"):
        apply_s2a(_Averaged(), modules="bias", head="cls_classifier").remove()
    # Linears in one list are layers in turn, not heads side by side: nothing to say
    stack = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*beside it")
        apply_s2a(stack, modules="bias", head="3").remove()
    torch.manual_seed(0)
    model, x = _Averaged(), torch.randn(2, 5, 16)
    with apply_s2a(model, modules="side", head=both, input_size=(5, 16)) as handle:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("s2a_side") for n in trainable)
        assert len(handle.structure.head) == 2
        seen = []
        model.s2a_side.register_forward_hook(lambda m, a, o: seen.append(o))
        out = model(x)
        # both heads replaced by the side's one output: their average is that output
        assert len(seen) == 1 and torch.allclose(out, seen[0], atol=1e-6, rtol=0)
        out.sum().backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


@pytest.mark.parametrize(
    ("head", "why"),
    [
        ("cls_classifier,", "an empty name"),
        (" ,cls_classifier", "an empty name"),
        ("", "is not a submodule name"),
        (" ", "names _Averaged itself"),
        ("cls_classifier,cls_classifier", "a name given twice"),
    ],
)
def test_head_names_that_would_train_the_whole_model_or_a_head_twice_are_refused(head, why):
    """A trailing comma named '' as a head, which is the model itself: everything trained
    (full fine-tuning, silently); a head named twice had the side's output added twice."""
    model = _Averaged()
    with pytest.raises(ValueError, match=re.escape(why)):
        apply_s2a(model, modules="bias", head=head)
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_a_head_inside_another_named_head_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match=r"'1\.1' inside '1'"):
        apply_s2a(model, modules="bias", head="1,1.1")


class _NoForward(nn.Module):
    """A LightningModule-style holder whose steps call its parts: no forward of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Averaged()


def test_a_model_without_forward_is_told_where_to_apply():
    """The dry forward's NotImplementedError was answered with 'pass the size your data
    have', which cannot help a module that has no forward."""
    with pytest.raises(ValueError, match=r"has no forward of its own.*backbone='<attribute>'"):
        apply_s2a(_NoForward(), modules="prompt", head="model.cls_classifier", input_size=(5, 16))


def test_side_refuses_a_dense_head():
    """The side read the head's classes from its last Linear, an inner projection of
    Segformer's decode head (32, not its 4 classes), and replaced (batch, 4, H, W) logits
    with (batch, 32) features, silently."""
    with pytest.raises(ValueError, match=r"needs a Linear head.*_DenseHead.*hierarchical"):
        apply_s2a(_Segmenter(), modules="side", head="head", input_size=(3, 16, 16))


def test_a_deep_copy_of_a_part_copies_no_other_batch_norm():
    """The held BatchNorms' hooks share one object listing all of them: a copy of one block
    copied every held BatchNorm of the model with it."""
    torch.manual_seed(0)
    model = SMALL["resnet"]()
    handle = apply_s2a(model)
    part = model.layer1[0]
    memo: dict = {}
    copied = copy.deepcopy(part, memo)
    inside = {id(m) for m in part.modules()}
    outside = [bn for bn in handle.held_batch_norms() if id(bn) not in inside]
    assert outside and not any(id(bn) in memo for bn in outside)
    copied.train()
    copied(torch.randn(2, 64, 8, 8)).sum().backward()  # runs, its BatchNorms held in eval
    assert torch.equal(copied.bn1.running_mean, part.bn1.running_mean)
    # a copy of the whole model holds its own BatchNorms (a failed pass puts back its own)
    whole = copy.deepcopy(model)
    hooks = whole.bn1._forward_pre_hooks.values()
    held = next(
        h.__self__ for h in hooks if type(getattr(h, "__self__", None)).__name__ == "HeldStatistics"
    )
    assert {id(bn) for bn in held.batch_norms} == {
        id(m) for m in whole.modules() if isinstance(m, nn.BatchNorm2d)
    } - {id(m) for m in whole.get_classifier().modules()}
    handle.remove()


def test_a_model_copied_through_a_second_name_of_a_part_is_refused_at_its_forward():
    """A part registered under a second name ahead of the model: deepcopy reaches the engine
    through the part first, so the copied model's engine is the inert one of a copied part.
    Its forwards would run uncompressed and uncounted, so the copy says so at its forward."""
    torch.manual_seed(0)
    model = SMALL["vit"]()
    handle = apply_s2a(model, input_size=SIZE)
    holder = nn.Module()
    holder.head = model.head  # registered first
    holder.model = model
    copied = copy.deepcopy(holder)
    with pytest.raises(RuntimeError, match=r"copy of the S2A model \(VisionTransformer\) was"):
        copied.model(torch.randn(2, *SIZE))
    handle.remove()


def test_loading_into_a_deep_copy_leaves_the_original_alone():
    """frozen_dtype keeps the exact originals for checkpoints and undo; a copy's load must
    write into the copy's, or stop_engine would give the original the copy's weights."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    other = timm.create_model("resnet18", num_classes=3).state_dict()
    handle = apply_s2a(model, frozen_dtype="bfloat16")
    ema = __import__("copy").deepcopy(model)
    ema.load_state_dict(other)
    assert torch.equal(ema.state_dict()["conv1.weight"], other["conv1.weight"])
    handle.stop_engine()
    assert torch.equal(model.conv1.weight, own["conv1.weight"])
    handle.remove()


class _TwoLayer(nn.Module):
    """A block of two weight layers."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class _TwoLinear(_TwoLayer):
    """Another class of block of two weight layers."""


def test_a_block_listed_in_two_containers_votes_once():
    from lightning_s2a.structure.families import repeated_blocks

    model = nn.Module()
    model.blocks = nn.ModuleList(_TwoLayer() for _ in range(3))
    model.encoder = nn.Sequential(*model.blocks)  # the same three blocks again
    model.other = nn.ModuleList(_TwoLinear() for _ in range(4))
    found, rule = repeated_blocks(model)
    assert rule == "repeated blocks: 4 x _TwoLinear"  # 4 distinct blocks beat 3 (not 6)
    assert [n for n, _ in found] == [f"other.{i}" for i in range(4)]


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_torchvision_classes_named_like_timm_ones_get_the_general_rules(arch):
    """torchvision's VisionTransformer and ConvNeXt share timm's class names, not its layout:
    the family table (timm's patterns) is for timm's classes only."""
    from torchvision.models import VisionTransformer
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from lightning_s2a.structure.families import find_blocks

    torch.manual_seed(0)
    if arch == "vit":
        model = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        )
        nn.init.normal_(model.heads.head.weight)  # torchvision zeroes it: no gradient behind
        head, names = "heads.head", [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    else:
        model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=5)
        head, names = (
            "classifier.2",
            ["features.1.0", "features.1.1", "features.3.0", "features.3.1"],
        )
    blocks, _, rule = find_blocks(model, None)
    assert rule.startswith("repeated blocks") and [b.name for b in blocks] == names
    cfg = S2AConfig(modules=["prompt"], head=head, input_size=(3, 32, 32), compress=False)
    with apply_s2a(model, cfg):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        prompts = {n: p for n, p in model.named_parameters() if "s2a_prompt" in n}
        assert len(prompts) == 2 * len(names)  # A and B of each block's prompt
        assert all(p.grad is not None for p in prompts.values())
        # B starts at zero (the prompt adds nothing at first), so B's gradient moves first
        assert all(p.grad.abs().sum() > 0 for n, p in prompts.items() if n.endswith(".B"))
    timm_vit = SMALL["vit"]()  # timm's own class still uses the table
    assert find_blocks(timm_vit, None)[2] == "family table: VisionTransformer -> 'blocks.*'"


@pytest.mark.parametrize("modules", ["bias", "side"])
def test_a_head_replaced_after_apply_is_a_clear_error(modules):
    """reset_classifier after apply_s2a: the new head is no parameter S2A knows, so its input
    and weight were coded as activations (a head-weight gradient 4-9% off, silently), and
    'side' kept reading the old head (torch's bare "does not require grad"). Said at the
    new head's first call, naming it; a parameter from outside the model passes."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=2, img_size=32)
    handle = apply_s2a(model, modules=modules, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    model.reset_classifier(5)
    with pytest.raises(RuntimeError, match=r"'head.weight' is not among the parameters.*reset_"):
        model(x).sum().backward()
    handle.remove()


class _ScaledByOutside(nn.Module):
    """A model that multiplies by a parameter it does not own (registered elsewhere)."""

    def __init__(self, scale: nn.Parameter) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.__dict__["scale"] = scale  # not a registered parameter of this model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)) * self.scale


def test_a_parameter_from_outside_the_model_passes():
    torch.manual_seed(0)
    scale = nn.Parameter(torch.full((3,), 2.0))
    model = _ScaledByOutside(scale)
    with apply_s2a(model, head=None) as handle:
        model(torch.randn(5, 4)).sum().backward()
        model(torch.randn(5, 4)).sum().backward()
        assert scale in handle.engine._outside_ids and scale.grad is not None


@pytest.mark.parametrize("modules", ["bias+prompt", "side"])
def test_an_optimizer_built_before_apply_s2a_is_said(modules):
    """Built before apply_s2a, an optimizer holds none of the parameters S2A adds: prompts
    (or the side network) get gradients and never change, silently. After a few steps the
    ones no stepping optimizer holds are named. An optimizer built after apply_s2a says
    nothing, fused or accumulating over many forwards, and neither do several optimizers
    that share the parameters out."""
    import warnings

    def run(how: str) -> list[str]:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, depth=1, img_size=32)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        opts = [torch.optim.SGD(model.parameters(), lr=0.1)] if how == "before" else []
        with apply_s2a(model, modules=modules, input_size=(3, 32, 32)):
            trained = [p for p in model.parameters() if p.requires_grad]
            if how == "after":
                opts = [torch.optim.AdamW(trained, lr=0.1, fused=True)]
            elif how == "split":
                opts = [torch.optim.SGD([p], lr=0.1) for p in trained]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for step in range(24):
                    F.cross_entropy(model(x), y).backward()
                    if how == "split" or step % 8 == 7:  # accumulating over 8 forwards
                        for opt in opts:
                            opt.step()
                            opt.zero_grad()
        return [str(w.message) for w in caught if "no optimizer that steps" in str(w.message)]

    said = run("before")
    name = "s2a_prompt" if modules == "bias+prompt" else "s2a_side"
    assert len(said) == 1 and name in said[0] and "optimizer built before" in said[0]
    assert run("after") == [] and run("split") == []


class _SignalBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = (
            nn.Conv1d(c, c, 3, padding=1),
            nn.BatchNorm1d(c),
            nn.Conv1d(c, c, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.relu(self.bn(self.c1(x))))


class _SignalNet(nn.Module):
    """An audio-style 1-D conv net: (B, channels, time) blocks, pooled over time."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 32, 5, padding=2)
        self.blocks = nn.Sequential(*[_SignalBlock(32) for _ in range(3)])
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(-1))


def test_one_d_conv_blocks_are_channels_first_signals():
    """(B, C, L) block outputs of Conv1d blocks were read as (B, N, D) tokens: the side
    averaged over channels, its width followed the length, and another length failed.
    Now the side pools over time (width C / side_reduction) at any length, the prompt is
    (C, L), and a declared layout of the wrong rank is refused at apply."""
    torch.manual_seed(0)
    model = _SignalNet().eval()
    x = torch.randn(2, 1, 100)
    expected = model(x)
    with apply_s2a(model, modules="side", head="head", input_size=(1, 100)) as handle:
        assert {b.layout for b in handle.structure.blocks} == {"ncl"}
        assert [p.in_features for p in model.s2a_side.proj] == [8, 8, 8]
        assert model(torch.randn(2, 1, 300)).shape == (2, 4)
    with apply_s2a(model, modules="prompt", head="head", input_size=(1, 100)) as handle:
        assert model.blocks[0].s2a_prompt.prompt().shape == (32, 100)
        assert torch.equal(model(x), expected)  # B starts at zero
        model(x).sum().backward()
        assert model.blocks[0].s2a_prompt.B.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"block_layout='nchw' describes 4-D.*'ncl' for 3-D"):
        apply_s2a(model, modules="side", head="head", input_size=(1, 100), block_layout="nchw")
    assert all(p.requires_grad for p in model.parameters())


class _ConvFeedForwardBlock(nn.Module):
    """FastSpeech's block: (B, N, D) tokens, its feed-forward Conv1d applied transposed."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.w1 = nn.LayerNorm(d), nn.Conv1d(d, 64, 3, padding=1)
        self.w2 = nn.Conv1d(64, d, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.relu(self.w1(self.norm(x).transpose(1, 2)))).transpose(1, 2)


class _LinearPointwiseBlock(nn.Module):
    """Vocos' ConvNeXt-1D block: a (B, C, L) signal, Linear pointwise layers applied
    transposed."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw, self.pw = nn.Conv1d(c, c, 7, padding=3, groups=c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw(torch.relu(self.dw(x)).transpose(1, 2)).transpose(1, 2)


class _ThreeBlocks(nn.Module):
    def __init__(self, block: type[nn.Module], pool: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[block(32) for _ in range(3)])
        self.pool, self.head = pool, nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(self.pool))


@pytest.mark.parametrize(
    ("block", "pool", "size", "layout"),
    [(_ConvFeedForwardBlock, 1, (20, 32), "tokens"), (_LinearPointwiseBlock, -1, (32, 50), "ncl")],
)
def test_three_d_blocks_take_the_layout_their_last_layers_width_names(block, pool, size, layout):
    """Read by the last weight layer's type alone, both were taken the other way round: the
    side averaged channels and its width followed the sequence length (5 and 12, not 8)."""
    torch.manual_seed(0)
    model = _ThreeBlocks(block, pool).eval()
    with apply_s2a(model, modules="side", head="head", input_size=size) as handle:
        assert {b.layout for b in handle.structure.blocks} == {layout}
        assert [p.in_features for p in model.s2a_side.proj] == [8, 8, 8]  # 32 channels / 4


def test_unfreezing_everything_s2a_froze_is_warned_once(recwarn):
    """A GAN's set_requires_grad(disc, True) after the generator's step made the whole
    backbone train (full fine-tuning, silently: only s2a/trainable_pct said 100)."""
    torch.manual_seed(0)
    model = SMALL["vit"]()
    handle = apply_s2a(model, S2AConfig(modules=("bias",)))
    x = torch.randn(2, *SIZE)
    for p in model.blocks[0].parameters():  # a stage unfrozen on purpose: nothing to say
        p.requires_grad_(True)
    model(x).sum().backward()
    assert not [w for w in recwarn if "require grad again" in str(w.message)]
    model.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"parameters S2A froze in VisionTransformer require"):
        model(x).sum().backward()
    model(x).sum().backward()  # once: the next step says nothing
    assert not [w for w in recwarn if "require grad again" in str(w.message)]
    handle.remove()


@pytest.mark.parametrize("frozen_dtype", ["bfloat16", "float16", "nf4"])
@pytest.mark.parametrize("side", ["pooled", "hierarchical"])
def test_the_side_network_is_made_in_the_models_own_dtype(frozen_dtype, side):
    """Made like the head, which frozen_dtype had cast already: a bf16 side network whose
    small updates rounded away (a reviewer's 5 AdamW steps moved 28% of its weights where
    99% moved in fp32); under nf4 the head has no weight left to be like."""
    torch.manual_seed(0)
    model = SMALL["resnet"]().double()
    cfg = S2AConfig(modules=["side"], side=side, input_size=SIZE, frozen_dtype=frozen_dtype)
    with apply_s2a(model, cfg):
        assert {p.dtype for p in model.s2a_side.parameters()} == {torch.float64}


def test_a_deep_copys_unfreeze_check_watches_the_copy(recwarn):
    """The check held the original's parameters in a weak dictionary, which deepcopy keeps
    as it is: an EMA copy unfrozen in full went unsaid, and the original's unfreezing was
    said of the untouched copy."""
    torch.manual_seed(0)
    model = SMALL["vit"]()
    apply_s2a(model, S2AConfig(modules=("bias",)))
    twin = copy.deepcopy(model)
    x = torch.randn(2, *SIZE)
    model.requires_grad_(True)
    twin(x).sum().backward()  # the copy is as frozen as before
    assert not [w for w in recwarn if "require grad again" in str(w.message)]
    twin.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"parameters S2A froze in VisionTransformer require"):
        twin(x).sum().backward()


class _NarrowBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(F.relu(self.a(x)))


class _NarrowNet(nn.Module):
    """A user's small CNN whose blocks have 6 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.ModuleList([_NarrowBlock(6), _NarrowBlock(6)])
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def test_the_default_side_width_is_never_one():
    """6 channels at reduction 4 gave width 1: normalised over one feature, the side's
    output was the same for every input, whatever it trained to."""
    torch.manual_seed(0)
    model = _NarrowNet()
    with apply_s2a(model, modules=["side"], head="fc", input_size=(3, 16, 16)) as handle:
        assert "width 8" in handle.structure.side_rule
        with torch.no_grad():
            for p in model.s2a_side.parameters():
                p.normal_()
            out = model(torch.randn(4, 3, 16, 16))
        assert (out - out[0]).abs().amax() > 1e-3


class _OwnStatistics(nn.Module):
    """A norm of its own kind with a running variance (as timm's EvoNorm keeps one)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_var", torch.ones(1, c, 1, 1))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_var.lerp_(x.var(dim=(0, 2, 3), keepdim=True), 0.1)
        return x / (self.running_var + 1e-5).sqrt()


def test_instance_norms_with_running_statistics_are_held_and_other_kinds_said():
    """bn_mode='eval' held _BatchNorm only: an InstanceNorm2d(track_running_stats=True) in
    the frozen backbone normalized with the batch's statistics and updated its own (after
    remove() the output was 0.2 off). A norm of another kind is said, by name."""
    torch.manual_seed(0)
    frozen_bn = type("FrozenBatchNorm2d", (_OwnStatistics,), {})  # torchvision's never update
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        _OwnStatistics(8),
        nn.Flatten(),
        nn.LazyLinear(3),
        nn.InstanceNorm1d(3),  # no running statistics: the same in either mode, not held
        frozen_bn(3),
    )
    model[6].forward = lambda x: x
    model(torch.randn(2, 3, 8, 8))  # the lazy head takes its shape
    before = model[1].running_var.clone()
    with pytest.warns(UserWarning, match=r"bn_mode='eval' holds.*layers; 2 keep running"):
        handle = apply_s2a(model, modules=("bias",), head="4")  # named: 2, not the frozen 6
    held = handle.held_batch_norms()
    assert any(m is model[1] for m in held) and not any(m is model[5] for m in held)
    model.train()
    model(torch.randn(4, 3, 8, 8) + 3).sum().backward()
    assert torch.equal(model[1].running_var, before)
    handle.remove()


def test_nest_blocks_are_read_channels_last():
    """NesT's blocks return (B, blocks, tokens, C), neither pair an image grid: read
    channels first, the side network was 1 wide and gave every image the same output."""
    torch.manual_seed(0)
    from timm.models.nest import Nest

    model = Nest(
        img_size=32, num_classes=3, embed_dims=(16, 32, 64), num_heads=(1, 2, 4), depths=(1, 1, 4)
    )
    with apply_s2a(model, modules=["side"], input_size=(3, 32, 32)) as handle:
        blocks = handle.structure.blocks  # the transformer blocks: (blocks, tokens, C)
        assert all(".transformer_encoder." in b.name for b in blocks)
        assert {b.layout for b in blocks} == {"nhwc"}
        assert "width 16" in handle.structure.side_rule  # 64 channels at reduction 4
        with torch.no_grad():
            out = model(torch.randn(4, 3, 32, 32))
        assert (out - out[0]).abs().amax() > 1e-4


def test_block_names_inside_one_another_are_refused():
    """blocks=['blocks.0', 'blocks.0.mlp'] dropped the inner name without a word."""
    with pytest.raises(ValueError, match=r"blocks names 'blocks\.0\.mlp' inside 'blocks\.0'"):
        apply_s2a(SMALL["vit"](), modules="prompt", blocks=["blocks.0", "blocks.0.mlp"])
    with apply_s2a(SMALL["vit"](), modules="prompt", blocks="blocks.*") as handle:
        assert len(handle.structure.blocks) == 3  # a pattern's sub-blocks: outermost only


class _MaskedEncoder(nn.Module):
    """A sequence model that takes a padding mask, as nn.TransformerEncoder users write."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(32, 3)

    def forward(self, x, src_key_padding_mask=None, **named):
        # the mask under another keyword (mask=, pad_mask=, ...); float values: weights
        for value in named.values():
            if value.dtype == torch.bool:
                src_key_padding_mask = value
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, src_key_padding_mask=src_key_padding_mask)
        if src_key_padding_mask is None:
            return self.head(h.mean(1))
        keep = (~src_key_padding_mask)[..., None].float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def test_side_refuses_a_padding_mask_it_cannot_read():
    """The side pooled padded positions with the rest: one sequence's output moved with the
    amount of padding (0.12 to 0.32 in a reviewer's runs), silently."""
    torch.manual_seed(0)
    model = _MaskedEncoder().train()
    x = torch.randn(2, 10, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 6:] = True
    with apply_s2a(model, modules="side", head="head", input_size=(10, 8)):
        assert model(x).shape == (2, 3)  # no mask: nothing padded
        with pytest.raises(ValueError, match="cannot read a mask \\(src_key_padding_mask\\)"):
            model(x, src_key_padding_mask=mask)
        # by position: boolean, 0/1 integer or float (HF), additive (0 kept, -inf padded)
        additive = torch.zeros(2, 10).masked_fill(mask, float("-inf"))
        for positional in (mask, mask.long(), (~mask).float(), additive):
            with pytest.raises(ValueError, match="cannot read a mask \\(argument 1\\)"):
                model(x, positional)
        # a mask that pads nothing (all False; HF's all-ones attention_mask) is no problem
        assert model(x, src_key_padding_mask=torch.zeros_like(mask)).shape == (2, 3)
        # the names users give a padding mask, where the value looks like one
        for name in ("mask", "pad_mask", "key_mask"):
            with pytest.raises(ValueError, match=f"cannot read a mask \\({name}\\)"):
                model(x, **{name: mask})
        assert model(x, mask=torch.rand(2, 10)).shape == (2, 3)  # weights: no mask
        causal = nn.Transformer.generate_square_subsequent_mask(10)  # (T, T): pads nothing
        assert model(x, mask=causal).shape == (2, 3)
    with apply_s2a(model, modules="bias", head="head"):
        model(x, src_key_padding_mask=mask).sum().backward()  # the model applies its mask


class _TokenWeighted(nn.Module):
    """Per-token weights passed by position: data, not a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 3)

    def forward(self, x, weights=None):
        h = self.blocks(x)
        return self.head((h if weights is None else h * weights[..., None]).mean(1))


def test_side_takes_per_token_values_that_are_no_mask():
    torch.manual_seed(0)
    model = _TokenWeighted().train()
    x, weights = torch.randn(2, 10, 8), torch.rand(2, 10)
    blocks = ["blocks.0", "blocks.2"]
    with apply_s2a(model, modules="side", head="head", input_size=(10, 8), blocks=blocks):
        assert model(x, weights).shape == (2, 3)


def test_a_model_collected_during_an_optimizer_step_leaves_the_step_alone():
    """The unstepped check's hook was removed by a finalizer; a garbage collection inside an
    optimizer step (as a test run hit) removed it while torch iterated over the hooks:
    "OrderedDict mutated during iteration". Now a later check takes it off."""
    import gc

    from torch.optim import optimizer as optim_module
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from lightning_s2a.structure import unstepped

    gc.collect()  # models earlier tests left behind: retired now, not inside the step below
    unstepped._sweep()
    holder = [nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))]
    hooks_before = len(optim_module._global_optimizer_pre_hooks)

    def drop(optimizer, args, kwargs):
        holder.clear()
        gc.collect()  # the model and its handle are a cycle: collected here

    # registered first, so torch's iteration still has the check's hook ahead of it
    dropping = register_optimizer_step_pre_hook(drop)
    apply_s2a(holder[0], head="1", add_bias=True)  # adds a bias: the check is on
    param = nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    try:
        torch.optim.SGD([param], lr=0.1).step()  # raised before
    finally:
        dropping.remove()
    assert len(unstepped._retired) == 1
    second = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    handle = apply_s2a(second, head="1", add_bias=True)
    assert not unstepped._retired  # swept by the next check
    assert len(optim_module._global_optimizer_pre_hooks) == hooks_before + 1  # the next check
    handle.remove()


class _WithTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.teacher = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.student(x))


@pytest.mark.parametrize("frozen", ["teacher", "nothing", "everything", "all but the head"])
def test_parameters_frozen_before_that_s2a_trains_are_named(frozen):
    """S2A trains every bias of the model it is applied to: a teacher frozen inside a module
    S2A'd whole trained its biases, silently. Said where part of the model was frozen; a
    model frozen whole (a linear probe's leftover) or not at all is S2A's to train."""
    model = _WithTeacher()
    if frozen != "nothing":
        (model.teacher if frozen == "teacher" else model).requires_grad_(False)
    if frozen == "all but the head":  # a linear probe's leftover
        model.head.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_s2a(model, head="head", input_size=(8,))
    said = [str(w.message) for w in caught if "were frozen before" in str(w.message)]
    assert model.teacher[0].bias.requires_grad  # S2A's rule, as documented
    if frozen == "teacher":
        assert len(said) == 1 and "2 parameters" in said[0] and "teacher.0.bias" in said[0]
    else:
        assert not said
    handle.remove()
    assert model.teacher[0].bias.requires_grad == (frozen == "nothing")
    assert model.head.weight.requires_grad == (frozen != "everything")


class _RunTwice(nn.Module):
    """A universal-transformer-style model: its block list runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            for block in self.blocks:
                x = x + block(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("modules", [["prompt"], ["side"], ["bias", "prompt"]])
def test_blocks_that_run_twice_per_forward_are_refused(modules):
    """Each prompt ran on every pass of the loop, added twice per forward, silently (the side
    network refused at its first forward only)."""
    model = _RunTwice()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"3 of _RunTwice's blocks ran more than once.*'blocks\.0': 2 times"
    ):
        apply_s2a(model, S2AConfig(modules=modules, head="head", input_size=(5, 8)))
    assert not any("s2a" in n for n, _ in model.named_modules())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_removing_trained_added_modules_is_said():
    # docs advised remove() before export: it takes trained prompts and side networks out,
    # and the exported model predicted other classes, silently.
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, depth=2, img_size=32, patch_size=8
    )
    handle = apply_s2a(model, S2AConfig(modules=["bias", "prompt"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"stop_engine\(\) instead"):
        handle.remove()
    # a second optimizer over the prompts, begun after the first's third step (which ended
    # the unstepped check): its steps still count
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, depth=2, img_size=32, patch_size=8
    )
    handle = apply_s2a(model, S2AConfig(modules=["bias", "prompt"]))
    head = torch.optim.SGD(model.get_classifier().parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        head.step()
    prompts = [p for n, p in model.named_parameters() if "s2a_prompt" in n]
    torch.optim.SGD(prompts, lr=0.1).step()
    with pytest.warns(UserWarning, match=r"stop_engine\(\) instead"):
        handle.remove()
    untrained = timm.create_model(
        "vit_tiny_patch16_224", num_classes=3, depth=2, img_size=32, patch_size=8
    )
    handle = apply_s2a(untrained, S2AConfig(modules=["bias", "prompt"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stepped: nothing to say
        handle.remove()


def _detection_body(se_bias: bool) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d  # its statistics are all buffers

    layers = [nn.Conv2d(3, 8, 3, bias=False), FrozenBatchNorm2d(8), nn.ReLU()]
    layers += [nn.Conv2d(8, 8, 3, bias=False), FrozenBatchNorm2d(8), nn.ReLU()]
    if se_bias:
        layers.append(nn.Conv2d(8, 8, 1))  # a squeeze-excite-like conv with a bias
    return nn.Sequential(*layers)


def test_frozen_batch_norms_point_bias_tuning_to_add_bias():
    # torchvision detection backbones hold their norms' shifts as buffers: bias tuning
    # trained 5,080 of a MobileNet body's 17,280 biases, and a ResNet body's error advised
    # naming a head it does not have.
    with pytest.warns(UserWarning, match=r"2 FrozenBatchNorm layers .*add_bias=True"):
        handle = apply_s2a(_detection_body(se_bias=True), S2AConfig(head=None))
    handle.remove()
    with pytest.raises(ValueError, match=r"nothing left to train.*add_bias=True"):
        apply_s2a(_detection_body(se_bias=False), S2AConfig(head=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_s2a(_detection_body(se_bias=False), S2AConfig(head=None, add_bias=True))
    assert handle.trainable_parameters()[0] == 16  # a bias before each norm


def test_layers_that_only_share_letters_with_the_head_are_not_said():
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc2(self.fc1(x)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_s2a(MLP(), S2AConfig(head="fc")).remove()
        apply_s2a(nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)]), head="1").remove()


def test_an_auxiliary_head_named_after_the_head_is_said():
    # torchvision's segmentation models: head="classifier" left aux_classifier frozen
    # (2 of its 5 parameters trained, the biases), while the aux loss came from it.
    from torchvision.models.segmentation import fcn_resnet50

    model = fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True, num_classes=3)
    with pytest.warns(UserWarning, match=r"head='classifier,aux_classifier'"):
        handle = apply_s2a(model, S2AConfig(head="classifier"))
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = apply_s2a(model, S2AConfig(head="classifier,aux_classifier"))
    assert all(p.requires_grad for p in model.aux_classifier.parameters())
    handle.remove()


class _DecodeHead(nn.Module):
    """SegFormer's decode head, as written there: per-scale Linear projections, then a 1x1
    fuse and classifier convolutions (registered after the Linears)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_projections = nn.ModuleList([nn.Linear(8, 16), nn.Linear(8, 16)])
        self.linear_fuse = nn.Conv2d(32, 16, 1, bias=False)
        self.classifier = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        maps = [
            p(tokens).transpose(1, 2).reshape(x.shape[0], 16, *x.shape[2:])
            for p in self.linear_projections
        ]
        return self.classifier(self.linear_fuse(torch.cat(maps, 1)))


class _DecodeSegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU())
        self.decode_head = _DecodeHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.encoder(x))


def test_a_dense_heads_classifier_conv_is_suggested_through_its_head():
    # The last Linear (a per-scale projection) was suggested: its classifier conv, random
    # after a class-count change, stayed frozen.
    with pytest.raises(ValueError, match=r"in a 1x1 conv: S2AConfig\(head='decode_head'\)"):
        apply_s2a(_DecodeSegmenter(), S2AConfig())
    # the main head, not the auxiliary one registered after it; the whole head, not one of
    # its parallel classifiers; and a body with no head gets no layer of a block
    from torchvision.models import mobilenet_v2
    from torchvision.models.segmentation import (
        deeplabv3_mobilenet_v3_large,
        lraspp_mobilenet_v3_large,
    )

    for model, head in (
        (
            deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True),
            "classifier",
        ),
        (lraspp_mobilenet_v3_large(weights=None, weights_backbone=None), "classifier"),
    ):
        assert head_guess(model) == (head, "the dense head that ends in a 1x1 conv")
    assert head_guess(mobilenet_v2().features) == ("", "")


@pytest.mark.parametrize("modules", ["prompt", "side"])
def test_video_blocks_are_a_clear_error_naming_what_works(modules):
    """A video model's (B, C, T, H, W) blocks: asked for the side network, the error spoke of
    a prompt and named no way out. It names both modules, the 5-D shape and the fix now."""
    from torchvision.models.video import r3d_18

    model = r3d_18(num_classes=4)
    config = S2AConfig(modules=[modules], head="fc", input_size=(3, 4, 32, 32))
    with pytest.raises(
        ValueError,
        match=r"prompt or the side network's tap .*\(2, 64, 4, 16, 16\) \(a video model's "
        r"\(B, C, T, H, W\)\).*Use modules=\['bias'\] \(any rank\)",
    ):
        apply_s2a(model, config)
    assert all(p.requires_grad for p in model.parameters())  # nothing left applied
