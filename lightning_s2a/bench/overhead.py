"""Host cost of the engine per training step, where compute is negligible.

    lightning-s2a bench --overhead

On a GPU, kernels run asynchronously while Python runs on the host: if the engine's host work
per step exceeds the GPU's compute, the step waits on Python. This measures that host work on
the CPU, with compute made negligible (one thread, batch 1, a small input), for four variants
of the same model and trainable set, alternating step by step in one process:

* ``bitfit``: biases and head train, plain PyTorch (S2A's structure, no engine hooks);
* ``bookkeeping``: the engine attached with ``compress=False`` (module hooks, the operator
  mode, rewrites and byte accounting, nothing packed);
* ``s2a``: the engine compressing at ``--bits``, every saved tensor through its quantizer
  (``min_numel=1``: at this input most would otherwise be small enough to keep as they are);
* ``s2a unbatched``: the same, each small tensor coded alone instead of in one pass with the
  forward's others (``engine.batch_numel = 0``, see ``engine/batching.py``).

A second, instrumented pass times the engine's parts inside ``s2a`` steps: operator
recognition, pack (quantizers included), unpack and accounting. Instrumentation adds its own
cost, so the parts are reported per step from that pass and the totals from the plain pass.
Both time the steady state only: two warm-up rounds and every round in which an engine
fitted a derivative codebook (forwards 1, 2, 3, 5, 9, ...) are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import positive_int
from .run import refitted

MODELS = (
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "resnet50",
    "convnext_atto",
    "tf_efficientnet_lite0",
)

#: What a small input needs beyond ``img_size`` (Swin's windows must divide its grids).
_SMALL = {"swin_tiny_patch4_window7_224": {"window_size": 2}}


def small_input_args(name: str, resolution: int) -> dict[str, Any]:
    """``_SMALL``'s arguments for ``name`` below 224 px only (a Swin timed at 224 px was
    built with 2x2 windows, another model than its row named); named in the table's row."""
    return _SMALL.get(name, {}) if resolution < 224 else {}


def _build(name: str, resolution: int) -> Any:
    from .methods import build_model

    return build_model(name, 10, resolution, **small_input_args(name, resolution))


def _max_rounds(steps: int, warmup: int = 0) -> int:
    """Rounds enough for ``warmup`` rounds and ``steps`` that fit no codebook: fits come at
    forwards 1, 2, 3, 5, 9, ..., a dozen more at most (a ``codebook_refresh`` below that is
    no bench setting)."""
    return warmup + steps + 14 + steps.bit_length()


def clean_rounds(
    run: Callable[[], Callable[[], None]],
    fitted: Callable[[], bool],
    steps: int,
    warmup: int = 0,
    label: str = "",
) -> int:
    """Run rounds until ``steps`` of them are steady state: past ``warmup``, and no codebook
    fitted in them (``fitted`` after each). ``run`` runs one round and returns what takes
    its record back out, called for the rounds left out; returns how many were left out
    (the warm-up included). The benches and ``examples/engine_report.py`` time with it."""
    clean = left_out = 0
    for i in range(_max_rounds(steps, warmup)):
        undo = run()
        if i < warmup or fitted():
            undo()
            left_out += 1
            continue
        clean += 1
        if clean == steps:
            return left_out
    raise RuntimeError(
        f"{label}: {clean} of {steps} rounds fitted no codebook within "
        f"{_max_rounds(steps, warmup)}; "
        "lower --steps"
    )


def _timed_step(step: Callable[[], Any], timers: _Timers) -> Callable[[], None]:
    """Run ``step`` with the parts timed; returns what puts ``timers`` back as before it."""
    before = dict(timers.seconds), dict(timers.calls)
    step()

    def undo() -> None:
        for now, then in zip((timers.seconds, timers.calls), before, strict=True):
            now.clear()  # (a part first timed in this step goes too)
            now.update(then)

    return undo


class _Timers:
    """Accumulated seconds per engine part, installed by wrapping the engine's methods."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        seconds, calls, clock = self.seconds, self.calls, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[part] += clock() - start
                calls[part] += 1

        return timed


@contextlib.contextmanager
def _instrumented(engine: Any, timers: _Timers) -> Iterator[None]:
    """Time recognition, pack, unpack and accounting inside ``engine`` (and restore after)."""
    from ..engine import accounting, batching

    add = accounting.ForwardAccount.add
    code = batching.PackBatches.code
    # Bound to the engine, as its own methods are: the operator mode applies the surgery's
    # rewrites only while the innermost pack hook's ``__self__`` is the engine, and plain
    # functions there timed a heavier forward (frozen convs saving their inputs: ResNet-50
    # 263 saved tensors instead of 103).
    for name, part in (("_classify", "recognition"), ("_pack", "pack"), ("_unpack", "unpack")):
        timed = timers.wrap(part, getattr(type(engine), name))
        setattr(engine, name, types.MethodType(timed, engine))
    accounting.ForwardAccount.add = timers.wrap("accounting", add)
    # The forward's small tensors are coded together when it ends, outside any one pack:
    # pack's too (until 2026-12-07 left out, about 8% of ViT-Ti's quantizer time).
    batching.PackBatches.code = timers.wrap("pack", code)
    try:
        yield
    finally:
        for name in ("_classify", "_pack", "_unpack"):
            del engine.__dict__[name]
        accounting.ForwardAccount.add = add
        batching.PackBatches.code = code


def measure(
    name: str, bits: int, steps: int, resolution: int, batch_size: int = 1
) -> dict[str, Any]:
    """Median ms per step of each variant, and the engine's parts, for one model."""
    import torch
    import torch.nn.functional as F

    from ..api import apply_s2a
    from ..config import S2AConfig

    torch.manual_seed(0)
    base = _build(name, resolution).train()
    x = torch.randn(batch_size, 3, resolution, resolution)
    y = torch.arange(batch_size) % 10
    configs = {
        "bitfit": S2AConfig(compress=False),
        "bookkeeping": S2AConfig(compress=False),
        # Every saved tensor through its quantizer, as at real sizes (at this tiny input most
        # would fall under the default min_numel and be kept as they are).
        "s2a": S2AConfig(bits=bits, min_numel=1),
        "s2a_unbatched": S2AConfig(bits=bits, min_numel=1),
    }
    # One copy of the model per variant, each S2A'd once, as in a training run (codebooks
    # are fitted on the first forward and kept).
    models, handles = {}, {}
    for key, cfg in configs.items():
        models[key] = copy.deepcopy(base)
        handles[key] = apply_s2a(models[key], cfg)
    handles["bitfit"].engine.detach()  # plain PyTorch: no hooks, no mode, no rewrites
    handles["s2a_unbatched"].engine.batch_numel = 0

    def step(model: Any) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return time.perf_counter() - start

    def fitting() -> bool:  # a round in which an engine fitted a derivative codebook
        return any(refitted(h.engine) for h in handles.values() if h.engine.attached)

    # Steady state only: rounds that fitted codebooks (forwards 1, 2, 3, 5, 9, 17, ... of
    # an engine) are left out of every variant. Until 2026-12-07 they were timed: at the
    # default 15 steps 4 of them, the ratio 7-12% high; at 3 steps, 10x instead of 2.2x.
    times: dict[str, list[float]] = {k: [] for k in configs}

    def timed_round() -> Callable[[], None]:
        for key, model in models.items():
            times[key].append(step(model))

        def undo() -> None:
            for kept in times.values():
                kept.pop()

        return undo

    # two warm-up rounds (first calls) whatever the codebooks
    left_out = clean_rounds(timed_round, fitting, steps, warmup=2, label=name)
    stats = handles["s2a"].stats()
    if handles["s2a_unbatched"].stats() != stats:  # batching changes no code, no byte
        raise RuntimeError(f"{name}: batched and unbatched s2a steps kept different bytes")
    saved = sum(k["tensors"] for k in stats["by_kind"].values())
    timers = _Timers()
    with _instrumented(handles["s2a"].engine, timers):
        clean_rounds(
            lambda: _timed_step(lambda: step(models["s2a"]), timers),
            lambda: refitted(handles["s2a"].engine),
            steps,
            label=name,
        )
    timed = sum(k["tensors"] for k in handles["s2a"].stats()["by_kind"].values())
    if timed != saved:  # the parts must come from the forward whose step time is reported
        raise RuntimeError(
            f"{name}: the instrumented s2a steps saved {timed} tensors, the timed ones {saved}"
        )
    for handle in handles.values():
        handle.remove()
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    parts = {k: 1000 * v / steps for k, v in timers.seconds.items()}
    extra = ", ".join(f"{k}={v}" for k, v in small_input_args(name, resolution).items())
    return {
        "model": f"{name} ({extra})" if extra else name,
        "ms": ms,
        "parts": parts,
        "timed_steps": len(times["s2a"]),
        "left_out_rounds": left_out,
        "saved_tensors": saved,
        "instrumented_saved_tensors": timed,
        "ratio": stats["ratio"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | bitfit ms | bookkeeping ms | s2a ms | s2a / bitfit | s2a unbatched ms | "
        "saved tensors | rounds left out | recognition ms* | pack ms* | unpack ms* | "
        "accounting ms* |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms, parts = r["ms"], r["parts"]
        lines.append(
            f"| {r['model']} | {ms['bitfit']:.1f} | {ms['bookkeeping']:.1f} | {ms['s2a']:.1f} | "
            f"{ms['s2a'] / ms['bitfit']:.2f}x | {ms['s2a_unbatched']:.1f} | {r['saved_tensors']} | "
            f"{r['left_out_rounds']} | {parts.get('recognition', 0):.1f} | "
            f"{parts.get('pack', 0):.1f} | {parts.get('unpack', 0):.1f} | "
            f"{parts.get('accounting', 0):.1f} |"
        )
    lines.append(
        "\n*mean per step of the instrumented pass, which adds its own cost: parts may sum to "
        "more than the step's median; pack includes the small tensors coded together when "
        "a forward ends, and the accounting done inside pack (counted in both). Rounds left "
        "out: the two warm-up rounds and those in which an engine fitted a derivative "
        "codebook (forwards 1, 2, 3, 5, 9, ...), timed in no variant"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse ``lightning-s2a bench --overhead`` options, measure every model, print a table."""
    parser = argparse.ArgumentParser(
        prog="lightning-s2a bench --overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--steps", type=positive_int, default=15, help="timed steps per variant")
    parser.add_argument("--resolution", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", default="bench_results", help="folder for overhead.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    header = (
        f"engine host overhead: batch {args.batch_size}, {args.resolution}px, fp32, "
        f"{args.threads} thread(s), bits={args.bits}, median of {args.steps} steps, "
        f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(header, flush=True)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.bits, args.steps, args.resolution, args.batch_size))
        print(f"  {name}: ok", flush=True)
    table = _table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(f"{header}\n\n{table}\n")
    print()
    print(table)
    print(f"\nwritten: {out}/overhead.md")
