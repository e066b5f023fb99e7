"""S2A on a user's own Lightning project: own encoder and head, own entry points, own CLI classes.

Every test here failed silently (or crashed) before the layouts below were supported; see
docs/lightning.md, "Layouts".
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_s2a import (
    S2ACallback,
    S2AConfig,
    S2AStrategy,
    apply_s2a,
    get_handle,
    load_adapter,
    load_from_checkpoint,
)
from lightning_s2a.lightning.cli import S2ALightningCLI
from lightning_s2a.lightning.cli_sources import default_config_files, refuse_printing_carried_args
from tests.lightning_helpers import (
    EncoderClassifier,
    FourWayData,
    LateEncoder,
    UserModule,
    _data,
    quiet_trainer,
)

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _trainer(tmp_path, callbacks, epochs=1, **kwargs):
    return quiet_trainer(
        max_epochs=epochs,
        logger=CSVLogger(tmp_path, name="log"),
        enable_checkpointing=True,
        deterministic=True,
        callbacks=callbacks,
        **kwargs,
    )


def _fit(tmp_path, model, callback, epochs=1, callbacks_after=(), **kwargs):
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, [callback, *callbacks_after], epochs=epochs, **kwargs)
    trainer.fit(model, _data(16), _data(8))
    return trainer


class _SizedData(FourWayData):
    input_size = (3, 32, 32)


def _metrics(trainer) -> dict[str, float]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("s2a/compression")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("s2a/")}


# 1. An adapter holds everything that trained -------------------------------------------
@pytest.mark.parametrize("modules", [("bias",), ("bias", "prompt")])
def test_adapter_holds_the_head_outside_the_backbone(tmp_path, modules):
    path = tmp_path / "task.safetensors"
    callback = S2ACallback(S2AConfig(modules=modules), backbone="encoder", adapter_path=str(path))
    pl.seed_everything(0)
    model = EncoderClassifier()
    _fit(tmp_path, model, callback)
    pl.seed_everything(0)  # the same (here random) backbone; its head as initialised
    fresh = EncoderClassifier()
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    load_adapter(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))


def test_summary_gives_the_whole_modules_trainable_count_as_logged(tmp_path, monkeypatch):
    # The summary counts the S2A'd encoder; s2a/trainable_params the whole module, head too
    from lightning_s2a.lightning import callback as callback_module

    said = []
    monkeypatch.setattr(callback_module, "rank_zero_info", said.append)
    trainer = _fit(tmp_path, EncoderClassifier(), S2ACallback(backbone="encoder"))
    summary = next(s for s in said if "trainable:" in s)
    logged = int(_metrics(trainer)["s2a/trainable_params"])
    line = next(x for x in summary.splitlines() if x.startswith("whole EncoderClassifier"))
    assert f"{logged:,} trainable" in line
    encoder_only = int(summary.split("trainable: ")[1].split(" of")[0].replace(",", ""))
    head = trainer.lightning_module.classifier
    assert logged == encoder_only + sum(p.numel() for p in head.parameters())


def test_adapter_holds_batch_norm_statistics_that_trained(tmp_path):
    pl.seed_everything(0)
    model = EncoderClassifier(arch="resnet")
    model.classifier = nn.Sequential(nn.BatchNorm1d(512), nn.Linear(512, 4))  # the user's head
    path = tmp_path / "task.safetensors"
    _fit(tmp_path, model, S2ACallback(backbone="encoder", adapter_path=str(path)))
    pl.seed_everything(0)
    fresh = EncoderClassifier(arch="resnet")
    fresh.classifier = nn.Sequential(nn.BatchNorm1d(512), nn.Linear(512, 4))
    load_adapter(fresh, path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))


# 2. Compression and freezing do not depend on the entry point ----------------------------
def test_forward_features_is_compressed_and_frozen_batch_norm_never_changes(tmp_path):
    model = EncoderClassifier(arch="resnet", entry="forward_features")
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    trainer = _fit(tmp_path, model, S2ACallback(backbone="encoder"))
    metrics = _metrics(trainer)
    assert metrics["s2a/activation_raw_mb"] > 0 and metrics["s2a/compression"] > 4
    after = model.encoder.state_dict()
    assert frozen and all(torch.equal(after[k], v) for k, v in frozen.items())


def test_naming_the_head_as_backbone_warns_that_the_encoder_trains_in_full(tmp_path):
    # --s2a.backbone classifier: S2A'd the head and trained the encoder in full, said only
    # by the summary's trainable share.
    with pytest.warns(UserWarning, match=r"backbone='classifier'.*name it: S2ACallback\(backb"):
        _fit(tmp_path, EncoderClassifier(), S2ACallback(backbone="classifier"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "right", EncoderClassifier(), S2ACallback(backbone="encoder"))
    assert not [w for w in caught if "outside it train in full" in str(w.message)]


def test_whole_module_driven_through_its_parts_is_compressed(tmp_path):
    model = EncoderClassifier()  # training_step calls self.classifier(self.encoder(x))
    callback = S2ACallback(head="classifier")
    trainer = _fit(tmp_path, model, callback)
    assert callback.handle.model is model
    metrics = _metrics(trainer)
    assert metrics["s2a/activation_raw_mb"] > 0 and metrics["s2a/compression"] > 4
    by_part = callback.handle.stats()["by_part"]
    assert by_part["backbone"]["stored_bytes"] < by_part["backbone"]["raw_bytes"] / 4


def test_a_step_that_does_not_run_the_backbone_with_autograd_warns_once(tmp_path):
    model = EncoderClassifier(no_grad=True)
    with pytest.warns(UserWarning, match=r"ran no forward with autograd") as record:
        _fit(tmp_path, model, S2ACallback(backbone="encoder"))
    assert sum("ran no forward with autograd" in str(w.message) for w in record) == 1


class _CheckpointedWhole(EncoderClassifier):
    """The user wraps the whole encoder in torch.utils.checkpoint."""

    reentrant = False

    def features(self, x):
        x = x.requires_grad_(self.reentrant)  # reentrant: an input with a gradient, or none
        return torch.utils.checkpoint.checkpoint(self.encoder, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_backbone_checkpointed_whole_is_said_to_run_without_s2a_and_still_trains(
    tmp_path, reentrant
):
    """S2A stays out of a forward inside checkpoint's own saved-tensor hooks (or its
    reentrant recomputation in backward); the callback said the module ran no forward with
    autograd and its parameters got no gradient (they trained), and logged 0 MB saved,
    compression 1.0, for bytes it never saw."""
    model = _CheckpointedWhole()
    model.reentrant = reentrant
    before = {n: p.clone() for n, p in model.encoder.named_parameters() if n.endswith("bias")}
    callback = S2ACallback(backbone="encoder")
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, model, callback)
    said = [str(w.message) for w in record]
    assert sum("inside other saved-tensor hooks" in m for m in said) == 1
    assert not any("get no gradient" in m for m in said)
    after = dict(model.encoder.named_parameters())
    assert before and all(not torch.equal(after[n], p) for n, p in before.items())
    metrics = callback.epoch_metrics
    assert math.isnan(metrics["s2a/activation_raw_mb"]) and math.isnan(metrics["s2a/compression"])


def test_standalone_forward_features_accounts_every_part_until_backward():
    import timm

    from lightning_s2a import apply_s2a

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8)
    with apply_s2a(model) as handle:
        model.forward_head(model.forward_features(X)).sum().backward()
        parts = handle.stats()
        model(X).sum().backward()
        whole = handle.stats()
    assert parts["raw_bytes"] > 0
    assert parts["raw_bytes"] == whole["raw_bytes"]
    assert parts["stored_bytes"] == whole["stored_bytes"]


class TwoViews(EncoderClassifier):
    """Two augmented views of each batch through the encoder, one loss (SimCLR-style)."""

    def __init__(self, views: int = 2) -> None:
        super().__init__()
        self.views = views

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = [self.classifier(self.encoder(x.flip(-1) if i else x)) for i in range(self.views)]
        return sum(F.cross_entropy(z, y) for z in logits)


@pytest.mark.parametrize("backbone", ["encoder", None], ids=["named", "whole-module"])
def test_every_forward_of_a_step_is_counted(tmp_path, backbone):
    # Both views' saved tensors are alive until the one backward: the named backbone's
    # second forward started a new account, and the logged bytes were one view's.
    raw = {}
    for views in (1, 2):
        pl.seed_everything(0)
        model = TwoViews(views)
        kwargs = {"backbone": backbone} if backbone else {"config": S2AConfig(head="classifier")}
        callback = S2ACallback(**kwargs)
        trainer = _fit(tmp_path / str(views), model, callback)
        raw[views] = (callback.handle.stats()["raw_bytes"], _metrics(trainer))
    assert raw[2][0] == 2 * raw[1][0] > 0
    assert raw[2][1]["s2a/activation_raw_mb"] == pytest.approx(
        2 * raw[1][1]["s2a/activation_raw_mb"]
    )


# 3. The CLI respects the user's own classes ---------------------------------------------
class TwoPhases(EncoderClassifier):
    """Manual optimization with a backward per phase (a GAN's two updates): ``phases`` lists
    how many views of the batch each phase runs through the encoder."""

    def __init__(self, phases: tuple[int, ...]) -> None:
        super().__init__()
        self.phases = phases
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        for views in self.phases:
            views_x = [x.flip(-1) if i else x for i in range(views)]
            loss = sum(F.cross_entropy(self.classifier(self.encoder(v)), y) for v in views_x)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()


def test_a_step_with_several_backwards_reports_its_largest_account(tmp_path):
    """Each backward frees what its forwards saved: the step keeps at most its largest
    account. The logged bytes were the last phase's, so the same work in the other order
    logged half."""
    raw = {}
    for phases in ((2,), (2, 1), (1, 2)):
        pl.seed_everything(0)
        callback = S2ACallback(backbone="encoder")
        trainer = _fit(tmp_path / str(phases), TwoPhases(phases), callback)
        raw[phases] = _metrics(trainer)["s2a/activation_raw_mb"]
    assert raw[(2, 1)] == raw[(1, 2)] == raw[(2,)] > 0


class _Gan(EncoderClassifier):
    """A GAN step: its own generator with its own optimizer, the encoder plus classifier as
    the discriminator."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(x.flip(-1))
        loss_g = -self.classifier(self.encoder(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        loss_d = self.classifier(self.encoder(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d - self.classifier(self.encoder(x)).mean())
        opt_d.step()

    def configure_optimizers(self):
        def trained(prefix: str, inside: bool) -> list:
            params = self.named_parameters()  # what trains, as check_optimized asks
            return [p for n, p in params if p.requires_grad and n.startswith(prefix) == inside]

        return (
            torch.optim.SGD(trained("generator.", True), 0.1),
            torch.optim.SGD(trained("generator.", False), 0.1),
        )


class _DecaySplit(_Gan):
    """Two optimizers split by weight decay: every matrix (the head's too), and the rest."""

    def configure_optimizers(self):
        matrices = [p for p in self.parameters() if p.dim() > 1]
        rest = [p for p in self.parameters() if p.dim() <= 1]
        return torch.optim.SGD(matrices, 0.1), torch.optim.SGD(rest, 0.1)


def test_an_optimizer_whose_weights_s2a_froze_on_the_whole_module_is_named(tmp_path):
    """S2A on the whole module froze a GAN's generator (its own optimizer) but its biases,
    silently; naming the backbone leaves it alone."""
    for config in (S2AConfig(head="classifier"), S2AConfig(head="classifier", frozen_dtype="nf4")):
        with pytest.warns(UserWarning) as record:
            _fit(tmp_path / "a", _Gan(), S2ACallback(config), max_steps=1)
        said = [str(w.message) for w in record if "trains no weight" in str(w.message)]
        # the discriminator's optimizer trains the head's weight: only the generator's is named
        assert len(said) == 1 and said[0].startswith("optimizer 0"), said
        assert "generator.0.weight" in said[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path / "c", _DecaySplit(), S2ACallback(head="classifier"), max_steps=1)
    assert not [w for w in record if "trains no weight" in str(w.message)]
    model = _Gan()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(LeafSpec|log_every_n_steps|num_workers)")
        _fit(tmp_path / "b", model, S2ACallback(backbone="encoder"), max_steps=1)
    assert all(p.requires_grad for p in model.generator.parameters())


def test_cli_keeps_the_user_classes_defaults(tmp_path):
    cli = S2ALightningCLI(
        run=False,
        args=[
            "--model=tests.lightning_helpers.EncoderClassifier",
            "--data=tests.lightning_helpers.FourWayData",
            "--s2a.backbone=encoder",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.model, EncoderClassifier) and isinstance(cli.datamodule, FourWayData)
    assert cli.model.hparams.lr == 1e-3 and cli.model.hparams.scheduler is False
    assert cli.datamodule.batch_size == 8
    assert cli.s2a_callback.backbone == "encoder"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "model:\n  class_path: tests.lightning_helpers.EncoderClassifier\n"
        "data:\n  class_path: tests.lightning_helpers.FourWayData\n"
    )
    cli = S2ALightningCLI(run=False, args=["--config", str(config)])
    assert cli.model.hparams.lr == 1e-3 and cli.datamodule.batch_size == 8


class _KwargsClassifier(EncoderClassifier):
    """A user's subclass that passes its parent's arguments on through ``**kwargs``."""

    def __init__(self, depth: int = 1, **kwargs):
        super().__init__(**kwargs)


class _NeedsClasses(EncoderClassifier):
    """A user's class with an argument that has no default."""

    def __init__(self, lr: float, **kwargs):
        super().__init__(lr=lr, **kwargs)


class _Variant(EncoderClassifier):
    """A user's subclass of the class a config file names, with the same arguments."""


class _CallbackModule(EncoderClassifier):
    """A user's module that brings its own S2A through configure_callbacks(), and reads its
    trainer there (as a ModelCheckpoint under the log dir would)."""

    def configure_callbacks(self):
        assert self.trainer is not None
        return [S2ACallback(S2AConfig(bits=2), backbone="encoder")]


class _Unrelated(pl.LightningModule):
    """A user's module that is no subclass of the class a config file names."""

    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Linear(4, 4)


class _BareData(FourWayData):
    """A DataModule whose __init__ takes nothing."""

    def __init__(self):
        super().__init__()


def test_cli_a_class_named_over_a_config_files_keeps_its_own_defaults(tmp_path, capsys):
    """jsonargparse hands the config file's init_args for ImageClassifier to the class named
    on the command line: the quickstart's lr 3e-3 and batch 32 replaced the user's 1e-3 and 8."""
    quickstart = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.yaml")
    base = ["--config", quickstart, f"--trainer.default_root_dir={tmp_path}"]
    user = ["--data=tests.lightning_helpers.FourWayData", "--s2a.backbone=encoder"]
    args = [*base, "--model=tests.lightning_helpers.EncoderClassifier", *user]
    with pytest.warns(UserWarning, match=r"init_args for that class, \[.*'lr'.*\], are not"):
        cli = S2ALightningCLI(run=False, args=[*args, "--model.scheduler=true"])
    assert cli.model.hparams.lr == 1e-3  # its own default, not the quickstart's 3e-3
    assert cli.model.hparams.scheduler is True  # what the command line sets stays
    assert cli.datamodule.batch_size == 8  # FourWayData's own, not DigitsDataModule's 32
    cli = S2ALightningCLI(run=False, args=[*args, "--model.lr", "0.05"])
    assert cli.model.hparams.lr == 0.05
    # several values at once, as a dict (the lr was taken for the quickstart's, dropped)
    cli = S2ALightningCLI(run=False, args=[*args, "--model.init_args", '{"lr": 0.04}'])
    assert cli.model.hparams.lr == 0.04
    as_dict = (
        '{"class_path": "tests.lightning_helpers.EncoderClassifier", "init_args": {"lr": 0.02}}'
    )
    cli = S2ALightningCLI(run=False, args=[*base, "--model", as_dict, *user])
    assert cli.model.hparams.lr == 0.02  # set in the class's own dict: kept
    # the same from files: a second config naming the classes, and a --model file
    second = tmp_path / "user.yaml"
    second.write_text(
        "model:\n  class_path: tests.lightning_helpers.EncoderClassifier\n"
        "data:\n  class_path: tests.lightning_helpers.FourWayData\n"
    )
    cli = S2ALightningCLI(
        run=False, args=[*base, "--config", str(second), "--s2a.backbone=encoder"]
    )
    assert cli.model.hparams.lr == 1e-3 and cli.datamodule.batch_size == 8
    section = tmp_path / "model.yaml"
    section.write_text(
        "class_path: tests.lightning_helpers.EncoderClassifier\ninit_args:\n  lr: 0.5\n"
    )
    cli = S2ALightningCLI(run=False, args=[*base, "--model", str(section), *user])
    assert cli.model.hparams.lr == 0.5  # written in the class's own file: kept
    # the same class by another import path (a re-export) is the class's own, not another's
    reexported = tmp_path / "reexported.yaml"
    reexported.write_text(
        "model:\n  class_path: tests.test_user_project.EncoderClassifier\n"
        "  init_args:\n    lr: 0.25\n"
    )
    named = ["--model=tests.lightning_helpers.EncoderClassifier", *user]
    cli = S2ALightningCLI(run=False, args=[*base, "--config", str(reexported), *named])
    assert cli.model.hparams.lr == 0.25
    # a config naming the class in a file of its own, beside it, and a config given inline
    # (the class's own values were replaced by its defaults: the sources were not read)
    nested_dir = tmp_path / "nested"
    nested_dir.mkdir()
    (nested_dir / "my_model.yaml").write_text(
        "class_path: tests.lightning_helpers.EncoderClassifier\ninit_args:\n  lr: 0.05\n"
    )
    (nested_dir / "run.yaml").write_text(
        "model: my_model.yaml\ndata: tests.lightning_helpers.FourWayData\n"
    )
    nested = ["--config", str(nested_dir / "run.yaml"), "--s2a.backbone=encoder"]
    assert S2ALightningCLI(run=False, args=[*base, *nested]).model.hparams.lr == 0.05
    inline = (
        '{"model": {"class_path": "tests.lightning_helpers.EncoderClassifier", '
        '"init_args": {"lr": 0.07}}, "data": "tests.lightning_helpers.FourWayData"}'
    )
    cli = S2ALightningCLI(run=False, args=[*base, "--config", inline, "--s2a.backbone=encoder"])
    assert cli.model.hparams.lr == 0.07 and cli.datamodule.batch_size == 8
    # a default passed on through **kwargs is found up the class hierarchy
    kw = [*base, "--model=tests.test_user_project._KwargsClassifier", *user]
    assert S2ALightningCLI(run=False, args=kw).model.hparams.lr == 1e-3
    # a class that takes no arguments at all (it failed: "Namespace has no init_args")
    bare = [f"--trainer.default_root_dir={tmp_path}", "--s2a.backbone=encoder"]
    bare += ["--model=tests.lightning_helpers.EncoderClassifier"]
    cli = S2ALightningCLI(run=False, args=[*bare, "--data=tests.test_user_project._BareData"])
    assert type(cli.datamodule).__name__ == "_BareData" and cli.model.hparams.lr == 1e-3

    # a subclass of the file's class takes the file's values, as jsonargparse gives them
    # (its optimizer settings became the subclass's defaults, silently, until 2026-12-07)
    parent = tmp_path / "parent.yaml"
    parent.write_text(
        "model:\n  class_path: tests.lightning_helpers.EncoderClassifier\n"
        "  init_args:\n    lr: 0.3\n    scheduler: true\n"
        "data: tests.lightning_helpers.FourWayData\n"
    )
    variant = ["--config", str(parent), "--model=tests.test_user_project._Variant", *user]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*replaces the config file's class")
        cli = S2ALightningCLI(run=False, args=[f"--trainer.default_root_dir={tmp_path}", *variant])
    assert type(cli.model).__name__ == "_Variant"
    assert cli.model.hparams.lr == 0.3 and cli.model.hparams.scheduler is True
    # printing is no refusal for it, named by its class name alone either
    refuse_printing_carried_args(["--config", str(parent), "--model", "_Variant", "--print_config"])

    # no default to fall back to: a clear error, not the other class's value
    needs = [*base, "--model=tests.test_user_project._NeedsClasses", *user]
    with pytest.raises(SystemExit):
        S2ALightningCLI(run=False, args=needs)
    assert "has no default for it: set it, --model.lr VALUE" in capsys.readouterr().err


def test_cli_s2a_from_configure_callbacks_beside_the_section_is_an_error(tmp_path):
    # Lightning replaces the trainer's S2ACallback (the s2a section's) with the module's:
    # --s2a.bits 8 ran at 2 bits, said only in an info line.
    args = [
        "--model=tests.test_user_project._CallbackModule",
        "--data=tests.lightning_helpers.FourWayData",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    budget = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    cli = S2ALightningCLI(run=False, args=[*args, *budget, "--s2a.bits=8"])  # builds: the
    # module's hook reads its trainer, which exists only once fit starts
    with pytest.raises(ValueError, match=r"configure_callbacks\(\) returns one"):
        cli.trainer.fit(cli.model, cli.datamodule)
    cli = S2ALightningCLI(run=False, args=[*args, *budget, "--s2a.enabled=false"])
    assert cli.s2a_callback is None
    cli.trainer.fit(cli.model, cli.datamodule)  # the module's S2A runs
    assert get_handle(cli.model.encoder).config.bits == 2


def test_cli_default_config_files_name_the_classes(tmp_path, monkeypatch):
    # A user's CLI whose default config named its classes trained ImageClassifier on digits:
    # the shipped defaults, written into the arguments, overrode the file, silently.
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(
        "model:\n  class_path: tests.lightning_helpers.EncoderClassifier\n"
        "  init_args:\n    lr: 0.02\n"
        "data: tests.lightning_helpers.FourWayData\n"
        "s2a:\n  backbone: encoder\n"
    )
    cli = S2ALightningCLI(
        run=False,
        args=[f"--trainer.default_root_dir={tmp_path}"],
        parser_kwargs={"default_config_files": [str(tmp_path / "default*.yaml")]},
    )
    assert type(cli.model) is EncoderClassifier and type(cli.datamodule) is FourWayData
    assert cli.model.hparams.lr == 0.02
    # a class named on the command line still wins over the file
    cli = S2ALightningCLI(
        run=False,
        args=[f"--trainer.default_root_dir={tmp_path}", "--model=tests.test_user_project._Variant"],
        parser_kwargs={"default_config_files": [str(defaults)]},
    )
    assert type(cli.model).__name__ == "_Variant" and cli.model.hparams.lr == 0.02  # carried
    # a class that is no subclass gets its own defaults, with a word, as from a --config
    # (the default file's lr reached it silently)
    with pytest.warns(UserWarning, match=r"init_args for that class, \['lr'\]"):
        cli = S2ALightningCLI(
            run=False,
            args=[
                f"--trainer.default_root_dir={tmp_path}",
                "--model=tests.test_user_project._Unrelated",
            ],
            parser_kwargs={"default_config_files": [str(defaults)]},
        )
    assert cli.model.hparams.lr == 1e-3
    # "~" is expanded, as jsonargparse does; a subcommand's files are its own
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_config_files({"default_config_files": ["~/defaults.yaml"]}, []) == [
        str(defaults)
    ]
    per_fit = {"fit": {"default_config_files": [str(defaults)]}}
    assert default_config_files(per_fit, ["fit"]) == [str(defaults)]
    assert default_config_files(per_fit, ["test"]) == []


# 4. Checkpoints load in one call ---------------------------------------------------------
def test_prompt_checkpoint_loads_into_a_fresh_module(tmp_path):
    pl.seed_everything(0)
    model = EncoderClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, [callback, ckpt])
    trainer.fit(model, _data(16))
    # the ordinary call fails, and its error names the call that works
    with pytest.raises(RuntimeError, match=r"Unexpected .*load with lightning_s2a.load_from_ch"):
        EncoderClassifier.load_from_checkpoint(ckpt.last_model_path)
    loaded = load_from_checkpoint(EncoderClassifier, ckpt.last_model_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))
    assert get_handle(loaded.encoder).config == callback.handle.config
    # strict= as Lightning's takes it (it was passed twice: TypeError); False loads what fits
    checkpoint = torch.load(ckpt.last_model_path, weights_only=False)
    del checkpoint["state_dict"]["encoder.blocks.0.s2a_prompt.B"]
    partial = str(tmp_path / "partial.ckpt")
    torch.save(checkpoint, partial)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"encoder.blocks.0.s2a_prompt.B"'):
        load_from_checkpoint(EncoderClassifier, partial, strict=True)
    lenient = load_from_checkpoint(EncoderClassifier, partial, strict=False).eval()
    prompts = [n for n, _ in lenient.named_parameters() if "s2a_prompt" in n]
    for name, p in lenient.named_parameters():
        if name != "encoder.blocks.0.s2a_prompt.B":
            assert torch.equal(p, model.get_parameter(name)), name
    assert len(prompts) > 2


def test_resuming_a_plain_fit_under_s2a_is_refused_unless_the_same_set_trains(tmp_path):
    """fit(ckpt_path=...) of a full fine-tune under S2A (the CLI's default) went on training
    the biases only, silently (with a stateless optimizer nothing failed to load)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    full = ModelCheckpoint(dirpath=tmp_path / "full", save_last=True)
    _trainer(tmp_path, [full]).fit(EncoderClassifier(), _data(16))
    callback = S2ACallback(backbone="encoder")
    with pytest.raises(ValueError, match=r"trained without S2A: \d+ parameters trained in it"):
        _trainer(tmp_path, [callback], epochs=2).fit(
            EncoderClassifier(), _data(16), ckpt_path=full.last_model_path
        )
    # A run that trained the same set (biases and the head, frozen by the user) resumes,
    # compressed from then on. AdamW holds every parameter; those with state trained.
    pl.seed_everything(0)
    own = EncoderClassifier()
    for name, p in own.encoder.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    bitfit = ModelCheckpoint(dirpath=tmp_path / "bitfit", save_last=True)
    _trainer(tmp_path, [bitfit]).fit(own, _data(16))
    resumed = EncoderClassifier()
    _trainer(tmp_path, [S2ACallback(backbone="encoder")], epochs=2).fit(
        resumed, _data(16), ckpt_path=bitfit.last_model_path
    )
    assert get_handle(resumed.encoder) is not None


def test_evaluating_a_plain_checkpoint_in_4_bits_is_said(tmp_path):
    """validate(ckpt_path=...) of a checkpoint saved without S2A, by a Trainer whose S2A holds
    frozen weights in 4 bits: its weights are quantized on load, so the metrics are the 4-bit
    model's (a reviewer's val loss 2.0509 against 2.0365 as saved), and nothing said so."""
    pl.seed_everything(0)
    plain = ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)
    _trainer(tmp_path, [plain]).fit(EncoderClassifier(), _data(16))
    callback = S2ACallback(S2AConfig(frozen_dtype="nf4"), backbone="encoder")
    own = ModelCheckpoint(dirpath=tmp_path / "own", save_last=True)
    model = EncoderClassifier()
    trainer = _trainer(tmp_path, [callback, own])
    trainer.fit(model, _data(16))
    with pytest.warns(UserWarning, match=r"saved without S2A.*frozen_dtype='nf4'.*quantized"):
        trainer.validate(model, _data(8), ckpt_path=plain.last_model_path, verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saved without S2A")
        trainer.validate(model, _data(8), ckpt_path=own.last_model_path, verbose=False)


class _Lenient(pl.LightningModule):
    """A module that loads partial checkpoints (``strict_loading = False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, 2)
        self.strict_loading = False


def test_load_from_checkpoint_follows_the_modules_strict_loading(tmp_path):
    """strict=True passed on by default contradicted a module's strict_loading=False, and
    Lightning refused the load (it worked before strict= was taken)."""
    path = tmp_path / "plain.ckpt"
    checkpoint = {
        "state_dict": {},
        "hyper_parameters": {},
        "pytorch-lightning_version": pl.__version__,
    }
    torch.save(checkpoint, path)  # partial: nothing in it
    assert isinstance(load_from_checkpoint(_Lenient, path), _Lenient)


def test_a_weights_only_checkpoint_loads_into_a_fresh_module(tmp_path):
    # save_weights_only=True stores no callback state: load_from_checkpoint fell back to the
    # ordinary call, whose error sent the user back to load_from_checkpoint.
    pl.seed_everything(0)
    model = EncoderClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=True)
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    trainer = _trainer(tmp_path, [callback, ckpt])
    trainer.fit(model, _data(16))
    loaded = load_from_checkpoint(EncoderClassifier, ckpt.last_model_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))
    # resumed under another config: still checked before the weights load
    other = S2ACallback(S2AConfig(modules=("bias", "prompt"), prompt_rank=4), backbone="encoder")
    with pytest.raises(ValueError, match=r"trained with S2A prompt_rank=8 \(this run: 4\)"):
        _trainer(tmp_path, [other]).test(
            EncoderClassifier(), _data(8), ckpt_path=ckpt.last_model_path
        )
    # saved after fit (no record): an error that says what the checkpoint lacks
    after = str(tmp_path / "after_fit.ckpt")
    trainer.save_checkpoint(after, weights_only=True)
    with pytest.raises(ValueError, match=r"S2A added or held in 4 bits \(in encoder\) but not"):
        load_from_checkpoint(EncoderClassifier, after)


def test_a_checkpoint_restored_under_another_model_config_is_an_error(tmp_path):
    # bn_mode, side_merge or frozen_dtype change no parameter shape: the weights loaded, and
    # test --ckpt_path silently evaluated another model than the one trained.
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [S2ACallback(backbone="encoder"), checkpoint])
    trainer.fit(EncoderClassifier(arch="resnet"), _data(16))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    # a data module with an input_size at test (none at fit) changes nothing here
    plain = S2ACallback(backbone="encoder")
    _trainer(tmp_path, [plain]).test(
        EncoderClassifier(arch="resnet"), datamodule=_SizedData(), ckpt_path=last
    )
    other = S2ACallback(S2AConfig(bn_mode="train"), backbone="encoder")
    with pytest.raises(ValueError, match=r"trained with S2A bn_mode='eval' \(this run: 'train'\)"):
        _trainer(tmp_path, [other]).test(EncoderClassifier(arch="resnet"), _data(8), ckpt_path=last)
    # the same model config with other storage (bits) restores, for test and for resume
    same = S2ACallback(S2AConfig(bits=2), backbone="encoder")
    _trainer(tmp_path, [same]).test(EncoderClassifier(arch="resnet"), _data(8), ckpt_path=last)
    resumed = _trainer(tmp_path, [S2ACallback(S2AConfig(bits=2), backbone="encoder")], epochs=2)
    resumed.fit(EncoderClassifier(arch="resnet"), _data(16), ckpt_path=last)
    assert resumed.current_epoch == 2


def test_a_checkpoint_is_checked_before_its_weights_load(tmp_path):
    # Lightning loads a checkpoint's weights before the callbacks' state: a config that
    # changes the model's keys failed at PyTorch's unexpected-keys error, whose marker
    # suggested lightning_s2a.load_from_checkpoint (S2A was applied already).
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    prompted = S2AConfig(modules=["bias", "prompt"], input_size=(3, 32, 32))
    _trainer(tmp_path, [S2ACallback(prompted, backbone="encoder"), checkpoint]).fit(
        EncoderClassifier(), _data(16)
    )
    last = str(tmp_path / "ckpt" / "last.ckpt")
    for run in ("test", "fit"):
        bias_only = S2ACallback(backbone="encoder")
        with pytest.raises(ValueError, match=r"trained with S2A modules=\('bias', 'prompt'\)"):
            getattr(_trainer(tmp_path, [bias_only]), run)(
                EncoderClassifier(), _data(8), ckpt_path=last
            )
    # a checkpoint saved without S2A cannot fill the prompts: said before the load fails
    plain = str(tmp_path / "plain.ckpt")
    trainer = _trainer(tmp_path, [])
    trainer.fit(EncoderClassifier(), _data(8))
    trainer.save_checkpoint(plain)
    with pytest.raises(ValueError, match=r"holds none of the weights .*'prompt'"):
        _trainer(tmp_path, [S2ACallback(prompted, backbone="encoder")]).test(
            EncoderClassifier(), _data(8), ckpt_path=plain
        )
    # strict_loading=False: the user starts the prompts fresh on purpose
    lenient = EncoderClassifier()
    lenient.strict_loading = False
    _trainer(tmp_path, [S2ACallback(prompted, backbone="encoder")]).test(
        lenient, _data(8), ckpt_path=plain
    )
    # the hook is the module's own again after each run, and a module tested from a
    # checkpoint keeps the checkpoint's model (S2A applied for the test was removed with it)
    module = EncoderClassifier()
    _trainer(tmp_path, [S2ACallback(prompted, backbone="encoder")]).test(
        module, _data(8), ckpt_path=last
    )
    assert "on_load_checkpoint" not in vars(module)
    loaded = load_from_checkpoint(EncoderClassifier, last).eval()
    with torch.no_grad():
        assert torch.equal(module.eval()(X), loaded(X))


class _ConvertsBatchNorms(pl.Callback):
    """What Trainer(sync_batchnorm=True) does in DDP's setup, after S2A's setup hook."""

    def setup(self, trainer, pl_module, stage):
        pl_module.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(pl_module.encoder)


def test_batch_norms_replaced_after_s2a_are_an_error(tmp_path):
    # The SyncBatchNorms that replaced S2A's held BatchNorms trained on batch statistics and
    # changed the frozen running statistics (gradient cosine 0.5), silently, on a GPU.
    trainer = _trainer(tmp_path, [S2ACallback(backbone="encoder"), _ConvertsBatchNorms()])
    with pytest.raises(ValueError, match=r"were replaced after S2A.*drop sync_batchnorm=True"):
        trainer.fit(EncoderClassifier(arch="resnet"), _data(16))


class _LayerwiseRates(EncoderClassifier):
    """A common fine-tuning recipe: one parameter group per submodule, another rate each."""

    def configure_optimizers(self):
        groups = [{"params": self.encoder.parameters(), "lr": 1e-4}]
        return torch.optim.AdamW([*groups, {"params": self.classifier.parameters()}], lr=1e-2)


class _ProbeOptimizer(EncoderClassifier):
    """Linear-probe code reused: the optimizer holds the head only."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=1e-2)


class _NoOptimizer(EncoderClassifier):
    def configure_optimizers(self):
        return None  # Lightning runs the loop with a stand-in optimizer, and warns


class _KeepsACopy(pl.Callback):
    """An EMA- or teacher-style deep copy of the module made during fit."""

    def on_fit_start(self, trainer, pl_module):
        self.copy = __import__("copy").deepcopy(pl_module)


class _NotesLoads(EncoderClassifier):
    def on_load_checkpoint(self, checkpoint):
        self.loaded = True


def test_a_deep_copy_made_during_fit_runs_its_own_checkpoint_hook(tmp_path):
    # The per-instance hook wrapper went with the copy, bound to the original: restoring the
    # copy ran the original's hook and S2A's check on the original's handle.
    keeper = _KeepsACopy()
    model = _NotesLoads()
    _fit(tmp_path, model, S2ACallback(backbone="encoder"), callbacks_after=[keeper])
    keeper.copy.on_load_checkpoint({})
    assert getattr(keeper.copy, "loaded", False) and not getattr(model, "loaded", False)


def test_parameters_s2a_trains_outside_every_optimizer_are_an_error(tmp_path):
    # The whole module's side network sits at its root, outside both groups: it stayed at
    # its random init (val loss unchanged over epochs) while s2a/trainable_params counted it.
    whole_side = S2ACallback(S2AConfig(modules=["side"], head="classifier"))
    with pytest.raises(
        ValueError,
        match=r"8 parameters that S2A trains are in no optimizer "
        r"\(s2a_side\.proj\.0\.weight",
    ):
        _fit(tmp_path, _LayerwiseRates(), whole_side)
    with pytest.raises(ValueError, match=r"in no optimizer \(encoder\.patch_embed\.proj\.bias"):
        _fit(tmp_path, _ProbeOptimizer(), S2ACallback(backbone="encoder"))
    # with the side inside the named encoder, the groups hold every parameter that trains
    trainer = _fit(tmp_path, _LayerwiseRates(), S2ACallback(modules=["side"], backbone="encoder"))
    assert trainer.state.finished
    # no optimizer at all is Lightning's own business (a warning), not this error
    with pytest.warns(UserWarning, match="configure_optimizers"):
        assert _fit(tmp_path, _NoOptimizer(), S2ACallback(backbone="encoder")).state.finished


def test_an_evaluation_alone_leaves_the_module_as_built(tmp_path):
    # validate/test/predict on a module without S2A applied it for good: a later plain fit
    # (full fine-tuning) silently trained biases only, its BatchNorms held in eval mode.
    model = EncoderClassifier(arch="resnet")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    callback = S2ACallback(backbone="encoder")
    trainer = _trainer(tmp_path, [callback])
    trainer.validate(model, _data(8))
    assert get_handle(model.encoder) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    trainer.predict(model, torch.utils.data.DataLoader(X, batch_size=4))
    assert get_handle(model.encoder) is None
    # a checkpoint restored without S2A in it brings no S2A model to keep
    plain = str(tmp_path / "plain.ckpt")
    trainer.save_checkpoint(plain)
    _trainer(tmp_path, [callback]).validate(model, _data(8), ckpt_path=plain)
    assert get_handle(model.encoder) is None
    # nor one that fails to load (another head's shapes)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, [S2ACallback(backbone="encoder"), checkpoint]).fit(
        EncoderClassifier(arch="resnet"), _data(16)
    )
    seven = EncoderClassifier(arch="resnet")
    seven.classifier = nn.Linear(seven.classifier.in_features, 7)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _trainer(tmp_path, [S2ACallback(backbone="encoder")]).validate(
            seven, _data(8), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    assert get_handle(seven.encoder) is None
    # after a fit, evaluations use the trained S2A model, which stays
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(model, _data(16))
    handle = get_handle(model.encoder)
    trainer.test(model, _data(8))
    assert get_handle(model.encoder) is handle is not None


# 5. Lifecycle ----------------------------------------------------------------------------
def test_backbone_built_in_configure_model(tmp_path):
    model = LateEncoder()
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    trainer = _fit(tmp_path, model, callback)
    assert callback.handle.model is model.encoder
    assert _metrics(trainer)["s2a/compression"] > 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("s2a_prompt" in n for n in trainable)
    assert all(n.endswith(("bias", ".A", ".B")) or n.startswith("classifier.") for n in trainable)


class _BuildsInSetup(EncoderClassifier):
    """Builds its encoder in its own ``setup`` (Lightning runs the callbacks' setup first)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.encoder

    def setup(self, stage):
        if not hasattr(self, "encoder"):
            self.encoder = timm.create_model(
                "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
            )


class _ClassesFromData(UserModule):
    """Sets its timm head for the data's classes in ``setup``, as timm users do."""

    def __init__(self):
        super().__init__()
        self.backbone.reset_classifier(10)

    def setup(self, stage):
        if self.backbone.num_classes != 4:
            self.backbone.reset_classifier(4)


class _LoadsInSetup(EncoderClassifier):
    """Loads its encoder's pretrained weights in its own ``setup``, strictly."""

    def __init__(self, weights: dict) -> None:
        super().__init__()
        self.weights = weights

    def setup(self, stage):
        self.encoder.load_state_dict(self.weights)


class _CopiesInSetup(pl.Callback):
    """A user's EMA-style callback: a deep copy of the module, made in its setup."""

    def setup(self, trainer, pl_module, stage):
        self.copy = __import__("copy").deepcopy(pl_module)


class _MetricInSetup(EncoderClassifier):
    """Adds a loss module in its own ``setup`` (no parameters), once per fit."""

    def setup(self, stage):
        self.criterion = nn.CrossEntropyLoss()


def test_what_the_module_s_own_setup_builds_is_s2ad(tmp_path):
    """S2A was applied in the callback's setup, before the module's: an encoder built there
    trained in full, uncompressed, while the metrics counted the head's input only; a head
    replaced there had its input stored in 4 bits (head-weight gradient 10% off)."""
    model = _BuildsInSetup()
    callback = S2ACallback(head="classifier")
    trainer = _fit(tmp_path / "a", model, callback)
    assert callback.handle.model is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("bias") or n.startswith("classifier.") for n in trainable)
    assert _metrics(trainer)["s2a/compression"] > 4

    model = _ClassesFromData()
    callback = S2ACallback()
    _fit(tmp_path / "b", model, callback, max_steps=1)
    head = model.backbone.head
    assert head.out_features == 4 and head.weight.requires_grad
    by_part = callback.handle.stats()["by_part"]
    assert by_part["head"]["stored_bytes"] == by_part["head"]["raw_bytes"] > 0  # kept exact

    # Once S2A trained a model, a setup that changes it again is an error, not a new S2A.
    model.backbone.num_classes = 10
    with pytest.raises(RuntimeError, match=r"_ClassesFromData.setup changed the model.*once"):
        _fit(tmp_path / "c", model, S2ACallback(), max_steps=1)

    # Where S2A cannot apply before setup (no encoder yet to find blocks in, or to name), it
    # waits for setup.
    model = _BuildsInSetup()
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    _fit(tmp_path / "d", model, callback, max_steps=1)
    assert callback.handle.model is model.encoder
    assert any("s2a_prompt" in n for n, p in model.named_parameters() if p.requires_grad)

    # Pretrained weights loaded in setup: S2A applies after it (its prompts were missing keys).
    weights = {k: v + 1.0 for k, v in EncoderClassifier().encoder.state_dict().items()}
    model = _LoadsInSetup(weights)
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    _fit(tmp_path / "g", model, callback, max_steps=1)
    assert callback.handle.model is model.encoder
    frozen = model.encoder.blocks[0].attn.qkv.weight
    assert torch.equal(frozen, weights["blocks.0.attn.qkv.weight"])

    # A callback of the user's own that copies the model in its setup (an EMA) runs before
    # the module's setup: S2A is applied before it then, and its copy has the prompts.
    model = _MetricInSetup()
    copier = _CopiesInSetup()
    callback = S2ACallback(S2AConfig(modules=("bias", "prompt"), head="classifier"))
    _fit(tmp_path / "h", model, callback, callbacks_after=[copier], max_steps=1)
    names = {n for n, _ in copier.copy.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()} and any(
        "s2a_prompt" in n for n in names
    )

    # A setup that adds what holds no parameters (a metric, a loss) changes nothing S2A did:
    # fitting again takes the model up as it is.
    model = _MetricInSetup()
    config = S2AConfig(head="classifier")
    first = S2ACallback(config)
    _fit(tmp_path / "e", model, first, max_steps=1)
    second = S2ACallback(config)
    _fit(tmp_path / "f", model, second, max_steps=1)
    assert second.handle is first.handle


def test_backbone_missing_names_the_attribute(tmp_path):
    # the error lists the module's modules, and the CLI flag (a typo only said "not found")
    error = r"EncoderClassifier.trunk does not exist.*--s2a.backbone.*\['encoder', 'classifier'\]"
    with pytest.raises(ValueError, match=error):
        _fit(tmp_path, EncoderClassifier(), S2ACallback(backbone="trunk"))


def test_new_trainer_and_callback_take_up_a_fitted_model(tmp_path):
    model = EncoderClassifier()
    first = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    _fit(tmp_path / "a", model, first)
    second = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    _trainer(tmp_path / "b", [second]).test(model, _data(8))
    assert second.handle is first.handle
    third = S2ACallback(S2AConfig(modules=("bias", "prompt")), backbone="encoder")
    trainer = _fit(tmp_path / "c", model, third)
    assert third.handle is first.handle and _metrics(trainer)["s2a/compression"] > 4
    other = S2ACallback(S2AConfig(modules=("bias",)), backbone="encoder")
    with pytest.raises(ValueError, match=r"fields \['modules'\] differ.*get_handle"):
        _fit(tmp_path / "d", model, other)


def test_an_exception_during_fit_takes_the_hooks_off(tmp_path):
    model = EncoderClassifier(fail_at=1)
    callback = S2ACallback(backbone="encoder")
    with pytest.raises(RuntimeError, match="user error"):
        _fit(tmp_path, model, callback)
    assert not callback.handle.engine.attached
    before = callback.handle.stats()
    model(X).sum().backward()
    assert callback.handle.stats() == before  # nothing recorded: no hooks left


def test_fp32_forward_after_a_bf16_frozen_fit(tmp_path):
    pl.seed_everything(0)
    model = EncoderClassifier()
    frozen = {n: p.clone() for n, p in model.encoder.named_parameters() if p.dim() >= 2}
    callback = S2ACallback(frozen_dtype="bfloat16", backbone="encoder")
    _fit(tmp_path, model, callback, precision="bf16-mixed")
    out = model(X)  # plain fp32, no autocast
    assert out.dtype == torch.float32
    after = dict(model.encoder.named_parameters())
    assert all(
        after[n].dtype == torch.float32 and torch.equal(after[n], v) for n, v in frozen.items()
    )


# 6. Prompt and side fit the model as built ------------------------------------------------
def test_prompt_sized_from_the_model_img_size():
    import timm

    from lightning_s2a import apply_s2a

    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=4)
    with apply_s2a(model, modules=["bias", "prompt"]) as handle:
        model(X).sum().backward()
        assert handle.structure.blocks[0].shape == (5, 192)  # 4 patches + class token


def test_side_with_the_head_outside_the_backbone(tmp_path):
    model = EncoderClassifier()
    head = model.classifier.weight.clone()
    callback = S2ACallback(S2AConfig(modules=("side",)), backbone="encoder")
    _fit(tmp_path, model, callback)
    stats = callback.handle.stats()["by_part"]
    assert stats.get("backbone", {"raw_bytes": 0})["raw_bytes"] == 0
    assert stats["side"]["raw_bytes"] > 0
    assert not torch.equal(model.classifier.weight, head)  # the user's head trained
    with pytest.raises(RuntimeError, match=r"'side' runs .* forward_features"):
        model.encoder.forward_features(X)


def test_side_needs_pooled_features_without_a_head():
    import timm

    from lightning_s2a import apply_s2a

    encoder = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, global_pool="", depth=2, img_size=32
    )
    with pytest.raises(ValueError, match=r"\(batch, features\); it is \(batch, 5, 192\)"):
        apply_s2a(encoder, modules=["side"], head=None)

    class Outputs(nn.Module):  # an HF-style model: its output is no tensor
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            return {"last_hidden_state": self.encoder(x)}

    with pytest.raises(ValueError, match=r"it is not a tensor \(a tuple, dict or model-output"):
        apply_s2a(Outputs(), modules=["side"], head=None, blocks="encoder.blocks.*")


def test_no_warnings_on_an_ordinary_fit(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, EncoderClassifier(), S2ACallback(backbone="encoder"))
    assert not [w for w in record if "S2A" in str(w.message)]


@pytest.mark.parametrize("via", ["callback", "strategy"])
def test_prompts_are_sized_from_the_data_module(tmp_path, via):
    # resnet10t's own default size is 224: its prompts sized for 56x56 maps met 8x8 ones.
    # The CLI's s2a section took the data module's input_size; a callback or strategy not.
    config = S2AConfig(modules=("bias", "prompt"))
    pl.seed_everything(0)
    model = EncoderClassifier(arch="resnet")
    if via == "callback":
        trainer = _trainer(tmp_path, [S2ACallback(config, backbone="encoder")])
    else:
        trainer = _trainer(tmp_path, [], strategy=S2AStrategy(config, backbone="encoder"))
    trainer.fit(model, datamodule=_SizedData())
    assert get_handle(model.encoder).config.input_size == (3, 32, 32)


# 7. BatchNorms held frozen only while frozen, and callbacks that would undo it ----------------
def _head_with_batch_norm(affine: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(512, 16), nn.BatchNorm1d(16, affine=affine), nn.ReLU(), nn.Linear(16, 4)
    )


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_a_batch_norm_in_a_named_head_trains_its_statistics(tmp_path, affine):
    # Whole-module layout with the head named: the head's BatchNorm trains (weights and
    # running statistics, as without S2A), the backbone's stay frozen, and the adapter holds
    # the head's statistics.
    pl.seed_everything(0)
    model = EncoderClassifier(arch="resnet")
    model.classifier = _head_with_batch_norm(affine)
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    path = tmp_path / "task.safetensors"
    callback = S2ACallback(S2AConfig(head="classifier"), adapter_path=str(path))
    _fit(tmp_path, model, callback)
    head_bn = model.classifier[1]
    assert int(head_bn.num_batches_tracked) == 2  # 16 samples, batches of 8
    assert head_bn.running_mean.abs().sum() > 0
    after = model.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    pl.seed_everything(0)
    fresh = EncoderClassifier(arch="resnet")
    fresh.classifier = _head_with_batch_norm(affine)
    load_adapter(fresh, path)
    assert torch.equal(fresh.classifier[1].running_mean, head_bn.running_mean)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))


def test_a_batch_norm_unfrozen_after_s2a_updates_its_statistics():
    # A second, fully fine-tuned phase (or BatchNorm weights unfrozen by hand): S2A no longer
    # holds them in eval mode; frozen again, they are held again.
    import timm

    from lightning_s2a import apply_s2a

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    handle = apply_s2a(model, S2AConfig())
    bn = model.bn1
    assert bn in handle.held_batch_norms()
    before = bn.running_mean.clone()
    model.train()
    model(X)
    assert torch.equal(bn.running_mean, before)  # frozen: held
    model.requires_grad_(True)
    assert not handle.held_batch_norms()
    model(X)
    assert not torch.equal(bn.running_mean, before)  # unfrozen: trains as in PyTorch
    assert bn.training
    model.requires_grad_(False)
    updated = bn.running_mean.clone()
    model(X)
    assert torch.equal(bn.running_mean, updated)
    handle.remove()


def test_statistics_re_estimation_of_a_held_batch_norm_is_an_error():
    # torch's update_bn resets each BatchNorm's statistics and re-estimates them with
    # momentum=None; held in eval mode they would stay reset, and the model would be wrong.
    import timm
    from torch.optim.swa_utils import AveragedModel, update_bn

    from lightning_s2a import apply_s2a

    model = timm.create_model("resnet10t", num_classes=4)
    with torch.no_grad():  # statistics of its own, as pretrained (fresh ones lose nothing)
        model.bn1.running_mean.fill_(0.5)
    apply_s2a(model, S2AConfig())
    with pytest.raises(RuntimeError, match=r"re-estimation.*S2AConfig\(bn_mode='train'\)"):
        update_bn([X], AveragedModel(model))


def test_a_failed_re_estimation_puts_the_statistics_back():
    """update_bn resets every BatchNorm before its pass, and the error at the first held one
    left them reset: a notebook that went on after the error evaluated with mean 0, variance
    1, silently. Statistics the reset alone changed are put back, with their momentum; ones
    loaded since S2A last saw them are named as left reset."""
    import timm
    from torch.optim.swa_utils import update_bn

    from lightning_s2a import apply_s2a

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    with torch.no_grad():  # statistics of its own, as pretrained
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    model.layer1[0].bn1.momentum = 0.05  # one with a momentum of its own
    handle = apply_s2a(model, S2AConfig())
    held = handle.held_batch_norms()
    assert len(held) > 10
    model.train()
    model(X).sum().backward()  # a step: statistics held
    saved = {id(bn): (bn.running_mean.clone(), bn.running_var.clone(), bn.momentum) for bn in held}
    model.eval()
    with torch.no_grad():
        want = model(X)
    with pytest.raises(
        RuntimeError, match=rf"statistics of the {len(held)} held BatchNorms were put back"
    ):
        update_bn([X], model)
    for bn in held:
        mean, var, momentum = saved[id(bn)]
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert bn.momentum == momentum
    assert model.layer1[0].bn1.momentum == 0.05
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), want)

    # A load between the last forward and the pass: what was loaded cannot be told from what
    # S2A saw, so those stay reset, and the error says how many.
    other = timm.create_model("resnet10t", num_classes=4)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
    model.layer1.load_state_dict(other.layer1.state_dict())
    loaded = [bn for bn in held if any(bn is m for m in model.layer1.modules())]
    with pytest.raises(RuntimeError, match=rf"{len(held) - len(loaded)} of the {len(held)} held"):
        update_bn([X], model)
    assert all(not bn.running_mean.any() for bn in loaded)  # reset: load them again
    assert all(bn.running_mean.any() for bn in held if bn not in loaded)
    handle.remove()

    # Converted since (.double(): new tensors, same values), no forward before the pass:
    # the reset is still the only change, and they come back (they stayed reset).
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
    handle = apply_s2a(model, S2AConfig())
    model.double()
    means = {id(bn): bn.running_mean.clone() for bn in handle.held_batch_norms()}
    with pytest.raises(RuntimeError, match=r"statistics of the \d+ held BatchNorms were put back"):
        update_bn([X.double()], model)
    assert all(torch.equal(bn.running_mean, means[id(bn)]) for bn in handle.held_batch_norms())
    handle.remove()

    # Fresh when S2A was applied, loaded since (a checkpoint of pretrained statistics): the
    # pass wiped what was loaded and said nothing, taking them for fresh ones.
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    handle = apply_s2a(model, S2AConfig())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("running_mean"):
            state[k].normal_()
    model.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"stay reset: load them again"):
        update_bn([X], model)
    handle.remove()


def test_a_batch_norm_built_with_cumulative_statistics_is_held_without_error():
    # momentum=None with fresh statistics is also what a re-estimation pass looks like; one
    # built so is held as any other, and its statistics stay.
    import timm

    from lightning_s2a import apply_s2a

    model = timm.create_model("resnet10t", num_classes=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with apply_s2a(model, S2AConfig()):
        model.train()
        model(X).sum().backward()
        assert int(model.bn1.num_batches_tracked) == 0
    # with statistics of its own (pretrained), it trains as well, and a re-estimation that
    # would reset them is still the error
    from torch.optim.swa_utils import AveragedModel, update_bn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(2.0)
    with apply_s2a(model, S2AConfig()):
        model(X).sum().backward()
        with pytest.raises(RuntimeError, match=r"re-estimation"):
            update_bn([X], AveragedModel(model))


def test_callbacks_that_would_undo_s2a_are_refused(tmp_path):
    from lightning.pytorch.callbacks import BackboneFinetuning, StochasticWeightAveraging

    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    with pytest.raises(ValueError, match=r"holds the frozen backbone's \d+ BatchNorms"):
        _trainer(tmp_path, [S2ACallback(backbone="encoder"), swa], epochs=2).fit(
            EncoderClassifier(arch="resnet"), _data(16)
        )
    for order in (0, 1):  # whichever runs first: BackboneFinetuning freezes in its setup
        callbacks = [S2ACallback(), BackboneFinetuning(unfreeze_backbone_at_epoch=10)]
        with pytest.raises(ValueError, match=r"BackboneFinetuning freezes and unfreezes"):
            _trainer(tmp_path, callbacks[order:] + callbacks[:order]).fit(UserModule(), _data(16))
    # A backbone without BatchNorm averages as usual.
    swa = StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    _trainer(tmp_path, [S2ACallback(backbone="encoder"), swa], epochs=2).fit(
        EncoderClassifier(), _data(16)
    )


def test_weight_averaging_listed_before_s2a_with_prompts_is_refused(tmp_path):
    # EMAWeightAveraging copies the model in its setup: listed first, its copy had no prompts,
    # and its first update failed on "size of tensor a (192) must match ... (8)".
    from lightning.pytorch.callbacks import EMAWeightAveraging

    config = S2AConfig(modules=("bias", "prompt"))
    for refused in (config, S2AConfig(frozen_dtype="nf4")):  # 4 bits: weights taken out
        with pytest.raises(ValueError, match=r"List S2ACallback first"):
            _trainer(tmp_path, [EMAWeightAveraging(), S2ACallback(refused)]).fit(
                UserModule(), _data(16)
            )
    # Averaging buffers (its default) would round off the 4-bit codes and scales.
    with pytest.raises(ValueError, match=r"EMAWeightAveraging\(use_buffers=False\)"):
        _trainer(tmp_path, [S2ACallback(frozen_dtype="nf4"), EMAWeightAveraging()]).fit(
            UserModule(), _data(16)
        )
    model = UserModule()
    callback = S2ACallback(frozen_dtype="nf4")
    averaging = EMAWeightAveraging(decay=0.9, use_buffers=False)
    _trainer(tmp_path, [callback, averaging], max_steps=2).fit(model, _data(16))
    held = [m for m in model.modules() if hasattr(m, "s2a_weight_codes")]
    codes = [m.s2a_weight_codes.clone() for m in held]
    scales = [m.s2a_weight_absmax.clone() for m in held]
    callback.handle.remove()
    fresh = UserModule()
    fresh.load_state_dict(model.state_dict())
    apply_s2a(fresh.backbone, callback.handle.config)  # the codes of the same weights
    again = [m for m in fresh.modules() if hasattr(m, "s2a_weight_codes")]
    assert held and len(again) == len(held)
    assert all(torch.equal(a.s2a_weight_codes, c) for a, c in zip(again, codes, strict=True))
    assert all(torch.equal(a.s2a_weight_absmax, s) for a, s in zip(again, scales, strict=True))
    for callbacks, strategy in (
        ([S2ACallback(config), EMAWeightAveraging()], "auto"),
        ([EMAWeightAveraging()], S2AStrategy(config)),  # the strategy puts S2A before it
    ):
        model = UserModule()
        _trainer(tmp_path, callbacks, strategy=strategy).fit(model, _data(16))
        assert any("s2a_prompt" in n for n, _ in model.named_modules())


class _SetUpEncoder(EncoderClassifier):
    """A module with a ``setup`` of its own (Lightning runs callbacks' setups before it)."""

    def setup(self, stage: str) -> None:
        pass


def test_stochastic_weight_averaging_copies_the_model_as_s2a_made_it(tmp_path):
    """SWA deep-copies the model in its setup, as EMA does, but was not counted among the
    callbacks that do: with a module ``setup`` S2A came after its copy, and with prompts the
    first averaging, an epoch in, failed on "size of tensor a (192) must match ... (8)"."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    def swa():
        return StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)

    config = S2AConfig(modules=("bias", "prompt"))
    with pytest.raises(ValueError, match=r"List S2ACallback first"):
        _trainer(tmp_path, [swa(), S2ACallback(config, backbone="encoder")], epochs=2).fit(
            _SetUpEncoder(), _data(16)
        )
    for callbacks, strategy in (
        ([S2ACallback(config, backbone="encoder"), swa()], "auto"),
        ([swa()], S2AStrategy(config, backbone="encoder")),  # S2A put before it
    ):
        model = _SetUpEncoder()
        _trainer(tmp_path, callbacks, strategy=strategy, epochs=2).fit(model, _data(16))
        averaged = next(c for c in model.trainer.callbacks if type(c).__name__.startswith("Sto"))
        names = [n for n, _ in averaged._average_model.named_parameters()]
        assert any("s2a_prompt" in n for n in names)  # its copy has S2A's prompts


def test_a_checkpoint_config_of_another_version_is_still_compared_field_by_field():
    """A saved config that no longer validates as a whole (a field this version dropped or
    a value it no longer takes) skipped the comparison: a checkpoint trained with another
    prompt rank was restored silently."""
    from lightning_s2a.lightning.checks import check_same_model

    current = S2AConfig(modules=("bias", "prompt"), prompt_rank=4)
    saved = {**dataclasses.asdict(current), "prompt_rank": 8, "bits": 3}  # 3: no longer valid
    with pytest.raises(ValueError, match=r"trained with S2A prompt_rank=8 \(this run: 4\)"):
        check_same_model(saved, current)
    saved = {**dataclasses.asdict(current), "bits": 3, "side": "spiral"}  # unreadable field
    with pytest.warns(UserWarning, match=r"\['side'\] could not be read"):
        check_same_model(saved, current)
    check_same_model(dataclasses.asdict(current), current)  # the same: nothing to say


def test_evaluating_a_module_without_s2a_under_a_side_config_is_an_error(tmp_path):
    """validate/test/predict of a module no fit, adapter or checkpoint gave S2A: a side
    config added a new, untrained side network for the run, and its predictions were a
    random network's (6% agreeing with the module's own), silently."""
    from lightning_s2a import get_handle

    torch.manual_seed(0)
    model = EncoderClassifier()
    x = torch.randn(8, 3, 32, 32)
    before = model.eval()(x)
    trainer = quiet_trainer(callbacks=[S2ACallback(modules=["side"], backbone="encoder")])
    with pytest.raises(ValueError, match=r"new, untrained side network.*ckpt_path"):
        trainer.validate(model, _data(8))
    assert get_handle(model.encoder) is None and torch.equal(model.eval()(x), before)
    # 4-bit weights for an evaluation alone: said, and the module is as built after it
    trainer = quiet_trainer(callbacks=[S2ACallback(frozen_dtype="nf4", backbone="encoder")])
    with pytest.warns(UserWarning, match="evaluated with its weights quantized"):
        trainer.validate(model, _data(8))
    assert torch.equal(model.eval()(x), before)
    # after a fit, the side that trained is evaluated: no error
    fitted = EncoderClassifier()
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[S2ACallback(modules=["side"], backbone="encoder")]
    )
    trainer.fit(fitted, _data(8))
    metrics = trainer.validate(fitted, _data(8))  # metrics of the side that trained
    assert metrics
    # a fresh module with the fit's checkpoint: the side that trained comes in (refused
    # until 2026-12-07: the check ran before Lightning said a checkpoint would come in)
    path = tmp_path / "side.ckpt"
    trainer.save_checkpoint(path)
    trainer = quiet_trainer(callbacks=[S2ACallback(modules=["side"], backbone="encoder")])
    assert trainer.validate(EncoderClassifier(), _data(8), ckpt_path=path) == metrics
    # nor is a 4-bit run's checkpoint said to be a module evaluated without S2A
    nf4 = S2ACallback(frozen_dtype="nf4", backbone="encoder")
    trainer = quiet_trainer(max_epochs=1, callbacks=[nf4])
    trainer.fit(EncoderClassifier(), _data(8))
    trainer.save_checkpoint(path)
    trainer = quiet_trainer(callbacks=[S2ACallback(frozen_dtype="nf4", backbone="encoder")])
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.validate(EncoderClassifier(), _data(8), ckpt_path=path)
    assert not [w for w in said if "has no S2A applied" in str(w.message)]


def test_weight_averaging_over_half_precision_frozen_weights_warns(tmp_path):
    """EMA averages the frozen weights too: held in bfloat16, their average of a constant is
    computed in bfloat16 and drifts, and after fit the drifted weights were kept, silently."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def fit(frozen_dtype, averaging):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callbacks = [S2ACallback(frozen_dtype=frozen_dtype), *averaging]
            trainer = _trainer(tmp_path, callbacks, max_steps=1, precision="bf16-mixed")
            trainer.fit(UserModule(), _data(16))
        return [str(w.message) for w in caught if "drift from the pretrained" in str(w.message)]

    (message,) = fit("bfloat16", [EMAWeightAveraging(decay=0.9)])
    assert "EMAWeightAveraging" in message and "frozen_dtype=None" in message
    assert fit("bfloat16", []) == []
    assert fit(None, [EMAWeightAveraging(decay=0.9)]) == []


def test_a_head_outside_that_no_optimizer_holds_is_said(tmp_path):
    # timm's create_optimizer_v2(self.encoder, layer_decay=...) leaves the head out: it never
    # trained while s2a/trainable_params and the adapter counted it as trained, silently.
    class EncoderOnly(EncoderClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(
                (p for p in self.encoder.parameters() if p.requires_grad), lr=1e-3
            )

    model = EncoderOnly()
    before = model.classifier.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"2 parameters of EncoderOnly outside .*classifier"):
        _fit(tmp_path, model, S2ACallback(backbone="encoder"))
    assert torch.equal(model.classifier.weight, before)  # what the warning says
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no optimizer holds them")
        _fit(tmp_path, EncoderClassifier(), S2ACallback(backbone="encoder"))
