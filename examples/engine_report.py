"""Measure the engine: stored/raw saved-activation bytes and step-time overhead, per model.

Each model runs bias-only (biases + head train) twice in this process, uncompressed
(``compress=False``, which still counts bytes) and compressed, alternating step by step so
machine noise hits both alike, each variant S2A'd once and warmed up past the
codebook fits of its first forwards. Prints a Markdown table; the numbers in docs/engine.md come
from this script.

    uv run python examples/engine_report.py --models vit_base_patch16_224 resnet50 --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.bench.overhead import clean_rounds
from lightning_s2a.bench.run import refitted
from lightning_s2a.lightning.model import build_backbone


def build(name: str) -> torch.nn.Module:
    """A timm model by name; a "(imagenet)" suffix loads the offline pretrained weights."""
    return build_backbone(name.removesuffix("(imagenet)"), name.endswith("(imagenet)"), 10)


def step(model, x, y) -> float:
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def measure(name: str, batch: int, steps: int, bits: int, device: str, warmup: int) -> dict:
    torch.manual_seed(0)
    base = build(name).to(device).train()
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    configs = {"plain": S2AConfig(compress=False), "s2a": S2AConfig(bits=bits)}
    # One copy per variant, S2A'd once, as in training: derivative codebooks are fitted at
    # forwards 1, 2, 3, 5, 9, ... of an engine (applied per step, every step fitted them all).
    models = {key: copy.deepcopy(base) for key in configs}
    handles = {key: apply_s2a(models[key], cfg) for key, cfg in configs.items()}
    times: dict[str, list[float]] = {k: [] for k in configs}

    def timed_round() -> Callable[[], None]:
        for key, model in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            times[key].append(step(model, x, y))
            if device == "cuda":
                torch.cuda.synchronize()

        def undo() -> None:
            for kept in times.values():
                kept.pop()

        return undo

    # rounds past the warm-up in which codebooks were fitted (forwards 1, 2, 3, 5, 9, ...):
    # left out of the median, as the benches leave them
    left_out = clean_rounds(
        timed_round, lambda: refitted(handles["s2a"].engine), steps, warmup=warmup, label=name
    )
    refits = left_out - warmup
    stats = {key: handle.stats() for key, handle in handles.items()}
    for handle in handles.values():
        handle.remove()
    plain, s2a = statistics.median(times["plain"]), statistics.median(times["s2a"])
    return {
        "model": name,
        "raw_mib": stats["s2a"]["raw_bytes"] / 2**20,
        "stored_mib": stats["s2a"]["stored_bytes"] / 2**20,
        "ratio": stats["s2a"]["ratio"],
        "overhead": s2a / plain,
        "by_kind": stats["s2a"]["by_kind"],
        "timed_refits": refits,  # rounds left out for fitting
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=[
            "vit_base_patch16_224",
            "vit_small_patch16_224",
            "swin_tiny_patch4_window7_224",
            "convnext_tiny",
            "resnet50",
            "resnet18",
            "tf_efficientnet_lite0(imagenet)",
        ],
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps: past the codebook fits at 1, 2, 3, 5"
    )
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(
        f"device={args.device} torch={torch.__version__} timm={timm.__version__} "
        f"python={platform.python_version()} threads={torch.get_num_threads()} "
        f"batch={args.batch_size} 224px fp32 bits={args.bits} steps={args.steps} (median) "
        f"after {args.warmup} warm-up"
    )
    print()
    print("| model | raw saved MiB | stored MiB | stored/raw | step time, s2a / uncompressed |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models:
        r = measure(name, args.batch_size, args.steps, args.bits, args.device, args.warmup)
        # rounds that fitted codebooks (forward 9 at --steps 4 and more) are several times a
        # plain step: left out of the median, and said
        fitted = f" ({r['timed_refits']} fitting rounds left out)" if r["timed_refits"] else ""
        print(
            f"| {r['model']} | {r['raw_mib']:.1f} | {r['stored_mib']:.1f} | "
            f"{r['ratio']:.3f} (1/{1 / r['ratio']:.1f}) | {r['overhead']:.2f}x{fitted} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
