"""The CLI across runs: a fit's checkpoint evaluated or resumed, strategies built on S2A's,
and the config printed for the config file's own class."""

from __future__ import annotations

import glob
import os
import sys

import pytest

from lightning_s2a.lightning.cli import S2ALightningCLI, main
from lightning_s2a.lightning.strategy import S2AStrategy
from tests.lightning_helpers import CLI_SMALL

pytest.importorskip("sklearn")

SMALL = [
    *CLI_SMALL,
    "--trainer.limit_train_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


class TaskStrategy(S2AStrategy):
    """A user's own strategy built on S2A's: its name says nothing of S2A."""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-s2a"])


def _run(tmp_path, subcommand, *args):
    root = ["--trainer.default_root_dir", str(tmp_path)]
    return S2ALightningCLI(args=[subcommand, *SMALL, *root, *args])


def _checkpoint(tmp_path) -> str:
    (path,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    return path


def test_a_fits_config_with_its_adapter_path_evaluates_its_checkpoint(tmp_path):
    # docs/cli.md: "test --config my_run.yaml --ckpt_path PATH". The fit's saved config
    # holds its adapter_path, and test refused it, advising the --ckpt_path it was given.
    adapter = tmp_path / "task.safetensors"
    _run(tmp_path, "fit", "--trainer.max_epochs", "1", "--s2a.adapter_path", str(adapter))
    written = adapter.stat().st_mtime_ns
    (config,) = glob.glob(str(tmp_path / "**" / "config.yaml"), recursive=True)
    with pytest.warns(UserWarning, match="neither reads nor writes the adapter"):
        cli = S2ALightningCLI(
            args=["test", "--config", config, "--ckpt_path", _checkpoint(tmp_path)]
        )
    assert cli.trainer.state.finished and cli.s2a_callback.adapter_path is None
    assert adapter.stat().st_mtime_ns == written


def test_resuming_an_s2a_run_with_s2a_off_is_refused(tmp_path):
    # With --optimizer the resumed epoch trained every parameter (5.5M where the run trained
    # 26K), silently; with the model's own optimizers PyTorch refused the optimizer state.
    _run(tmp_path / "s2a", "fit", "--trainer.max_epochs", "1")
    resume = ["--trainer.max_epochs", "2", "--s2a.enabled", "false"]
    with pytest.raises(ValueError, match=r"is an S2A run's, and S2A is off here"):
        _run(tmp_path / "s2a", "fit", *resume, "--ckpt_path", _checkpoint(tmp_path / "s2a"))
    # a plain run's checkpoint resumes plainly
    _run(tmp_path / "plain", "fit", "--trainer.max_epochs", "1", "--s2a.enabled", "false")
    cli = _run(tmp_path / "plain", "fit", *resume, "--ckpt_path", _checkpoint(tmp_path / "plain"))
    assert cli.trainer.current_epoch == 2


def test_a_strategy_built_on_s2a_strategy_with_the_section_on_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "fit", "--trainer.strategy", f"{__name__}.TaskStrategy")
    assert "applies S2A itself and so does the s2a section" in capsys.readouterr().err


def test_printing_the_config_for_its_own_class_by_short_name(capsys):
    # --model ImageClassifier is the config file's own class: printing was refused as if
    # another class would get the file's init_args.
    quickstart = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", quickstart, "--model", "ImageClassifier", "--print_config"])
    assert exit_.value.code in (0, None)
    assert "lr: 0.003" in capsys.readouterr().out


def test_the_counting_of_a_head_outside_can_be_turned_off(tmp_path):
    # the switch the torch.func warning names, for CLI users too
    root = ["--trainer.default_root_dir", str(tmp_path)]
    cli = S2ALightningCLI(run=False, args=[*SMALL, *root, "--s2a.count_outside", "false"])
    assert cli.s2a_callback.count_outside is False
    cli = S2ALightningCLI(run=False, args=[*SMALL, *root])
    assert cli.s2a_callback.count_outside is True
