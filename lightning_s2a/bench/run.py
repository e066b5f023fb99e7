"""Run the benchmark: every method in a fresh process, then one table, CSV and plot.

    lightning-s2a bench --model vit_base_patch16_224 --batch-size 8
    lightning-s2a bench --overhead          # the engine's host cost per step (bench/overhead.py)

Each method runs in a process of its own, forked from a server that imported everything once
(``multiprocessing``'s forkserver; elsewhere ``python -m lightning_s2a.bench.run --worker``), so
that memory peaks do not leak between methods. Ratios are against full fine-tuning measured in
the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import non_negative_int, positive_int

MB = 2**20


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One method, in this process: prepare, train ``warmup + steps`` steps, measure."""
    import torch
    import torch.nn.functional as F

    from ..api import get_handle
    from .methods import METHODS, build_model, label, trainable

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    res = spec["resolution"]
    # One batch for every method, drawn before any method's set-up draws random numbers.
    x = torch.randn(spec["batch_size"], 3, res, res, device=device)
    y = torch.randint(0, spec["classes"], (spec["batch_size"],), device=device)
    model = build_model(spec["model"], spec["classes"], res).to(device).train()
    prepare, uses_bits = METHODS[spec["method"]]
    extra = {"input_size": (3, res, res)} if uses_bits else {}
    meter = prepare(model, spec["bits"], **extra) if uses_bits else prepare(model, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = spec["dtype"] == "bf16-mixed"
    times, fitting, counted, saved = [], [], [], 0
    handle = get_handle(model)
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"] and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # A baseline's bytes are counted by a hook of the bench's own, on the first step only
        # (they are the same every step): timed with it, BitFit read 1.15x-1.3x slower.
        counting = step == 0 or not meter.hooked
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            # the model's forward only, as the engine counts it
            with meter.forward() if counting else contextlib.nullcontext():
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
        if counting:
            saved = meter.saved_bytes()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= spec["warmup"]:
            # A step that fitted derivative codebooks (forwards 1, 2, 3, 5, 9, ... of an
            # engine; then every ``codebook_refresh``) is no steady-state step: timed apart.
            refit = handle is not None and refitted(handle.engine)
            took = time.perf_counter() - start
            (counted if counting and meter.hooked else fitting if refit else times).append(took)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / MB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_train, n_total = trainable(model)
    return {
        "method": label(spec["method"], spec["bits"]),
        "saved_mib": saved / MB,
        "peak_mib": peak,
        "trainable": n_train,
        "trainable_pct": 100 * n_train / n_total,
        "step_s": statistics.median(times or fitting or counted),
        "refit_steps": len(fitting),
        "steady_steps": len(times),
    }


def refitted(engine: Any) -> bool:
    """True if the engine's last forward fitted a derivative codebook."""
    return any(cb.fitted_at == engine.step for cb in engine.codebooks.values())


def _forkserver() -> Any | None:
    """A ``forkserver`` context whose server imports torch, timm and the methods once.

    Every method still runs in a process of its own (memory peaks must not leak between
    methods), but forked from a server that has already imported everything, instead of a
    fresh interpreter paying ~20 s of imports per method. The server never runs torch code,
    so its children start with clean thread pools and no CUDA context. None where the
    platform has no forkserver: a subprocess per method then.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return None
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["timm", "lightning_s2a.bench.methods", "lightning_s2a.bench.run"])
    return ctx


def _child(spec: dict[str, Any], conn: Any) -> None:
    try:
        result = _worker(spec)
    except Exception as err:  # reported in the table, like a failed subprocess
        result = {"method": _label(spec), "error": f"{type(err).__name__}: {err}"}
    conn.send(result)
    conn.close()


def _run_forked(ctx: Any, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(spec, send))
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout):
            return {"method": _label(spec), "error": f"timed out after {timeout:.0f} s"}
        return receive.recv()
    except EOFError:
        proc.join(10)  # its exit code is None until it is joined
        return {"method": _label(spec), "error": f"worker died (exit code {proc.exitcode})"}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _run(spec: dict[str, Any], timeout: float, ctx: Any | None = None) -> dict[str, Any]:
    if ctx is not None:
        return _run_forked(ctx, spec, timeout)
    cmd = [sys.executable, "-m", "lightning_s2a.bench.run", "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"method": _label(spec), "error": tail[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _label(spec: dict[str, Any]) -> str:
    from .methods import label

    return label(spec["method"], spec["bits"])


def _ratio(full: float, value: float) -> str:
    """How many times less than full fine-tuning's ``value`` is (or more, where it is)."""
    if not value:
        return "-"
    if value == full:
        return "1.0x"  # full fine-tuning's own row, or a method that keeps as much
    return f"{full / value:.1f}x less" if value < full else f"{value / full:.1f}x more"


def _table(rows: list[dict[str, Any]], full: dict[str, Any] | None) -> str:
    lines = [
        "| method | saved activations MiB | vs full | peak MiB | vs full | trainable | "
        "step s | vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    marked = False
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |||||||")
            continue

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return _ratio(full[key], r[key]) if full else "-"

        step_ratio = f"{r['step_s'] / full['step_s']:.2f}x" if full else "-"
        # every timed step fitted codebooks: no steady-state time, said in the table
        fitted = "†" if r.get("refit_steps") and not r.get("steady_steps", 1) else ""
        marked = marked or bool(fitted)
        lines.append(
            f"| {r['method']} | {r['saved_mib']:.1f} | {ratio('saved_mib')} | "
            f"{r['peak_mib']:.0f} | {ratio('peak_mib')} | {r['trainable']:,} "
            f"({r['trainable_pct']:.2f}%) | {r['step_s']:.3f}{fitted} | {step_ratio}{fitted} |"
        )
    if marked:
        lines.append(
            "\n† every timed step of this method fitted derivative codebooks (an engine fits "
            "them at forwards 1, 2, 3, 5, 9, ...): not its steady-state time; raise --steps "
            "or --warmup"
        )
    return "\n".join(lines)


def pyplot() -> Any | None:
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib (the plot
    is optional: ``uv sync --group bench`` installs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    ok = [r for r in rows if "error" not in r]
    names = [r["method"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(ok) + 1.5), sharey=True)
    for ax, key, label in zip(
        axes,
        ("saved_mib", "peak_mib", "step_s"),
        ("saved activations (MiB)", "peak memory (MiB)", "step time (s)"),
        strict=True,
    ):
        ax.barh(names, [r[key] for r in ok], color="#4477aa")
        ax.set_xlabel(label)
        ax.invert_yaxis() if ax is axes[0] else None
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    """Parse ``lightning-s2a bench`` options and run every method in its own process.

    ``--overhead`` runs the engine's host-overhead benchmark instead (:mod:`.overhead`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--overhead" in argv:
        from .overhead import main as overhead_main

        overhead_main([a for a in argv if a != "--overhead"])
        return
    from .methods import METHODS, expand

    parser = argparse.ArgumentParser(
        prog="lightning-s2a bench",
        description=__doc__.split("\n")[0],
        epilog="lightning-s2a bench --overhead [--models ...] [--threads N] ... measures the "
        "engine's host cost per step instead (lightning-s2a bench --overhead --help).",
    )
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--resolution", type=positive_int, default=224)
    parser.add_argument("--dtype", choices=("fp32", "bf16-mixed"), default="fp32")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2, 8])
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--classes", type=positive_int, default=100)
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--out", default="bench_results", help="folder for results.md/csv/png")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per method")
    args = parser.parse_args(argv)
    import torch

    from ..config import S2AConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:  # checked before any method runs: each row failed on its own, after the others
        dev = torch.device(device)
        runs = expand(args.methods, args.bits)
        for bits in sorted(set(args.bits)):
            S2AConfig(bits=bits)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    import timm

    if not timm.is_model(args.model):
        parser.error(f"unknown timm model {args.model!r} (timm.list_models() lists them)")
    base = {
        "model": args.model,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "classes": args.classes,
        "device": device,
    }
    machine = (  # the device measured: cuda:1 was labelled GPU 0's name, cuda:0 the CPU's
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads)"
    )
    header = (
        f"{args.model}, batch {args.batch_size}, {args.resolution}px, {args.dtype}, {machine}, "
        f"torch {torch.__version__}, median of {args.steps} steps after {args.warmup} warm-up "
        "(steps that fit codebooks timed apart), "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(header, flush=True)
    rows = []
    ctx = _forkserver()
    for method, bits in runs:
        row = _run({**base, "method": method, "bits": bits}, args.timeout, ctx)
        print(f"  {row['method']}: " + ("failed" if "error" in row else "ok"), flush=True)
        rows.append(row)
    full = next((r for r in rows if r["method"] == "full" and "error" not in r), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(rows, full)
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    with open(out / "results.csv", "w", newline="") as f:
        keys = [
            "method",
            "saved_mib",
            "peak_mib",
            "trainable",
            "trainable_pct",
            "step_s",
            "refit_steps",
            "steady_steps",
            "error",
        ]
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plotted = _plot(rows, out / "results.png")
    print()
    print(table)
    print(
        f"\nwritten: {out}/results.md, results.csv"
        + (", results.png" if plotted else " (no matplotlib: no plot)")
    )
    failed = [f"{r['method']}: {r['error']}" for r in rows if "error" in r]
    if failed:  # a script or CI step sees it (the command exited 0 with every row failed)
        print(f"\n{len(failed)} of {len(rows)} methods failed:\n  " + "\n  ".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
