"""The Lightning layer: callback and strategy on a user-style LightningModule."""

from __future__ import annotations

import csv
import re
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_s2a import S2ACallback, S2AConfig, S2AStrategy
from lightning_s2a.structure import four_bit
from tests.lightning_helpers import EncoderClassifier, UserModule, _data, quiet_trainer


def _fit(tmp_path, epochs=2, ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0, workers=True)
    model = UserModule()
    trainer = quiet_trainer(
        max_epochs=epochs,
        logger=CSVLogger(tmp_path, name="log"),
        enable_checkpointing=True,
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(model, _data(), _data(8), ckpt_path=ckpt_path)
    return model, trainer


S2A = {"modules": ("bias", "prompt"), "input_size": (3, 32, 32)}


def test_callback_trains_only_s2a_parameters_and_logs_metrics(tmp_path):
    pl.seed_everything(0)
    initial = UserModule().state_dict()
    model, trainer = _fit(tmp_path, callbacks=[S2ACallback(S2AConfig(**S2A))])
    changed = {
        k for k, v in model.state_dict().items() if k in initial and not torch.equal(v, initial[k])
    }
    assert changed and all(k.endswith("bias") or k.startswith("backbone.head.") for k in changed)
    assert any("s2a_prompt" in k for k in model.state_dict())  # prompts stay after fit
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("s2a/compression")]
    assert len(rows) == 2  # one per epoch
    for key in (
        "s2a/activation_raw_mb",
        "s2a/activation_stored_mb",
        "s2a/peak_memory_mb",
        "s2a/trainable_params",
        "s2a/trainable_pct",
    ):
        assert float(rows[-1][key]) > 0, key
    assert float(rows[-1]["s2a/compression"]) > 4
    # the last epoch's metrics are also on the callback, as logged
    callback = next(c for c in trainer.callbacks if isinstance(c, S2ACallback))
    assert callback.epoch_metrics["s2a/compression"] == pytest.approx(
        float(rows[-1]["s2a/compression"])
    )


class _Unlogged(UserModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)  # no self.log: barebones refuses it


def test_barebones_trainer_gets_no_log_calls_and_keeps_the_metrics(recwarn):
    # Lightning warns at every self.log under barebones=True; the metrics stay readable
    pl.seed_everything(0)
    callback = S2ACallback(S2AConfig(**S2A))
    trainer = pl.Trainer(
        barebones=True, max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback]
    )
    trainer.fit(_Unlogged(), _data())
    assert not [w for w in recwarn if "barebones" in str(w.message)]
    assert callback.epoch_metrics["s2a/compression"] > 4
    assert callback.epoch_metrics["s2a/trainable_params"] > 0


def test_strategy_gives_the_same_weights_as_the_callback(tmp_path):
    by_callback, _ = _fit(tmp_path / "a", callbacks=[S2ACallback(S2AConfig(**S2A))])
    by_strategy, trainer = _fit(tmp_path / "b", strategy=S2AStrategy(S2AConfig(**S2A)))
    assert isinstance(trainer.strategy, S2AStrategy)
    a, b = by_callback.state_dict(), by_strategy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_strategy_by_name(tmp_path):
    model, trainer = _fit(tmp_path, epochs=1, strategy="s2a")
    assert isinstance(trainer.strategy, S2AStrategy)
    assert trainer.strategy.root_device == torch.device("cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        n.endswith("bias") or n.startswith("backbone.head.") for n in trainable
    )


def test_callback_and_strategy_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"S2A is configured twice.*not both"):
        _fit(tmp_path, epochs=1, strategy="s2a", callbacks=[S2ACallback()])


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    cfg = S2AConfig(**S2A, codebook_refresh=3, stochastic_rounding=True)
    full, _ = _fit(tmp_path / "full", epochs=2, callbacks=[S2ACallback(cfg)])
    _, first = _fit(tmp_path / "half", epochs=1, callbacks=[S2ACallback(cfg)])
    ckpt = tmp_path / "mid.ckpt"
    first.save_checkpoint(ckpt)
    resumed, _ = _fit(
        tmp_path / "resumed", epochs=2, ckpt_path=str(ckpt), callbacks=[S2ACallback(cfg)]
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_error_checkpoint_prompts_restored_at_another_input_size(tmp_path):
    """A prompt checkpoint evaluated at another image size stopped at PyTorch's size-mismatch
    error for every prompt, naming neither size; with as many positions in another layout
    it would have loaded, each row on another pixel. The size the prompts trained for is
    recorded now, and restoring at another is an error naming both and the fix."""

    def callback(size):
        config = S2AConfig(modules=("bias", "prompt"), input_size=size)
        return S2ACallback(config, backbone="encoder")

    pl.seed_everything(0)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback((3, 32, 32))])
    trainer.fit(EncoderClassifier(arch="resnet"), _data())
    ckpt = tmp_path / "prompts.ckpt"
    trainer.save_checkpoint(ckpt)
    for size in ((3, 48, 48), (3, 16, 64)):  # other positions; as many in another layout
        message = (
            f"the checkpoint's prompts were sized for input (3, 32, 32), and S2A here for {size}"
        )
        fix = "S2AConfig(input_size=(3, 32, 32)) (CLI: --s2a.input_size [3,32,32])"
        with pytest.raises(ValueError, match=f"{re.escape(message)}.*{re.escape(fix)}"):
            quiet_trainer(callbacks=[callback(size)]).validate(
                EncoderClassifier(arch="resnet"), _data(8), ckpt_path=ckpt, verbose=False
            )
    quiet_trainer(callbacks=[callback((3, 32, 32))]).validate(
        EncoderClassifier(arch="resnet"), _data(8), ckpt_path=ckpt, verbose=False
    )


def test_test_after_fit_does_not_inject_twice(tmp_path):
    callback = S2ACallback(S2AConfig(**S2A))
    model, trainer = _fit(tmp_path, epochs=1, callbacks=[callback])
    handle = callback.handle
    prompts = [n for n, _ in model.named_modules() if n.endswith("s2a_prompt")]
    trainer.validate(model, _data(8))
    assert callback.handle is handle
    assert [n for n, _ in model.named_modules() if n.endswith("s2a_prompt")] == prompts
    assert not handle.engine.attached  # hooks are off outside fit


def test_whole_module_needs_a_findable_head(tmp_path):
    class NoBackbone(UserModule):
        def __init__(self):
            super().__init__()
            self.net = self.backbone
            del self.backbone

        def forward(self, x):
            return self.net(x)

    trainer = quiet_trainer(max_epochs=1, callbacks=[S2ACallback()], default_root_dir=tmp_path)
    # Both ways out are named: the backbone attribute, or the head inside the whole module.
    with pytest.raises(ValueError, match=r"no `backbone` attribute and no timm") as error:
        trainer.fit(NoBackbone(), _data(8))
    assert "S2ACallback(backbone='net')" in str(error.value)
    assert "S2AConfig(head='net.head')" in str(error.value)
    model = NoBackbone()
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[S2ACallback(head="net.head")], default_root_dir=tmp_path
    )
    trainer.fit(model, _data(8))
    assert (
        model.net.head.weight.requires_grad and not model.net.patch_embed.proj.weight.requires_grad
    )


def test_an_encoder_beside_a_classifier_is_told_to_name_the_backbone(tmp_path):
    # The README's layout without backbone=: the error named only a head inside the module
    # (S2AConfig(head='classifier')), which would S2A the classifier with the encoder.
    class EncoderAndHead(UserModule):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, depth=1, img_size=32, patch_size=8
            )
            self.classifier = nn.Linear(self.encoder.num_features, 4)
            del self.backbone

        def forward(self, x):
            return self.classifier(self.encoder(x))

    trainer = quiet_trainer(max_epochs=1, callbacks=[S2ACallback()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"S2ACallback\(backbone='encoder'\)") as error:
        trainer.fit(EncoderAndHead(), _data(8))
    assert "S2AStrategy(backbone='encoder')" in str(error.value)
    assert "classifier (Linear, 772 parameters)" in str(error.value)


def test_a_head_named_outside_the_backbone_is_told_where_heads_are_found(tmp_path):
    # --s2a.backbone encoder --s2a.head classifier: the error said only that the encoder
    # has no such submodule.
    callback = S2ACallback(S2AConfig(head="classifier"), backbone="encoder")
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"looked up inside the backbone 'encoder'") as error:
        trainer.fit(EncoderClassifier(), _data(8))
    assert "EncoderClassifier.classifier is outside it" in str(error.value)
    for head, said in ((" classifier", "is outside it"), ("encoder.norm", "from there: 'norm'")):
        callback = S2ACallback(S2AConfig(head=head), backbone="encoder")
        trainer = quiet_trainer(max_epochs=1, callbacks=[callback], default_root_dir=tmp_path)
        with pytest.raises(ValueError, match=said):
            trainer.fit(EncoderClassifier(), _data(8))


class _TorchvisionLike(nn.Module):
    """A backbone with its classifier inside and no timm get_classifier() (torchvision's)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def test_a_backbone_holding_the_only_classifier_must_name_it(tmp_path):
    class Whole(UserModule):
        def __init__(self, own_head: bool = False):
            super().__init__()
            self.backbone = _TorchvisionLike()
            self.own = nn.Linear(4, 4) if own_head else None
            self.logit_scale = nn.Parameter(torch.ones(()))  # CLIP-style: trains, no head

        def forward(self, x):
            out = self.backbone(x) * self.logit_scale
            return self.own(out) if self.own is not None else out

    trainer = quiet_trainer(max_epochs=1, callbacks=[S2ACallback()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"classifier is inside the backbone.*head='fc'"):
        trainer.fit(Whole(), _data(8))
    model = Whole()
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[S2ACallback(head="fc")], default_root_dir=tmp_path
    )
    before = model.backbone.fc.weight.detach().clone()
    trainer.fit(model, _data(8))
    assert not torch.equal(model.backbone.fc.weight, before)  # the named head trained
    # the user's own head outside the backbone: the backbone's fc is taken as frozen
    model = Whole(own_head=True)
    trainer = quiet_trainer(max_epochs=1, callbacks=[S2ACallback()], default_root_dir=tmp_path)
    trainer.fit(model, _data(8))
    assert model.own.weight.requires_grad and not model.backbone.fc.weight.requires_grad


def _compression(trainer) -> float:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("s2a/compression")]
    return float(rows[-1]["s2a/compression"])


def test_bf16_mixed_precision_and_a_bf16_frozen_backbone(tmp_path, recwarn):
    _, plain = _fit(
        tmp_path / "a", epochs=1, precision="bf16-mixed", callbacks=[S2ACallback(S2AConfig(**S2A))]
    )
    # said: the copies autocast makes cost more than the compression saves
    said = [w for w in recwarn if "frozen_dtype='bfloat16'" in str(w.message)]
    assert len(said) == 1 and "autocast copies every frozen" in str(said[0].message)
    recwarn.clear()
    seen = set()

    class Dtypes(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            fc1 = pl_module.backbone.blocks[0].mlp.fc1
            seen.add((fc1.weight.dtype, fc1.bias.dtype))

    callback = S2ACallback(S2AConfig(**S2A, frozen_dtype="bfloat16"))
    _, cast = _fit(tmp_path / "b", epochs=1, precision="bf16-mixed", callbacks=[callback, Dtypes()])
    # frozen weight in bf16 during training, the bias trains in fp32
    assert seen == {(torch.bfloat16, torch.float32)}
    # autocast copied every frozen weight to bf16 each step and kept the copies for backward;
    # with the backbone already in bf16 there is nothing to copy
    linear = callback.handle.stats()["by_kind"].get("linear", {"stored_bytes": 0})
    assert linear["stored_bytes"] == 0
    assert _compression(cast) > 2 * _compression(plain)
    assert not [w for w in recwarn if "autocast copies every frozen" in str(w.message)]
    # a model converted to bf16 already: autocast copies nothing, nothing to say
    for dtype, said in ((torch.bfloat16, False), (torch.float32, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback = S2ACallback(**S2A)
            trainer = quiet_trainer(max_steps=1, precision="bf16-mixed", callbacks=[callback])
            trainer.fit(UserModule().to(dtype), _data())
        assert any("autocast copies every frozen" in str(w.message) for w in caught) == said


def test_frozen_dtype_is_undone_exactly():
    model = timm.create_model("resnet18", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from lightning_s2a import apply_s2a

    with apply_s2a(model, frozen_dtype="float16"):
        assert model.conv1.weight.dtype == torch.float16
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_callback_writes_an_adapter_that_loads_on_a_fresh_module(tmp_path):
    from lightning_s2a import load_adapter

    path = tmp_path / "task.safetensors"
    model, _ = _fit(
        tmp_path, epochs=1, callbacks=[S2ACallback(S2AConfig(**S2A), adapter_path=str(path))]
    )
    assert path.exists() and path.stat().st_size < 0.1 * sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    pl.seed_everything(0)
    fresh = UserModule()
    load_adapter(fresh, path)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_frozen_dtype_without_mixed_precision_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"frozen_dtype='bfloat16'.*needs mixed precision"):
        _fit(tmp_path, epochs=1, callbacks=[S2ACallback(frozen_dtype="bfloat16")])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_frozen_dtype_other_than_the_autocast_dtype_is_an_error(tmp_path, precision):
    """fp16 weights under bf16 autocast were rounded twice: the in-fit validation loss was
    not the one after fit (4.9e-4 apart). On CPU Lightning runs '16-mixed' as bf16."""
    with pytest.raises(ValueError, match=r"frozen_dtype='float16'.*autocasts to bfloat16"):
        _fit(
            tmp_path, epochs=1, precision=precision, callbacks=[S2ACallback(frozen_dtype="float16")]
        )


def test_four_bit_frozen_weights_train_in_fp32_and_log_weight_bytes(tmp_path):
    """nf4 needs no mixed precision (each layer dequantizes to its own dtype); the epoch
    metrics report the weights held against the weights as built; after fit the model keeps
    its weights in 4 bits, as it trained (validated after fit as during it), and its state
    dict holds the exact fp32 weights."""
    pl.seed_everything(0)
    initial = UserModule().state_dict()
    callback = S2ACallback(S2AConfig(**S2A, frozen_dtype="nf4"))
    model, trainer = _fit(tmp_path, epochs=1, callbacks=[callback])
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("s2a/weights_mb"))
    held, built = float(row["s2a/weights_mb"]), float(row["s2a/weights_built_mb"])
    assert 0 < 4 * held < built  # Linear weights dominate this backbone: well over 4x
    state = model.state_dict()
    frozen = [k for k, v in initial.items() if v.dim() >= 2 and k.startswith("backbone.blocks")]
    assert frozen and all(torch.equal(state[k], initial[k]) for k in frozen)
    # Validated after fit on the weights it trained with: the loss it logged in its last
    # validation (before 2026-12-06 the exact weights came back after fit, a different model).
    during = trainer.callback_metrics["val/loss"].item()
    after = trainer.validate(model, _data(8), verbose=False)[0]["val/loss"]
    assert after == pytest.approx(during, abs=1e-6)
    assert any(four_bit.is_held(m) for m in model.backbone.modules())


def test_a_reused_callback_applies_s2a_to_a_new_module(tmp_path):
    callback = S2ACallback(S2AConfig(**S2A))
    first, _ = _fit(tmp_path / "a", epochs=1, callbacks=[callback])
    second, _ = _fit(tmp_path / "b", epochs=1, callbacks=[callback])
    assert callback.handle.model is second.backbone
    assert any("s2a_prompt" in n for n, _ in second.named_modules())
    assert any("s2a_prompt" in n for n, _ in first.named_modules())  # the first keeps its own


@pytest.mark.parametrize(
    "strategy,fix", [("ddp_spawn", "ddp_notebook"), ("ddp_fork", "S2A applied before fit")]
)
def test_workers_copying_the_model_refuse_s2a_that_adds_weights(strategy, fix):
    """ddp_spawn/ddp_fork workers train copies; Lightning loads their result back with
    strict=False, which drops weights the caller's model lacks (S2A's prompts). Refused in
    setup, before anything trains, with the model as it was; bias-only adds no weight."""
    from lightning_s2a import get_handle

    pl.seed_everything(0)
    model = UserModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(devices=2, strategy=strategy)
    prompts = S2ACallback(S2AConfig(modules=("bias", "prompt"), input_size=(3, 32, 32)))
    with pytest.raises(RuntimeError, match=rf"model.backbone.*s2a_prompt.*strategy='ddp'.*{fix}"):
        prompts.setup(trainer, model, "fit")
    assert get_handle(model.backbone) is None
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    bias = S2ACallback(S2AConfig(modules=("bias",)))
    bias.setup(trainer, model, "fit")
    assert get_handle(model.backbone) is bias.handle is not None
    bias.teardown(trainer, model, "fit")
    bias.handle.remove()


def test_s2a_applied_before_fit_is_taken_up_after_an_averaging_callback(tmp_path):
    """S2A applied before fit (as a forked DDP run needs) is taken up: an EMA listed before
    S2ACallback copies a model that already has S2A (it was refused: "copied the model
    before S2A changed its parameters"), and a config that names the size S2A took when
    applied without one is the same config (it was refused: "fields ['input_size']")."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from lightning_s2a import apply_s2a, get_handle

    pl.seed_everything(0)
    model = UserModule()
    handle = apply_s2a(model.backbone, S2AConfig(modules=("bias", "prompt")))
    size = tuple(handle.structure.input_size)
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt"), input_size=size))
    trainer = quiet_trainer(max_epochs=1, callbacks=[EMAWeightAveraging(), callback])
    prompt = model.backbone.blocks[0].s2a_prompt.A.detach().clone()
    trainer.fit(model, _data())
    assert callback.handle is handle and get_handle(model.backbone) is handle
    assert not torch.equal(model.backbone.blocks[0].s2a_prompt.A, prompt)  # it trained


def test_a_lazy_head_outside_the_backbone_counts_as_its_head():
    """A LazyLinear head (not built before the first batch) was refused: its weight's
    dim() raised."""
    from lightning_s2a.lightning.target_checks import check_head_outside

    module = UserModule()
    module.classifier = nn.LazyLinear(4)
    check_head_outside(module, module.backbone, "backbone")  # no error
    module.classifier = nn.Identity()
    module.scale = nn.Parameter(torch.ones(()))  # a scalar is no head
    for p in module.backbone.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no weight in UserModule outside it trains"):
        check_head_outside(module, module.backbone, "backbone")


def test_a_head_registered_under_two_names_counts_once_beside_the_backbone():
    """``self.net = Sequential(encoder, head)`` and ``self.classifier = net[1]``: the head's
    parameters were counted under both children, and a backbone larger than the head was
    said to be smaller than what trains beside it."""
    import warnings

    from lightning_s2a.lightning.target_checks import warn_small_backbone

    module = pl.LightningModule()
    module.encoder = nn.Linear(100, 100)  # 10,100 parameters
    module.net = nn.Sequential(module.encoder, nn.Linear(100, 60))  # a head of 6,060
    module.classifier = module.net[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_small_backbone(module, module.encoder, "encoder")  # 6,060 < 10,100: no warning
    module.other = nn.Linear(100, 50)  # 5,050 more trains beside it: 11,110 > 10,100
    with pytest.warns(UserWarning, match=r"10,100 parameters, and 11,110 outside it"):
        warn_small_backbone(module, module.encoder, "encoder")


def test_a_plain_fit_after_an_s2a_fit_says_what_it_trains():
    """After an S2A fit the engine is stopped and S2A's freezing stays (the trained model is
    kept for validate, test and checkpoints): a plain Trainer's fit then trained the biases
    only, uncompressed, silently. Evaluation (also with the S2A trainer, which stops the
    engine again), a copy and TorchScript stay quiet and work."""
    import copy
    import warnings

    from lightning_s2a import get_handle

    model = UserModule()
    trainer = quiet_trainer(max_steps=1, callbacks=[S2ACallback()])
    trainer.fit(model, _data())
    handle = get_handle(model.backbone)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*S2A stopped")
        trainer.validate(model, _data(8))  # the S2A trainer: stopped again, still watched
        quiet_trainer().validate(model, _data(8))
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        model.eval()(x).sum().backward()  # a saliency map: eval mode trains nothing
        model.train()
        copy.deepcopy(model).train().backbone(torch.randn(2, 3, 32, 32)).sum().backward()
        torch.jit.script(copy.deepcopy(model.backbone.blocks[0].mlp))  # no module hook added
    with pytest.warns(UserWarning, match=rf"S2A stopped.*only {trainable:,} parameters"):
        quiet_trainer(max_steps=1).fit(model, _data())
    with warnings.catch_warnings():  # said once; gone after remove()
        warnings.filterwarnings("error", message=".*S2A stopped")
        quiet_trainer(max_steps=1).fit(model, _data())
        handle.remove()
        quiet_trainer(max_steps=1).fit(model, _data())
    assert all(p.requires_grad for p in model.parameters())


class DualEncoder(pl.LightningModule):
    """A CLIP-like project: the image encoder S2A'd by the callback, a second encoder S2A'd
    by the user in ``__init__``, each with its projection, a contrastive loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
        )
        self.text_encoder = nn.Sequential(nn.Linear(12, 64), nn.GELU(), nn.Linear(64, 64))
        self.image_proj, self.text_proj = nn.Linear(192, 16), nn.Linear(64, 16)
        from lightning_s2a import apply_s2a

        apply_s2a(self.text_encoder, head=None, input_size=(12,))

    def training_step(self, batch, batch_idx):
        x, y = batch
        text = torch.nn.functional.one_hot(y, 12).float() + 0.1 * x.mean((2, 3)).repeat(1, 4)
        a = self.image_proj(self.image_encoder(x))
        b = self.text_proj(self.text_encoder(text))
        logits = a @ b.t()
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(x)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_other_s2a_modules_count_in_the_metrics_and_the_checkpoint(tmp_path):
    """A second encoder S2A'd with apply_s2a beside the callback's: its bytes were missing
    from s2a/* (2.10 MB logged where the step kept 4.2) and its codebooks from checkpoints
    (a resumed run coded it afresh: weights 1.5e-3 apart from the uninterrupted run)."""
    from lightning_s2a import get_handle
    from lightning_s2a.lightning.metrics import MB

    model = DualEncoder()
    callback = S2ACallback(backbone="image_encoder")
    trainer = quiet_trainer(max_steps=1, callbacks=[callback])
    trainer.fit(model, _data())
    own, other = get_handle(model.image_encoder), get_handle(model.text_encoder)
    assert not other.engine._per_step  # back to per-forward accounting after the fit
    both = own.engine.step_stats()["raw_bytes"] + other.engine.step_stats()["raw_bytes"]
    assert other.engine.step_stats()["raw_bytes"] > 0
    assert callback.epoch_metrics["s2a/activation_raw_mb"] == pytest.approx(both / MB)
    path = tmp_path / "dual.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    assert set(saved["other_engines"]) == {"text_encoder"}
    resumed = DualEncoder()
    quiet_trainer(max_steps=1, callbacks=[S2ACallback(backbone="image_encoder")]).fit(
        resumed, _data(), ckpt_path=path
    )
    engine = get_handle(resumed.text_encoder).engine
    assert engine.step == other.engine.step > 0
    assert engine.codebooks.keys() == other.engine.codebooks.keys()
    assert all(
        torch.equal(engine.codebooks[k].boundaries, other.engine.codebooks[k].boundaries)
        for k in engine.codebooks
    )
    from lightning_s2a import load_from_checkpoint

    loaded = get_handle(load_from_checkpoint(DualEncoder, path).text_encoder).engine
    assert loaded.step == other.engine.step and loaded.codebooks.keys() == engine.codebooks.keys()


def test_an_adapter_path_with_other_s2a_modules_is_refused_before_training(tmp_path):
    model = DualEncoder()
    before = model.text_proj.weight.clone()
    callback = S2ACallback(backbone="image_encoder", adapter_path=str(tmp_path / "a.st"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"other S2A'd modules beside the callback's \(text_enc"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(model, _data())
    assert torch.equal(model.text_proj.weight, before)  # nothing trained
    from lightning_s2a import get_handle

    assert get_handle(model.image_encoder) is None  # nothing applied
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


class _OutOfMemoryOnce(UserModule):
    """A user's out-of-memory handling: on batch 1 the backbone raises inside (a forward
    hook, as an allocation failing in a block would), and the step retries the batch
    (``retry``) or skips it by returning None."""

    def __init__(self, retry: bool):
        super().__init__()
        self.retry = retry

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:

            def boom(*args):
                raise RuntimeError("CUDA out of memory (simulated)")

            hook = self.backbone.blocks[1].register_forward_hook(boom)
            try:
                self(batch[0])
            except RuntimeError:
                if not self.retry:
                    return None
            finally:
                hook.remove()
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("retry", [True, False])
def test_a_step_whose_forward_raised_logs_only_what_stayed_alive(retry, recwarn):
    """The failed forward's bytes were added to the step (a retried step logged about twice
    its bytes); a batch skipped after the error counted as a measured step of 0 bytes and
    warned that the backbone "saved no tensors", a warning said once that then hid any
    real one."""
    metrics = []
    for model in (UserModule(), _OutOfMemoryOnce(retry)):
        pl.seed_everything(0)
        callback = S2ACallback(S2AConfig(**S2A))
        quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, _data())
        metrics.append(callback.epoch_metrics)
    keys = ("s2a/activation_raw_mb", "s2a/activation_stored_mb")
    assert metrics[0]["s2a/activation_raw_mb"] > 0
    assert all(metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-9) for k in keys)
    assert not [w for w in recwarn if "saved no tensors" in str(w.message)]


def test_resuming_with_s2a_on_another_part_of_the_module_is_refused(tmp_path):
    """A checkpoint of S2A on ``encoder`` resumed with S2A on the whole module (the CLI's
    ``--s2a.backbone null``): its weights loaded, and another set of parameters trained on
    from them, silently. The same part resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.lightning_helpers import EncoderClassifier

    class Model(EncoderClassifier):  # head="auto" finds its head whole or not: same config
        def get_classifier(self):
            return self.classifier

    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(
        max_steps=2, callbacks=[S2ACallback(backbone="encoder"), saver], enable_checkpointing=True
    )
    trainer.fit(Model(), _data())
    last = str(tmp_path / "last.ckpt")
    whole = quiet_trainer(max_steps=4, callbacks=[S2ACallback()])
    with pytest.raises(ValueError, match=r"applied to 'encoder' of Model; this run "
                       r"applies it to the whole module.*--s2a.backbone encoder"):  # fmt: skip
        whole.fit(Model(), _data(), ckpt_path=last)
    same = quiet_trainer(max_steps=4, callbacks=[S2ACallback(backbone="encoder")])
    same.fit(Model(), _data(), ckpt_path=last)
    assert same.global_step == 4
