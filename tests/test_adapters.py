"""Per-task adapter files: exact round trips, swapping on one backbone, wrappers, errors."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.adapters import get_handle, load_adapter, save_adapter

SIZE = (3, 64, 64)
CFG = S2AConfig(modules=("bias", "prompt"), input_size=SIZE)


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, depth=2, img_size=64).eval()


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet18", num_classes=5).eval()


class Wrapper(nn.Module):
    """Stands in for a LightningModule that holds the backbone as ``.backbone``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def perturb(model: nn.Module, seed: int) -> None:
    """Simulate training: move every trainable parameter (prompt B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def out(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return model(x)


def payload_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: size minus the 8-byte length and header."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    return len(data) - 8 - header_len


def test_round_trip_exact_and_only_trainable(tmp_path):
    model = vit()
    handle = apply_s2a(model, CFG)
    perturb(model, seed=1)
    expected = out(model)
    path = tmp_path / "task.safetensors"
    save_adapter(model, path)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".s2a_prompt." in n for n in trainable) and "head.weight" in trainable
    tensors = load_file(path)
    assert set(tensors) == set(trainable)
    assert payload_bytes(path) == sum(p.numel() * p.element_size() for p in trainable.values())
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lightning_s2a.adapter" and meta["version"] == "1"
    assert meta["prefix"] == ""
    assert S2AConfig(**json.loads(meta["s2a_config"])) == handle.config
    backbone = json.loads(meta["backbone"])
    assert backbone["architecture"] == "vit_tiny_patch16_224"
    assert backbone["num_params"] == sum(
        p.numel() for n, p in model.named_parameters() if "s2a_" not in n
    )

    fresh = vit()
    assert not torch.equal(out(fresh), expected)  # the adapter is what makes them equal
    loaded = load_adapter(fresh, path)
    assert get_handle(fresh) is loaded and loaded.config == handle.config
    assert torch.equal(out(fresh), expected)


def test_swap_adapters_on_one_backbone(tmp_path):
    outs = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = vit()
        apply_s2a(model, CFG)
        perturb(model, seed)
        outs[name] = out(model)
        save_adapter(model, tmp_path / f"{name}.safetensors")
    assert not torch.equal(outs["a"], outs["b"])

    backbone = vit()
    first = load_adapter(backbone, tmp_path / "a.safetensors")
    assert torch.equal(out(backbone), outs["a"])
    assert load_adapter(backbone, tmp_path / "b.safetensors") is first  # handle reused
    assert torch.equal(out(backbone), outs["b"])
    load_adapter(backbone, tmp_path / "a.safetensors")
    assert torch.equal(out(backbone), outs["a"])


@pytest.mark.parametrize("build, norm", [(vit, "norm"), (resnet, "bn1")])
def test_a_swap_puts_back_what_the_first_adapter_trained_beyond_the_second(tmp_path, build, norm):
    """Task A unfroze a backbone norm after apply_s2a (allowed) and trained it; task B did
    not. Swapping A then B kept A's norm (and, for a BatchNorm, its running statistics):
    logits 0.04 off B's own, silently."""
    outs = {}
    for name, seed, unfreeze in (("a", 1, True), ("b", 2, False)):
        model = build()
        apply_s2a(model, CFG if build is vit else S2AConfig(modules=["bias"]))
        if unfreeze:
            model.get_submodule(norm).requires_grad_(True)
        perturb(model, seed)
        if unfreeze:  # as training in train mode moves a BatchNorm's statistics
            for b in model.get_submodule(norm).buffers():
                b.add_(1)
        outs[name] = out(model)
        save_adapter(model, tmp_path / f"{name}.safetensors")
    swapped = build()
    load_adapter(swapped, tmp_path / "a.safetensors")
    torch.testing.assert_close(out(swapped), outs["a"], rtol=0, atol=0)
    load_adapter(swapped, tmp_path / "b.safetensors")
    torch.testing.assert_close(out(swapped), outs["b"], rtol=0, atol=0)
    fresh = build()
    mine, built = swapped.get_submodule(norm).state_dict(), fresh.get_submodule(norm).state_dict()
    assert all(torch.equal(v, built[k]) for k, v in mine.items() if k != "bias")  # B's bias
    get_handle(swapped).remove()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in swapped.state_dict().items())


def test_remove_after_load_adapter_puts_back_what_it_wrote_over(tmp_path):
    # A bias adapter, remove() (as the other-config error says), then a side adapter: the
    # side task ran on the first task's biases (outputs off by 0.14), silently.
    paths = {}
    for modules, seed in ((("bias",), 1), (("side",), 2)):
        model = vit()
        apply_s2a(model, S2AConfig(modules=modules, input_size=SIZE))
        perturb(model, seed)
        paths[modules] = (tmp_path / f"{modules[0]}.safetensors", out(model))
        save_adapter(model, paths[modules][0])
    backbone = vit()
    built = {k: v.clone() for k, v in backbone.state_dict().items()}
    # said: a user removing S2A to deploy the adapter's model got the untrained one
    with pytest.warns(UserWarning, match=r"puts back, as built, the \d+ tensors load_adapter"):
        load_adapter(backbone, paths["bias",][0]).remove()
    assert all(torch.equal(v, built[k]) for k, v in backbone.state_dict().items())
    # after a swap (the same config, another task's values) too
    other = vit()
    apply_s2a(other, S2AConfig(modules=("bias",), input_size=SIZE))
    perturb(other, 7)
    save_adapter(other, tmp_path / "bias2.safetensors")
    load_adapter(backbone, paths["bias",][0])
    load_adapter(backbone, tmp_path / "bias2.safetensors").remove()
    assert all(torch.equal(v, built[k]) for k, v in backbone.state_dict().items())
    handle = load_adapter(backbone, paths["side",][0])
    assert torch.equal(out(backbone), paths["side",][1])
    with pytest.warns(UserWarning, match=r"takes out the modules S2A added .* were loaded"):
        handle.remove()  # the loaded side network goes: said (it was silent, nothing stepped)
    # an adapter of values as built (nothing trained) changes nothing: nothing to say
    untouched = vit()
    apply_s2a(untouched, S2AConfig(modules=("bias",), input_size=SIZE))
    save_adapter(untouched, tmp_path / "untouched.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(vit(), tmp_path / "untouched.safetensors").remove()
    # onto S2A already applied (by the user, or a fit's callback) as well: until 2026-12-07
    # the adapter's biases stayed after remove(), under the next task
    apply_s2a(backbone, S2AConfig(modules=("bias",), input_size=SIZE))
    load_adapter(backbone, paths["bias",][0]).remove()
    assert all(torch.equal(v, built[k]) for k, v in backbone.state_dict().items())
    load_adapter(backbone, paths["side",][0]).remove()
    # what trained after the load stays (remove() after a fit keeps it); what did not is
    # put back, also after the model changed dtype (buffers are new tensors then)
    model = resnet()
    apply_s2a(model, S2AConfig(bn_mode="train"))
    perturb(model, 3)
    model.train()(torch.randn(4, *SIZE))  # statistics move as well
    save_adapter(model, tmp_path / "train.safetensors")
    fresh = resnet()
    built = {k: v.clone() for k, v in fresh.state_dict().items()}
    handle = load_adapter(fresh, tmp_path / "train.safetensors")
    with torch.no_grad():
        fresh.fc.bias.add_(1.0)  # trained after the load
    fresh.double()
    handle.remove()
    for key, value in fresh.state_dict().items():
        if key == "fc.bias":
            assert not torch.equal(value, built[key].double())
        else:
            assert torch.equal(value, built[key].to(value.dtype)), key


def test_error_other_weights_or_buffers_of_one_class(tmp_path):
    # Only the class and parameter shapes were compared: a DeiT adapter loaded onto a ViT,
    # a BatchNorm ResNet's onto a GroupNorm ResNet (same parameter shapes), silently.
    for saved, other in (
        (("deit_tiny_patch16_224", {"depth": 2, "img_size": 64}), "vit_tiny_patch16_224"),
        (("resnet50", {}), "resnet50_gn"),
    ):
        name, kwargs = saved
        model = timm.create_model(name, num_classes=5, **kwargs)
        apply_s2a(model, S2AConfig(input_size=SIZE))
        save_adapter(model, tmp_path / "a.safetensors")
        target = timm.create_model(other, num_classes=5, **kwargs)
        with pytest.raises(ValueError, match=rf"trained on {name}.*this backbone is {other}"):
            load_adapter(target, tmp_path / "a.safetensors")


def test_tracked_instance_norm_statistics_are_held_and_the_round_trip_is_exact(tmp_path):
    # An InstanceNorm with track_running_stats is held like a BatchNorm (bn_mode='eval'): its
    # statistics stay as built, so the adapter needs none of them (before 2026-12-06 they
    # moved in training and had to travel; once they were left out, and the round trip
    # differed by 0.02).
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.InstanceNorm2d(8, track_running_stats=True),
            nn.Flatten(),
            nn.Linear(8 * 64 * 64, 5),
        )

    trained = model()
    built = trained[1].running_var.clone()
    apply_s2a(trained, S2AConfig(head="3"))
    trained.train()(torch.randn(4, *SIZE) + 3)  # a training forward: the statistics stay
    trained.eval()
    assert torch.equal(trained[1].running_var, built)
    save_adapter(trained, tmp_path / "in.safetensors")
    assert not {"1.running_mean", "1.running_var"} & set(load_file(tmp_path / "in.safetensors"))
    fresh = model().eval()
    load_adapter(fresh, tmp_path / "in.safetensors")
    assert torch.equal(out(fresh), out(trained))


def test_wrapper_prefix(tmp_path):
    wrapper = Wrapper(vit())
    apply_s2a(wrapper.backbone, CFG)
    perturb(wrapper, seed=3)
    expected = out(wrapper)
    path = tmp_path / "wrapped.safetensors"
    save_adapter(wrapper, path)

    keys = set(load_file(path))
    assert keys and all(k.startswith("backbone.") for k in keys)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["prefix"] == "backbone"

    fresh = Wrapper(vit())
    handle = load_adapter(fresh, path)
    assert handle.model is fresh.backbone and get_handle(fresh) is None
    assert torch.equal(out(fresh), expected)


def test_side_round_trip(tmp_path):
    model = vit()
    apply_s2a(model, S2AConfig(modules="side", input_size=SIZE))
    perturb(model, seed=4)
    expected = out(model)
    path = tmp_path / "side.safetensors"
    save_adapter(model, path)
    keys = set(load_file(path))
    assert keys and all(k.startswith("s2a_side.") for k in keys)  # head frozen with side

    fresh = vit()
    load_adapter(fresh, path)
    assert torch.equal(out(fresh), expected)


@pytest.fixture
def vit_adapter(tmp_path):
    model = vit()
    apply_s2a(model, CFG)
    perturb(model, seed=5)
    path = tmp_path / "vit.safetensors"
    save_adapter(model, path)
    return path


def test_error_other_architecture(vit_adapter):
    other = resnet()
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224.*resnet18"):
        load_adapter(other, vit_adapter)
    assert get_handle(other) is None


def test_error_other_config(vit_adapter):
    model = vit()
    handle = apply_s2a(model, S2AConfig(modules=("bias",), input_size=SIZE))
    with pytest.raises(ValueError, match=r"modules.*remove\(\)"):
        load_adapter(model, vit_adapter)
    handle.remove()
    assert load_adapter(model, vit_adapter).config == CFG


def test_storage_fields_may_differ_from_the_adapters(tmp_path):
    """A model S2A'd at bits=2 refused an adapter trained at bits=4, though bits change only
    how saved tensors are stored (a resumed fit allows it); fields that change the function
    still refuse."""
    trained = vit()
    apply_s2a(trained, CFG)
    perturb(trained, seed=5)
    path = tmp_path / "vit.safetensors"
    save_adapter(trained, path)
    model = vit()
    storage = CFG.replace(bits=2, calibrate=False, group_size=32)
    handle = apply_s2a(model, storage)
    assert load_adapter(model, path) is handle and handle.config == storage  # kept as applied
    assert torch.equal(out(model), out(trained))
    other = vit()
    apply_s2a(other, CFG.replace(prompt_rank=4, bits=2))
    with pytest.raises(ValueError, match=r"fields \['prompt_rank'\] differ"):
        load_adapter(other, path)


def test_error_not_an_adapter(tmp_path):
    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not an S2A adapter"):
        load_adapter(vit(), plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(vit(), junk)


def test_error_save_without_s2a(tmp_path):
    with pytest.raises(ValueError, match="no S2A applied"):
        save_adapter(Wrapper(vit()), tmp_path / "x.safetensors")


def test_error_keys_listed(vit_adapter, tmp_path):
    with safe_open(vit_adapter, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(vit_adapter)
    del tensors["head.bias"]
    tensors["extra.weight"] = torch.zeros(1)
    tensors["head.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=meta)
    model = vit()
    with pytest.raises(ValueError, match=r"head\.bias.*extra\.weight.*head\.weight"):
        load_adapter(model, bad)
    assert get_handle(model) is None  # the S2A applied for the load is taken back out


def test_an_adapter_without_head_batch_norm_statistics_still_loads(tmp_path):
    # Adapters saved before 2026-12-06 left out a head BatchNorm's running statistics (it was
    # held in eval mode on the model's own); they load, and the model's own statistics stay.
    def build() -> nn.Module:
        torch.manual_seed(0)
        head = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), head)

    model = build()
    apply_s2a(model, S2AConfig(head="2"))
    model.train()
    model(torch.randn(8, 32)).sum().backward()
    path = tmp_path / "new.safetensors"
    save_adapter(model, path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    assert "2.1.running_mean" in tensors  # saved now: it trained
    old = {k: v for k, v in tensors.items() if "running" not in k and "batches" not in k}
    save_file(old, str(tmp_path / "old.safetensors"), metadata=metadata)
    fresh = build()
    load_adapter(fresh, tmp_path / "old.safetensors")
    assert torch.equal(fresh[2][1].running_mean, build()[2][1].running_mean)
    assert torch.equal(fresh[2][0].weight, model[2][0].weight)  # the rest loaded
    with pytest.raises(ValueError, match="missing keys"):  # anything else missing still fails
        del old["2.0.weight"]
        save_file(old, str(tmp_path / "broken.safetensors"), metadata=metadata)
        load_adapter(build(), tmp_path / "broken.safetensors")
    # so do statistics that an adapter of this format always held: part of one BatchNorm's,
    # or any with bn_mode="train"
    partial = {k: v for k, v in tensors.items() if k != "2.1.running_var"}
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"missing keys \['2.1.running_var'\]"):
        load_adapter(build(), tmp_path / "partial.safetensors")
    model = build()
    apply_s2a(model, S2AConfig(head="2", bn_mode="train"))
    save_adapter(model, tmp_path / "train.safetensors")
    with safe_open(str(tmp_path / "train.safetensors"), "pt") as f:
        train_metadata = f.metadata()
    save_file(old, str(tmp_path / "train_old.safetensors"), metadata=train_metadata)
    with pytest.raises(ValueError, match="running_mean"):
        load_adapter(build(), tmp_path / "train_old.safetensors")


def test_error_prompts_sized_for_another_input(tmp_path):
    """A resnet prompt trained at 32x64 loaded into S2A applied at 64x32: as many positions,
    so the shapes matched, and the prompt was laid out on the transposed grid, silently."""
    trained = resnet()
    apply_s2a(trained, modules=("prompt",), input_size=(3, 32, 64))
    perturb(trained, seed=5)
    path = tmp_path / "prompt.safetensors"
    save_adapter(trained, path)
    model = resnet()
    apply_s2a(model, modules=("prompt",), input_size=(3, 64, 32))
    with pytest.raises(ValueError, match=r"sized for input \(3, 32, 64\).*\(3, 64, 32\)"):
        load_adapter(model, path)
    get_handle(model).remove()
    apply_s2a(model, modules=("prompt",), input_size=(3, 32, 64))
    load_adapter(model, path)
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


class _ProtoHead(nn.Module):
    """Class centres kept in a buffer, beside a child Linear: the module owns no parameter."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 8)
        self.register_buffer("protos", torch.zeros(5, 8))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = self.proj(f)
        if self.training:
            with torch.no_grad():
                self.protos.mul_(0.5).add_(0.5 * z.mean(0, keepdim=True))
        return z @ self.protos.T


class _ProtoModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, depth=1, img_size=32, patch_size=8
        )
        self.head = _ProtoHead(192)
        self.register_buffer("temperature", torch.ones(()))  # the wrapper's own
        self.teacher = nn.Linear(3, 3).requires_grad_(False)  # frozen: not in the adapter
        self.teacher.register_buffer("mean", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)) / self.temperature


def test_buffers_a_head_updates_are_in_the_adapter(tmp_path):
    """A prototype head's buffer sits on a module whose only parameters are its child's:
    the adapter left it out, and a strict load gave zeros (logits 1.1 off), silently. An
    adapter written without it still loads, keeping the model's values, as then."""
    model = _ProtoModel()
    apply_s2a(model.encoder, head=None)
    model.train()(torch.randn(4, 3, 32, 32))  # the head's statistics move
    perturb(model, 1)
    model.temperature.fill_(2.0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trained = model(x)
    save_adapter(model, tmp_path / "proto.safetensors")
    fresh = _ProtoModel()
    load_adapter(fresh, tmp_path / "proto.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained, rtol=0, atol=0)
    with safe_open(tmp_path / "proto.safetensors", "pt") as f:
        assert not any(k.startswith("teacher.") for k in f.keys())  # noqa: SIM118
        names = [k for k in f.keys() if k not in ("head.protos", "temperature")]  # noqa: SIM118
        metadata, old = f.metadata(), {k: f.get_tensor(k) for k in names}
    save_file(old, tmp_path / "old.safetensors", metadata=metadata)  # as saved before
    older = _ProtoModel()
    load_adapter(older, tmp_path / "old.safetensors")
    assert torch.equal(older.head.protos, torch.zeros(5, 8)) and older.temperature == 1


def test_an_add_bias_adapter_from_before_in_proj_biases_still_loads(tmp_path):
    """add_bias gives nn.MultiheadAttention(bias=False) an in_proj_bias since 2026-12-07: an
    adapter saved before lacks it and failed a strict load ("missing keys"); it loads, with
    that bias zero, the function it trained with."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Attention()
    apply_s2a(model, add_bias=True, head="head", input_size=(5, 8))
    save_adapter(model, tmp_path / "new.safetensors")
    with safe_open(tmp_path / "new.safetensors", "pt") as f:
        names = [k for k in f.keys() if k != "attn.in_proj_bias"]  # noqa: SIM118 (no __iter__)
        metadata, old = f.metadata(), {k: f.get_tensor(k) for k in names}
    save_file(old, tmp_path / "old.safetensors", metadata=metadata)
    torch.manual_seed(0)
    fresh = Attention()
    load_adapter(fresh, tmp_path / "old.safetensors")
    assert torch.equal(fresh.attn.in_proj_bias, torch.zeros(24))


@pytest.mark.parametrize(
    "config",
    [CFG, S2AConfig(modules=("side",), input_size=SIZE), S2AConfig(frozen_dtype="nf4")],
    ids=["bias+prompt", "side", "nf4"],
)
def test_error_other_frozen_weights_of_one_architecture(tmp_path, config):
    """Checked by shape alone, an adapter loaded into the same architecture built with other
    weights (another seed, pretrained=False) loaded, and its logits were 2.5 off, argmax
    agreeing on 25%. The same weights load, also converted to another dtype since."""
    model = vit()
    apply_s2a(model, config)
    perturb(model, 1)
    save_adapter(model, tmp_path / "a.safetensors")
    expected = out(model)
    other = vit(seed=1)
    with pytest.raises(ValueError, match=r"trained on other frozen weights: \d+ of \d+ .*off"):
        load_adapter(other, tmp_path / "a.safetensors")
    assert get_handle(other) is None  # refused before anything was applied
    same = vit()
    load_adapter(same, tmp_path / "a.safetensors")
    assert torch.equal(out(same), expected)
    for converted in (vit().bfloat16(), vit().half()):  # rounded weights are the same weights
        load_adapter(converted, tmp_path / "a.safetensors")  # (a 1e-6 cls token: fp16 subnormal)
    # a frozen head built differently (head=None: it is part of the frozen backbone)
    headless = S2AConfig(head=None, input_size=SIZE)
    model = vit()
    apply_s2a(model, headless)
    save_adapter(model, tmp_path / "b.safetensors")
    other = vit()
    nn.init.normal_(other.head.weight)
    with pytest.raises(ValueError, match=r"1 of \d+ frozen tensors .*\(head\.weight \("):
        load_adapter(other, tmp_path / "b.safetensors")
    # a NaN among the frozen weights, in both: the same weights
    nan = vit()
    with torch.no_grad():
        nan.pos_embed.view(-1)[0] = float("nan")
    apply_s2a(nan, headless)
    save_adapter(nan, tmp_path / "c.safetensors")
    again = vit()
    with torch.no_grad():
        again.pos_embed.view(-1)[0] = float("nan")
    load_adapter(again, tmp_path / "c.safetensors")


def test_error_other_frozen_buffers_held_batch_norm_statistics(tmp_path):
    """Running statistics S2A holds (BatchNorm in eval, bn_mode="eval") are not in the adapter,
    and the weight check sampled parameters only: an adapter loaded into a ResNet whose
    statistics had moved (train-mode forwards before it, feature extraction without .eval())
    loaded silently, its logits 0.11 off. Frozen buffers are sampled too now; those the
    adapter holds (a trained BatchNorm's) are not, so bn_mode="train" still loads anywhere."""

    def resnet(seed=0, moved=False):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", num_classes=5)
        if moved:
            model.train()
            with torch.no_grad():
                model(torch.randn(4, 3, 32, 32))  # running statistics move
        return model.eval()

    x = torch.randn(2, 3, 32, 32)
    model = resnet()
    apply_s2a(model, S2AConfig())
    perturb(model, 1)
    save_adapter(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ValueError, match=r"other frozen weights: .*running_(mean|var)"):
        load_adapter(resnet(moved=True), tmp_path / "a.safetensors")
    same = resnet()
    load_adapter(same, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(same(x), expected)
    # statistics that train are the adapter's own: another model's are written over
    model = resnet()
    apply_s2a(model, S2AConfig(bn_mode="train"))
    save_adapter(model, tmp_path / "b.safetensors")
    load_adapter(resnet(moved=True), tmp_path / "b.safetensors")

    # a buffer of the model's own that training moves (a DINO-style centre), in no adapter:
    # not a frozen weight, so not sampled (the first version sampled every buffer it left
    # out, and this adapter no longer loaded)
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = timm.create_model("resnet18", num_classes=0)
            self.head = nn.Linear(512, 3)
            self.register_buffer("center", torch.zeros(3))

        def forward(self, x):
            y = self.head(self.encoder(x))
            if self.training:
                with torch.no_grad():
                    self.center.mul_(0.9).add_(0.1 * y.mean(0))
            return y

    # a FrozenBatchNorm2d's buffers (its scale and shift too) never train: sampled
    def frozen_bn(scale=1.0):
        model = timm.layers.freeze_batch_norm_2d(resnet())
        model.bn1.weight.mul_(scale)
        return model

    model = frozen_bn()
    apply_s2a(model, S2AConfig(add_bias=True))
    save_adapter(model, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match=r"other frozen weights: 1 of .*bn1\.weight"):
        load_adapter(frozen_bn(scale=3.0), tmp_path / "f.safetensors")
    load_adapter(frozen_bn(), tmp_path / "f.safetensors")

    model = Centred().train()
    apply_s2a(model, S2AConfig(head="head"))
    model(x).sum().backward()
    assert model.center.abs().sum() > 0
    save_adapter(model, tmp_path / "c.safetensors")
    load_adapter(Centred(), tmp_path / "c.safetensors")


def test_an_adapter_saved_with_an_option_that_did_nothing_still_loads(tmp_path):
    """``add_bias=True`` beside ``modules=['prompt']`` did nothing and was accepted until
    2026-12-07; refused since, a file written then could no longer be read."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = vit()
    apply_s2a(model, S2AConfig(modules=("prompt",), input_size=SIZE))
    perturb(model, 1)
    save_adapter(model, tmp_path / "a.safetensors")
    expected = out(model)
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    saved = json.loads(metadata["s2a_config"])
    # as an earlier version wrote them
    saved.update(add_bias=True, side_width=64, bnb_quant_type="fp4")
    save_file(tensors, tmp_path / "old.safetensors", {**metadata, "s2a_config": json.dumps(saved)})
    fresh = vit()
    handle = load_adapter(fresh, tmp_path / "old.safetensors")
    assert torch.equal(out(fresh), expected)
    assert not handle.config.add_bias and handle.config.side_width is None
    assert handle.config.bnb_quant_type == "nf4"
    with pytest.raises(ValueError, match=r"add_bias=True acts only with the 'bias' module"):
        S2AConfig(**saved)  # asked for anew, it is an error
