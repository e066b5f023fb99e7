"""``lightning-s2a bench``: one process per method, and numbers that agree with the engine."""

from __future__ import annotations

import copy
import csv
import time

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_s2a import apply_s2a
from lightning_s2a.bench.methods import expand
from lightning_s2a.engine.accounting import SavedBytesCounter
from lightning_s2a.lightning.cli import main as cli_main


def test_bench_runs_each_method_and_agrees_with_the_engine(tmp_path):
    cli_main(
        ["bench", "--model", "resnet18", "--batch-size", "2", "--resolution", "64",
         "--methods", "full", "bitfit", "s2a_bias", "--bits", "4", "2", "--steps", "1",
         "--warmup", "0", "--classes", "10", "--out", str(tmp_path)]
    )  # fmt: skip
    with open(tmp_path / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "bitfit", "s2a_bias@4bit", "s2a_bias@2bit"}
    assert not any(r["error"] for r in rows.values())
    # the same measurements made here, in-process, with the engine's own accounting
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    with SavedBytesCounter(model) as counter:
        model(x)
    with apply_s2a(model, modules="bias", bits=4, input_size=(3, 64, 64)) as handle:
        F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
        stored = handle.stats()["stored_bytes"]
    assert float(rows["full"]["saved_mib"]) == pytest.approx(counter.raw_bytes / 2**20, rel=1e-9)
    assert float(rows["s2a_bias@4bit"]["saved_mib"]) == pytest.approx(stored / 2**20, rel=1e-9)
    # with surgery, a bias-only ResNet keeps only exact codes (1-bit ReLU masks, max-pool
    # offsets, BatchNorm scales, the head input), so the code width changes nothing
    assert rows["s2a_bias@2bit"]["saved_mib"] == rows["s2a_bias@4bit"]["saved_mib"]
    assert float(rows["s2a_bias@4bit"]["saved_mib"]) * 20 < float(rows["full"]["saved_mib"])
    table = (tmp_path / "results.md").read_text()
    assert "resnet18, batch 2, 64px, fp32" in table and "x less" in table


def test_unknown_bench_method_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown bench method\(s\) \['qlora'\]; known: \["):
        expand(["full", "qlora"], [4])


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--overhead", "--steps", "0"]])
def test_a_bench_of_no_steps_is_refused_before_anything_runs(flags, capsys):
    """--steps 0 built every model and then failed in the statistics of no steps."""
    with pytest.raises(SystemExit):
        cli_main(["bench", *flags])
    assert "--steps: must be at least 1, got 0" in capsys.readouterr().err


def test_lora_targets_skip_the_head_and_grouped_convolutions():
    from lightning_s2a.bench.methods import lora_targets

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    targets = lora_targets(vit)
    assert "blocks.0.attn.qkv" in targets and "blocks.11.mlp.fc2" in targets
    assert "head" not in targets and len(targets) == 12 * 4
    cnn = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    targets = lora_targets(cnn)
    modules = dict(cnn.named_modules())
    assert "conv_stem" in targets and "blocks.1.0.conv_pw" in targets
    assert all(modules[n].groups == 1 for n in targets)
    depthwise = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and not set(depthwise) & set(targets)


def test_lora_baseline_builds_on_a_depthwise_cnn():
    pytest.importorskip("peft")
    from lightning_s2a.bench.methods import METHODS

    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    meter = METHODS["lora"][0](model, 0)
    trainable = [n for n, p in meter.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert not any("conv_dw.lora" in n for n in trainable)
    from lightning_s2a.bench.methods import trainable as count

    built = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    lora = sum(p.numel() for n, p in meter.model.named_parameters() if "lora_" in n)
    assert count(meter.model)[1] == sum(p.numel() for p in built.parameters()) + lora


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--warmup", "-1"], "--warmup: must be at least 0, got -1"),
        (["--bits", "3"], "bits=3 is not supported"),
        (["--model", "not_a_model"], "unknown timm model 'not_a_model'"),
        (["--device", "gpu0"], "Invalid device string: 'gpu0'"),
    ],
)
def test_bad_bench_flags_are_refused_before_any_method_runs(flags, said, capsys, monkeypatch):
    """--warmup -1 timed one step fewer than the header said; a bad --bits or --model failed
    row by row after the rows before it had run; --device took any string."""
    from lightning_s2a.bench import run

    monkeypatch.setattr(run, "_run", lambda *a: pytest.fail("a method ran"))
    with pytest.raises(SystemExit):
        cli_main(["bench", "--model", "resnet18", *flags])
    assert said in capsys.readouterr().err


def test_a_bench_with_failed_methods_exits_non_zero(tmp_path, monkeypatch, capsys):
    """It exited 0 with every row failed: a script or CI step could not tell."""
    from lightning_s2a.bench import run

    monkeypatch.setattr(run, "_run", lambda spec, *a: {"method": spec["method"], "error": "x"})
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--model", "resnet18", "--methods", "full", "--out", str(tmp_path)])
    assert exit_.value.code == 1
    assert "1 of 1 methods failed:\n  full: x" in capsys.readouterr().out
    assert "failed: x" in (tmp_path / "results.md").read_text()  # the table is still written
    assert "threads)" in (tmp_path / "results.md").read_text()  # torch's threads, named


def test_a_worker_that_dies_reports_its_exit_code(monkeypatch):
    """The exit code was read before the worker was joined: "exit code None" at random."""
    import multiprocessing as mp
    import os

    from lightning_s2a.bench import run

    monkeypatch.setattr(run, "_worker", lambda spec: os._exit(3))
    spec = {"method": "full", "bits": None}
    row = run._run_forked(mp.get_context("fork"), spec, timeout=60)
    assert row["error"] == "worker died (exit code 3)"


def test_overhead_builds_small_input_variants_only_below_224_px_and_says_so():
    from lightning_s2a.bench.overhead import small_input_args

    swin = "swin_tiny_patch4_window7_224"
    assert small_input_args(swin, 32) == {"window_size": 2}
    assert small_input_args(swin, 224) == {}  # it timed 2x2 windows here, under Swin's name
    assert small_input_args("vit_tiny_patch16_224", 32) == {}


def test_overhead_pack_includes_the_small_tensors_coded_when_a_forward_ends(monkeypatch):
    """The forward's batches are coded in the engine's forward end, outside any one pack:
    the pack column left them out (about 8% of ViT-Ti's quantizer time)."""
    from lightning_s2a.bench import overhead
    from lightning_s2a.engine import batching

    original, slow = batching.PackBatches.code, []

    def code(self):  # a forward end that takes 0.3 s more where asked
        if slow:
            time.sleep(0.3)
        return original(self)

    monkeypatch.setattr(batching.PackBatches, "code", code)
    model = timm.create_model("convnext_atto", num_classes=4).train()
    x = torch.randn(1, 3, 32, 32)
    pack = []
    with apply_s2a(model, bits=4, min_numel=1) as handle:
        for forward in range(1, 7):  # forwards 1, 2, 3 and 5 fit codebooks: 4 and 6 do not
            slow[:] = [1] if forward == 4 else []
            timers = overhead._Timers()
            with overhead._instrumented(handle.engine, timers):
                model(x).sum().backward()
            pack.append(timers.seconds["pack"])
    assert batching.PackBatches.code is code  # put back as it was
    assert pack[3] - pack[5] >= 0.25


def test_overhead_bench_times_each_part_of_the_engine(tmp_path):
    from lightning_s2a.bench import overhead

    cli_main(
        ["bench", "--overhead", "--models", "convnext_atto", "--steps", "1", "--out",
         str(tmp_path)]
    )  # fmt: skip
    text = (tmp_path / "overhead.md").read_text()
    assert "| convnext_atto |" in text and "1 thread(s)" in text
    row = overhead.measure("convnext_atto", bits=4, steps=1, resolution=32)
    assert set(row["ms"]) == {"bitfit", "bookkeeping", "s2a", "s2a_unbatched"}
    assert all(v > 0 for v in row["ms"].values())
    # every part of the engine ran inside the instrumented s2a steps, and it compressed
    assert set(row["parts"]) == {"recognition", "pack", "unpack", "accounting"}
    assert all(v > 0 for v in row["parts"].values())
    assert row["saved_tensors"] > 10 and row["ratio"] < 0.5
    # the parts are timed on the same forward (plain functions as pack hooks turned the
    # surgery's rewrites off there: frozen convs saved their inputs again)
    assert row["instrumented_saved_tensors"] == row["saved_tensors"]
    # steady state only: the rounds of forwards 1, 2 and 3, which fit ConvNeXt's GELU
    # codebooks (at 5x to 10x a plain step), timed in no variant (the first two rounds were
    # left out before, forward 3 timed: at 3 steps the ratio read 10x instead of 2.2x)
    assert row["left_out_rounds"] == 3 and row["timed_steps"] == 1
    line = next(line for line in text.splitlines() if line.startswith("| convnext_atto |"))
    assert line.split("|")[8].strip() == "3"  # the rounds left out, in the table


def test_overhead_parts_leave_out_every_step_that_fitted_codebooks():
    """The instrumented pass's first step fitted codebooks at --steps 1, 4, 11, ... (its
    forward a power of two plus one): restoring the timers to the empty dict before it
    kept that step's parts, and pack read 42 ms a step instead of 6.7."""
    from lightning_s2a.bench.overhead import _timed_step, _Timers, clean_rounds

    timers, calls = _Timers(), []

    def step():
        calls.append(len(calls) + 1)
        timers.seconds["pack"] += 10.0 if len(calls) in (1, 3) else 1.0
        timers.calls["pack"] += 1

    left_out = clean_rounds(lambda: _timed_step(step, timers), lambda: calls[-1] in (1, 3), steps=2)
    assert left_out == 2 and calls == [1, 2, 3, 4]
    assert timers.seconds == {"pack": 2.0} and timers.calls == {"pack": 2}
    # warm-up rounds go too, and too few clean rounds is an error naming the model
    calls.clear()
    assert clean_rounds(lambda: _timed_step(step, timers), lambda: False, 1, warmup=2) == 2
    with pytest.raises(RuntimeError, match=r"vit: 0 of 3 rounds fitted no codebook"):
        clean_rounds(lambda: _timed_step(step, timers), lambda: True, 3, label="vit")


class _Conn:
    def send(self, value):
        self.value = value

    def close(self):
        pass


def _storages_kept(model, x):
    """Bytes of the distinct storages a forward's saved tensors hold, parameters excluded."""
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = (storage, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(n for _, n in kept.values())


def test_bench_methods_measure_what_their_labels_say():
    """A reviewer found: ViTs failed at any --resolution but 224; failed rows lost their bit
    width; 'bitfit' was timed under the engine's bookkeeping (8-12% slower than BitFit); a
    ratio above full read '0.8x less'."""
    from lightning_s2a import get_handle
    from lightning_s2a.bench.methods import METHODS, build_model
    from lightning_s2a.bench.run import _child, _ratio

    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", 10, 32)  # built for 32 px
    x = torch.randn(2, 3, 32, 32)
    reference = apply_s2a(copy.deepcopy(model), modules="bias", compress=False, surgery=False)
    reference.model(x)
    meter = METHODS["bitfit"][0](model, 0)
    assert not get_handle(model).engine.attached  # timed as plain PyTorch
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("bias") or n.startswith("head.") for n in trainable)
    with meter.forward():
        model(x)
    # the storages the saved tensors keep alive, each once, as an independent count finds
    assert meter.saved_bytes() == _storages_kept(model, x) > 0
    assert meter.saved_bytes() >= reference.stats()["stored_bytes"]  # views count whole
    probe = build_model("vit_tiny_patch16_224", 10, 32)
    probe_meter = METHODS["linear_probe"][0](probe, 0)
    with probe_meter.forward():
        probe(x)
    # the head's saved x[:, 0] keeps the final norm's whole (2, 5, 192) output alive (it
    # was counted as its own 2 x 192 floats: "40,000x less than full" on ViT-B)
    assert probe_meter.saved_bytes() == _storages_kept(probe, x) == 2 * 5 * 192 * 4

    conn = _Conn()
    spec = {"method": "s2a_bias", "bits": 2, "model": "no_such_model", "device": "cpu"}
    _child({**spec, "resolution": 32, "classes": 10, "batch_size": 1}, conn)
    assert conn.value["method"] == "s2a_bias@2bit" and "no_such_model" in conn.value["error"]
    assert (_ratio(10.0, 4.0), _ratio(10.0, 12.5), _ratio(10.0, 0.0), _ratio(10.0, 10.0)) == (
        "2.5x less",
        "1.2x more",
        "-",
        "1.0x",  # full fine-tuning's own row ("1.0x less" than itself)
    )


#: One method's run in this process: ViT-Ti at 32 px, batch 1, 1 warm-up and 3 timed steps.
_WORKER_SPEC = {
    "bits": 4,
    "model": "vit_tiny_patch16_224",
    "device": "cpu",
    "resolution": 32,
    "classes": 10,
    "batch_size": 1,
    "dtype": "fp32",
    "warmup": 1,
    "steps": 3,
}


def test_bench_times_steps_that_fit_codebooks_apart():
    """With the defaults (1 warm-up, 3 steps) two of the three timed steps refitted every
    GELU codebook (forwards 2 and 3), so the median was a refit step."""
    from lightning_s2a.bench.run import _worker

    spec = {**_WORKER_SPEC, "method": "s2a_bias"}
    row = _worker(spec)
    assert row["refit_steps"] == 2  # forwards 2 and 3 fitted, forward 4 did not
    assert row["step_s"] > 0
    plain = _worker({**spec, "method": "bitfit"})
    assert plain["refit_steps"] == 0
    # two timed steps only, both refits: the table marks the time as no steady state (it
    # read 7.6x full fine-tuning, unmarked)
    from lightning_s2a.bench.run import _table

    short = _worker({**spec, "steps": 2})
    assert short["refit_steps"] == 2 and short["steady_steps"] == 0
    table = _table([plain, row, short], plain).splitlines()
    assert table[3].count("†") == 0 and table[4].count("†") == 2  # row: 1 steady step
    assert "† every timed step of this method fitted" in table[-1]
    assert "†" not in _table([plain, row], plain)


def test_baselines_count_their_bytes_once_and_time_the_steps_without_the_hook(monkeypatch):
    """A baseline's saved bytes are counted by a Python hook on every saved tensor: timed
    with it on every step, BitFit read 1.15x-1.3x slower at 32 px, flattering S2A."""
    from lightning_s2a.bench import methods
    from lightning_s2a.bench.run import _worker
    from lightning_s2a.engine.accounting import SavedBytesCounter

    made = []

    class Counting(SavedBytesCounter):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(methods, "SavedBytesCounter", Counting)
    spec = {**_WORKER_SPEC, "method": "bitfit"}
    row = _worker(spec)
    assert len(made) == 1 and row["saved_mib"] > 0  # one counted step, not four
    assert row["saved_mib"] * 2**20 == made[0].storage_bytes
    alone = _worker({**spec, "warmup": 0, "steps": 1})  # the counted step is the only one
    assert alone["step_s"] > 0 and alone["saved_mib"] == row["saved_mib"]
