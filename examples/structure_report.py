"""Measure each structural module's saved-activation memory against full fine-tuning.

For each model: bytes autograd keeps in one training forward under full fine-tuning (every
parameter trains, nothing compressed), then with S2A bias / prompt / bias+prompt / side at
the given bits, all counted exactly. Prints a Markdown table; docs/structure.md quotes it.

    uv run python examples/structure_report.py --models vit_base_patch16_224 resnet50
"""

from __future__ import annotations

import argparse

import timm
import torch

from lightning_s2a import apply_s2a
from lightning_s2a.engine.accounting import SavedBytesCounter
from lightning_s2a.lightning.model import build_backbone

MODULES = ("bias", "prompt", "bias+prompt", "side")


def build(name: str, classes: int) -> torch.nn.Module:
    """A timm model by name; a "(imagenet)" suffix loads the offline pretrained weights."""
    return build_backbone(name.removesuffix("(imagenet)"), name.endswith("(imagenet)"), classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=[
            "vit_base_patch16_224",
            "swin_tiny_patch4_window7_224",
            "convnext_tiny",
            "resnet50",
            "tf_efficientnet_lite0(imagenet)",
        ],
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    print(
        f"torch={torch.__version__} timm={timm.__version__} batch={args.batch_size} 224px fp32 "
        f"bits={args.bits} classes={args.classes}; MiB kept for backward in one training forward"
    )
    print()
    print("| model | full FT MiB | " + " | ".join(MODULES) + " |")
    print("|---|---:|" + "---:|" * len(MODULES))
    for name in args.models:
        torch.manual_seed(0)
        model = build(name, args.classes).train()
        x = torch.randn(args.batch_size, 3, 224, 224)
        with SavedBytesCounter(model) as counter:
            model(x)
        full = counter.storage_bytes  # storages kept alive: a saved x[:, 0] keeps them whole
        cells = []
        for modules in MODULES:
            with apply_s2a(model, modules=modules, bits=args.bits) as handle:
                model(x)
                stored = handle.stats()["stored_bytes"]
                _, fraction = handle.trainable_parameters()
            cells.append(
                f"{stored / 2**20:.1f} (1/{full / max(stored, 1):.0f}, {100 * fraction:.2f}%)"
            )
        print(f"| {name} | {full / 2**20:.0f} | " + " | ".join(cells) + " |", flush=True)
    print()
    print("Cells: stored MiB (fraction of full fine-tuning, trainable parameters incl. head).")


if __name__ == "__main__":
    main()
