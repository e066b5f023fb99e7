"""The ``lightning-s2a`` CLI, its model and its DataModules (CPU, small, offline)."""

from __future__ import annotations

import csv
import os
import pickle
import sys
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_s2a import S2AConfig
from lightning_s2a.lightning.callback import S2ACallback
from lightning_s2a.lightning.cli import S2ALightningCLI
from lightning_s2a.lightning.data import DigitsDataModule, ImageFolderDataModule
from lightning_s2a.lightning.model import ImageClassifier
from tests.lightning_helpers import CLI_SMALL, quiet_trainer

pytest.importorskip("sklearn")

SMALL = CLI_SMALL


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run in tmp_path, with no pytest flags in sys.argv for LightningCLI to warn about."""
    monkeypatch.setattr(sys, "argv", ["lightning-s2a"])


def _cli(tmp_path, *args, run=False):
    trainer = ["--trainer.default_root_dir", str(tmp_path)]
    argv = [*args[:1], *SMALL, *trainer, *args[1:]] if run else [*SMALL, *trainer, *args]
    return S2ALightningCLI(run=run, args=argv)


def _s2a_callbacks(trainer):
    return [c for c in trainer.callbacks if isinstance(c, S2ACallback)]


def test_flags_build_the_s2a_config(tmp_path):
    cli = _cli(
        tmp_path,
        "--s2a.bits",
        "2",
        "--s2a.modules",
        "[bias,prompt]",
        "--s2a.prompt_rank",
        "4",
        "--s2a.op_bits",
        "{softmax: 8}",
        "--s2a.calibrate",
        "true",
        "--s2a.calibrate_tol",
        "0.08",
    )
    config = cli.s2a_config
    assert isinstance(config, S2AConfig)
    assert config.bits == 2
    assert config.modules == ("bias", "prompt")
    assert config.prompt_rank == 4
    assert config.op_bits == {"softmax": 8}
    assert config.calibrate and config.calibration_tol() == 0.08
    assert config.input_size == (3, 32, 32)  # taken from the data, so prompts fit them
    (callback,) = _s2a_callbacks(cli.trainer)
    assert callback is cli.s2a_callback
    assert callback.config == config
    assert isinstance(cli.model, ImageClassifier)
    assert cli.model.hparams.backbone == "resnet18"
    assert isinstance(cli.datamodule, DigitsDataModule)


def test_defaults_and_module_string(tmp_path):
    cli = _cli(tmp_path, "--s2a.modules", "bias+prompt")
    assert cli.s2a_config.modules == ("bias", "prompt")
    assert cli.s2a_config.bits == S2AConfig().bits
    assert cli.trainer.max_epochs == 3
    cli = _cli(tmp_path)
    assert cli.s2a_config.modules == ("bias",)
    assert cli.s2a_callback_kwargs == {
        "adapter_path": None,
        "backbone": None,
        "count_outside": True,
    }


def test_yaml_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "s2a:\n"
        "  bits: 8\n"
        "  modules: [side]\n"
        "  side_reduction: 2\n"
        f"  adapter_path: {tmp_path / 'a.safetensors'}\n"
        "data:\n"
        "  batch_size: 7\n"
    )
    cli = _cli(tmp_path, "--config", str(path))
    assert cli.s2a_config.bits == 8
    assert cli.s2a_config.modules == ("side",)
    assert cli.s2a_config.side_reduction == 2
    assert cli.s2a_callback.adapter_path == str(tmp_path / "a.safetensors")
    assert cli.datamodule.batch_size == 7
    assert cli.datamodule.image_size == 32  # kept from the flags: the file sets only batch_size


def test_disabled_adds_no_callback(tmp_path):
    cli = _cli(tmp_path, "--s2a.enabled", "false")
    assert cli.s2a_config is None
    assert cli.s2a_callback is None
    assert _s2a_callbacks(cli.trainer) == []
    assert all(p.requires_grad for p in cli.model.parameters())
    # other s2a options with enabled=false (the same config file, run as the baseline) were
    # dropped without a word: they still are dropped, with a warning naming them
    adapter = str(tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"its \['bits', 'adapter_path'\] are ignored"):
        cli = _cli(
            tmp_path, "--s2a.enabled", "false", "--s2a.bits", "2", "--s2a.adapter_path", adapter
        )
    assert cli.s2a_callback is None


def test_s2a_section_from_its_own_file(tmp_path):
    # --s2a FILE (listed by --help) passed jsonargparse's __path__ on as an S2A field
    path = tmp_path / "s2a.yaml"
    path.write_text("bits: 2\nmodules: [bias, prompt]\nop_bits: {softmax: 8}\n")
    cli = _cli(tmp_path, "--s2a", str(path))
    assert cli.s2a_config.bits == 2 and cli.s2a_config.modules == ("bias", "prompt")
    assert cli.s2a_config.op_bits == {"softmax": 8}


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--s2a.bits", "3", ["bits", "(1, 2, 4, 8)"]),
        ("--s2a.modules", "[bias,lora]", ["modules", "'lora'"]),
    ],
)
def test_invalid_value_reports_the_config_error(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exc:
        _cli(tmp_path, flag, value)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_fit_end_to_end_logs_s2a_metrics(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    cli = _cli(
        tmp_path,
        "fit",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger",
        "CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "logs"),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.batch_size",
        "8",
        "--s2a.modules",
        "[bias,prompt]",
        "--s2a.adapter_path",
        str(adapter),
        run=True,
    )
    assert cli.trainer.state.finished
    metrics = os.path.join(cli.trainer.logger.log_dir, "metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in ("s2a/compression", "s2a/activation_stored_mb", "s2a/trainable_pct", "val/acc"):
        assert name in columns, columns
    compression = [float(r["s2a/compression"]) for r in rows if r["s2a/compression"]]
    assert compression and compression[0] > 1.0
    assert adapter.is_file()


def test_digits_datamodule():
    dm = DigitsDataModule(image_size=24, batch_size=16, val_fraction=0.25, seed=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == round(1797 * 0.25)
    assert dm.num_classes == 10 and dm.input_size == (3, 24, 24)
    assert set(dm.train_set.tensors[1].tolist()) == set(range(10))
    assert x.mean().abs() < 3  # ImageNet-normalised, not raw 0..16 pixel values

    again = DigitsDataModule(image_size=24, batch_size=16, val_fraction=0.25, seed=3)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[0], dm.val_set.tensors[0])
    assert torch.equal(next(iter(again.train_dataloader()))[1], y)  # seeded shuffle
    other = DigitsDataModule(image_size=24, val_fraction=0.25, seed=4)
    other.setup("fit")
    assert not torch.equal(other.val_set.tensors[1], dm.val_set.tensors[1])
    xt, _ = next(iter(dm.test_dataloader()))
    assert torch.equal(xt, dm.val_set.tensors[0][:16])

    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)


def _write_pngs(folder, classes, per_class, size=20):
    from PIL import Image

    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.full((size, size, 3), 40 * c + i, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_datamodule(tmp_path):
    root = tmp_path / "pets"
    _write_pngs(root, ["cat", "dog", "eel"], per_class=4)
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, val_fraction=0.25)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9, 3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and int(y.max()) < 3
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (3, 3, 16, 16)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)

    split = tmp_path / "split"
    _write_pngs(split / "train", ["a", "b"], per_class=3)
    _write_pngs(split / "val", ["a", "b"], per_class=2)
    dm = ImageFolderDataModule(str(split), image_size=16, batch_size=8, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), dm.num_classes) == (6, 4, 2)
    assert len(dm.test_dataloader().dataset) == 4  # no test/: test runs on val/

    # train/ and test/ only: taken for two classes, the model learned which folder an image
    # was in (val accuracy 1.0), silently; now an error naming the fix
    _write_pngs(tmp_path / "tt" / "train", ["a", "b"], per_class=2)
    _write_pngs(tmp_path / "tt" / "test", ["a", "b"], per_class=1)
    with pytest.raises(ValueError, match=r"split folders \['test', 'train'\].*val/"):
        ImageFolderDataModule(str(tmp_path / "tt"))
    # valid/ is a validation folder, and test/ serves test and predict
    _write_pngs(tmp_path / "tt" / "valid", ["a", "b"], per_class=3)
    dm = ImageFolderDataModule(str(tmp_path / "tt"), image_size=16, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), dm.num_classes) == (4, 6, 2)
    assert len(dm.test_dataloader().dataset) == 2 and len(dm.predict_dataloader().dataset) == 2
    _write_pngs(tmp_path / "tt" / "test", ["c"], per_class=1)
    with pytest.raises(ValueError, match=r"different class folders \(\['c'\]"):
        ImageFolderDataModule(str(tmp_path / "tt"))

    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataModule(str(tmp_path / "missing"))


def test_pretrained_without_offline_weights_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find
    with pytest.raises(RuntimeError, match="could not be loaded offline") as exc:
        ImageClassifier(backbone="resnet18", pretrained=True)
    assert "pretrained: false" in str(exc.value)
    assert "tf_efficientnet_lite0" in str(exc.value)
    with pytest.raises(ValueError, match="not a timm model"):
        ImageClassifier(backbone="no_such_net", pretrained=False)


def test_main_goes_offline_and_lists_s2a_options(monkeypatch, capsys):
    from lightning_s2a.lightning.cli import main

    environ = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    monkeypatch.setattr(os, "environ", environ)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    assert environ["HF_HUB_OFFLINE"] == "1"
    out = capsys.readouterr().out
    for flag in ("--s2a.bits", "--s2a.modules", "--s2a.enabled", "--s2a.adapter_path", "--data"):
        assert flag in out


def test_printing_a_config_whose_class_was_replaced_is_refused(tmp_path):
    """--print_config prints while parsing, before a class named in place of the config
    file's gets its own defaults back: it printed the quickstart's lr and num_classes for the
    user's class, and a run from the printed file used them, silently."""
    from lightning_s2a.lightning.cli import main

    quickstart = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.yaml")
    with pytest.raises(SystemExit, match="own defaults"):
        main(["fit", "--config", quickstart, "--model", "my_project.Module", "--print_config"])
    # the class named by --model.class_path, or by a later config file, alike (they printed)
    with pytest.raises(SystemExit, match="own defaults"):
        main(["fit", "--config", quickstart, "--model.class_path", "my.Module", "--print_config"])
    second = tmp_path / "mine.yaml"
    second.write_text("model: my_project.Module\n")
    with pytest.raises(SystemExit, match="own defaults"):
        main(["fit", "--config", quickstart, "--config", str(second), "--print_config"])


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_an_adapter_path_outside_fit_is_an_error(tmp_path, capsys, subcommand):
    """--s2a.adapter_path is where fit writes the adapter: ``test --s2a.adapter_path X``
    evaluated the untrained model (test/acc 0.03 against the adapter's 0.55), silently."""
    adapter = str(tmp_path / "a.safetensors")
    with pytest.raises(SystemExit):
        _cli(tmp_path, subcommand, "--s2a.adapter_path", adapter, run=True)
    assert f"{subcommand} does not read it" in capsys.readouterr().err


def test_a_step_budget_alone_is_not_cut_by_the_epoch_default(tmp_path):
    """--trainer.max_steps 20 stopped at step 12: the CLI's max_epochs=3 ended it first
    (Lightning's own default has no epoch limit when a step budget is set)."""
    cli = _cli(tmp_path, "--trainer.max_steps", "20")
    assert cli.trainer.max_steps == 20 and cli.trainer.max_epochs in (None, -1)  # no limit
    cli = _cli(tmp_path, "--trainer.max_steps", "20", "--trainer.max_epochs", "2")
    assert cli.trainer.max_epochs == 2  # both given: both hold
    config = tmp_path / "steps.yaml"
    config.write_text("trainer:\n  max_steps: 20\n")
    assert _cli(tmp_path, "--config", str(config)).trainer.max_epochs in (None, -1)
    assert _cli(tmp_path).trainer.max_epochs == 3  # the CLI's short fine-tune otherwise
    # the trainer's settings in a file of their own: given as --trainer, or named by a
    # config's trainer: (both stopped at 3 epochs until 2026-12-07), or a time budget
    trainer_file = tmp_path / "trainer.yaml"
    trainer_file.write_text("max_steps: 20\n")
    names_it = tmp_path / "names.yaml"
    names_it.write_text(f"trainer: {trainer_file}\n")
    for given in (("--trainer", str(trainer_file)), ("--config", str(names_it))):
        cli = _cli(tmp_path, *given)
        assert cli.trainer.max_steps == 20 and cli.trainer.max_epochs in (None, -1), given
    assert _cli(tmp_path, "--trainer.max_time", "00:00:01:00").trainer.max_epochs in (None, -1)
    argv = {"trainer": {"max_steps": 20, "default_root_dir": str(tmp_path)}}
    assert S2ALightningCLI(run=False, args=argv).trainer.max_epochs in (None, -1)
    # Lightning's own "no budget" stated aloud is no budget: the 3 epochs stay (they became
    # Lightning's 1000 until 2026-12-07)
    no_budget = tmp_path / "no_budget.yaml"
    no_budget.write_text("trainer:\n  max_steps: -1\n  max_time: null\n")
    for given in (
        ("--trainer.max_steps", "-1"),
        ("--trainer.max_time", "null"),
        ("--config", str(no_budget)),
    ):
        assert _cli(tmp_path, *given).trainer.max_epochs == 3, given


def test_the_cosine_decays_per_step_over_a_step_budget_alone():
    """With --trainer.max_steps and no epochs, ImageClassifier's cosine stopped the fit in
    configure_optimizers (it decays over max_epochs, unset): it decays per step now."""
    model = ImageClassifier(backbone="resnet10t", pretrained=False, lr=0.1)
    model.trainer = quiet_trainer(max_steps=4, max_epochs=-1)
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), scheduler.step()
    assert rates == pytest.approx(
        [0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2, 0.0]
    )
    model = ImageClassifier(backbone="resnet10t", pretrained=False, warmup_epochs=1)
    model.trainer = quiet_trainer(max_steps=4, max_epochs=-1)
    with pytest.raises(ValueError, match=r"warmup_epochs=1 needs trainer\.max_epochs"):
        model.configure_optimizers()
    # a time budget alone gives the cosine no length: said, naming it
    model = ImageClassifier(backbone="resnet10t", pretrained=False)
    model.trainer = quiet_trainer(max_time="00:00:01:00", max_epochs=-1)
    with pytest.raises(ValueError, match=r"trainer\.max_time, gives it no length.*none"):
        model.configure_optimizers()


def test_a_command_line_optimizer_holds_the_prompts_s2a_adds(tmp_path):
    """LightningCLI builds --optimizer from the model's parameters before fit, before S2A's
    setup adds the prompts: the fit stopped ("parameters that S2A trains are in no
    optimizer") with advice about a configure_optimizers the user never wrote."""
    cli = _cli(
        tmp_path,
        "fit",
        "--s2a.modules",
        "[bias,prompt]",
        "--optimizer",
        "torch.optim.Adam",
        "--optimizer.lr",
        "0.002",
        "--lr_scheduler",
        "torch.optim.lr_scheduler.ExponentialLR",
        "--lr_scheduler.gamma",
        "0.5",
        "--trainer.max_steps",
        "2",
        run=True,
    )
    optimizer = cli.trainer.optimizers[0]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    prompts = [p for n, p in cli.model.named_parameters() if "s2a_prompt" in n]
    assert prompts and all(id(p) in held for p in prompts)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 0.002
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert type(scheduler) is torch.optim.lr_scheduler.ExponentialLR
    assert scheduler.optimizer is optimizer and scheduler.gamma == 0.5
    # the model still pickles before fit (ddp_spawn, torch.save), as with Lightning's own
    cli = _cli(tmp_path, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1")
    assert isinstance(pickle.loads(pickle.dumps(cli.model)), type(cli.model))
    built = cli.model.configure_optimizers()
    assert type(built) is torch.optim.SGD and built.defaults["lr"] == 0.1


def test_image_classifier_logs_plain_accuracy():
    # torchmetrics' default averages per class: on imbalanced labels the logged "accuracy"
    # was another number than correct / total (a quickstart run: 0.562 against 0.574).
    torch.manual_seed(0)
    model = ImageClassifier(backbone="resnet10t", pretrained=False, num_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    y = torch.tensor([0, 0, 0, 0, 2])  # 4 of 5 right; per class 0.75, -, 1.0
    model.val_acc(logits, y)
    assert model.val_acc.compute().item() == pytest.approx(0.8)


def test_a_resumed_order_with_workers_is_the_uninterrupted_one():
    """Workers kept alive across epochs drew their seed from the shuffle generator once; a
    resumed fit started them anew and drew again, shifting every later epoch's order."""
    dm = DigitsDataModule(image_size=8, batch_size=128, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()  # as Lightning: one loader for every epoch
    epochs, state = [], None
    for epoch in range(3):
        epochs.append(torch.cat([y for _, y in loader]))
        state = dm.state_dict() if epoch == 0 else state
    resumed = DigitsDataModule(image_size=8, batch_size=128, num_workers=1)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert torch.equal(torch.cat([y for _, y in loader]), epochs[1])
    assert torch.equal(torch.cat([y for _, y in loader]), epochs[2])


def test_image_folders_in_any_case_without_hidden_ones_and_16_bit_images(tmp_path):
    """Train/ and Val/ were two classes; a hidden .ipynb_checkpoints/ with an image was
    class 0 (every label shifted) and macOS's ._x.png failed mid-epoch; 16-bit images were
    clipped to white and float ones to black."""
    import numpy as np
    from PIL import Image

    from lightning_s2a.lightning.data import load_rgb

    _write_pngs(tmp_path / "Train", ["a", "b"], per_class=2)
    _write_pngs(tmp_path / "Val", ["a", "b"], per_class=1)
    _write_pngs(tmp_path / "Train" / ".ipynb_checkpoints", ["x"], per_class=1)
    (tmp_path / "Train" / "a" / "._0.png").write_bytes(b"AppleDouble")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, num_workers=0)
    dm.setup("fit")
    assert dm.classes == ["a", "b"] and dm.train_set.class_to_idx == {"a": 0, "b": 1}
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(grey)
    assert np.asarray(load_rgb(str(grey)))[0, 0].tolist() == [128, 128, 128]
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"floating-point image .* would clip it"):
        load_rgb(str(tmp_path / "f.tif"))


def test_a_resumed_fit_shuffles_its_next_epoch_as_the_uninterrupted_run(tmp_path):
    # setup() seeded the shuffle anew, and a resumed fit replayed epoch 0's order (a
    # reviewer's quickstart resumed at epoch 1: weights 4.5e-3 apart, val accuracy 2 points).
    def order(dm):
        return torch.cat([y for _, y in dm.train_dataloader()])

    dm = DigitsDataModule(image_size=8, batch_size=64)
    dm.setup("fit")
    epoch0 = order(dm)
    state = dm.state_dict()
    epoch1 = order(dm)
    assert not torch.equal(epoch0, epoch1)
    resumed = DigitsDataModule(image_size=8, batch_size=64)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert torch.equal(order(resumed), epoch1)

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    def fit(epochs, ckpt=None, save=None):
        model = Tiny()
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=3,
            limit_val_batches=0,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DigitsDataModule(image_size=8, batch_size=16), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model.net[1].weight.detach()

    uninterrupted = fit(2)
    fit(1, save=tmp_path / "epoch1.ckpt")
    assert torch.equal(fit(2, ckpt=tmp_path / "epoch1.ckpt"), uninterrupted)


def test_a_vit_built_for_another_size_than_the_data_is_a_clear_error():
    """timm asserted "Input height (64) doesn't match model (224)" inside the first step."""
    vit = ImageClassifier(backbone="vit_tiny_patch16_224", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"built for \(224, 224\).*--data\.image_size 224"):
        vit._check_input_size(DigitsDataModule(image_size=64))
    vit._check_input_size(DigitsDataModule(image_size=224))  # no error
    cnn = ImageClassifier(backbone="resnet10t", pretrained=False, num_classes=10)
    cnn._check_input_size(DigitsDataModule(image_size=64))  # any size


def test_data_normalisation_is_the_pretrained_weights_or_said():
    # Both data modules normalised with ImageNet's mean and std whatever the weights expect:
    # Lite0's expect 0.5 and 0.5 (its first BatchNorm saw 6.4x its running variance), silently.
    model = ImageClassifier()  # pretrained Lite0, offline
    expected = r"expect inputs normalised with mean \[0\.5,0\.5,0\.5\].*--data\.mean \[0\.5,0"
    with pytest.warns(UserWarning, match=expected):
        model._check_normalization(DigitsDataModule())
    half = DigitsDataModule(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model._check_normalization(half)
        ImageClassifier(backbone="resnet10t", pretrained=False)._check_normalization(half)
        # a user's data module whose mean/std are no per-channel values: not compared
        for mean, std in ((0.1307, 0.3081), ("imagenet", "imagenet"), ((0.5,), (0.5,))):
            model._check_normalization(SimpleNamespace(mean=mean, std=std))
        model._check_normalization(SimpleNamespace(mean=torch.zeros(1, 3, 1, 1), std=None))
    with pytest.warns(UserWarning, match=expected):  # a 1-D array of three is compared
        model._check_normalization(SimpleNamespace(mean=np.zeros(3), std=np.ones(3)))
    half.setup("fit")
    x = half.train_set.tensors[0]
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0 and float(x.min()) == -1.0
    with pytest.raises(ValueError, match=r"mean/std: expected three values"):
        DigitsDataModule(mean=(0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"std positive"):
        ImageFolderDataModule(".", mean=(0.5, 0.5, 0.5), std=(0.5, 0.0, 0.5))
