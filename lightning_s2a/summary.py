"""``handle.summary()``: a readable table of what trains and what the last forward kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import S2AHandle

PARTS = ("backbone", "prompt", "side", "head")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_summary(handle: S2AHandle) -> str:
    """Per part of the model: trainable parameters and the stored/raw bytes of the last forward."""
    prefixes = handle.structure.parts
    trainable: dict[str, int] = dict.fromkeys(PARTS, 0)
    total = 0
    for name, p in handle.model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        label = next(
            (lab for pre, lab in prefixes if pre and (name == pre or name.startswith(pre + "."))),
            "backbone",
        )
        trainable[label] += p.numel()
    stats = handle.stats()
    parts = stats.get("by_part", {})
    cfg = handle.config
    lines = [
        f"S2A modules={'+'.join(cfg.modules)} bits={cfg.bits} compress={cfg.compress} "
        f"surgery={cfg.surgery} bn_mode={cfg.bn_mode}",
        f"{'part':<10} {'trainable':>12} {'raw MiB':>10} {'stored MiB':>11} {'stored/raw':>11}",
    ]
    shown = [p for p in PARTS if trainable[p] or p in parts]
    for part in shown:
        row = parts.get(part, {"raw_bytes": 0, "stored_bytes": 0})
        ratio = row["stored_bytes"] / row["raw_bytes"] if row["raw_bytes"] else 0.0
        lines.append(
            f"{part:<10} {trainable[part]:>12,} {_mib(row['raw_bytes']):>10} "
            f"{_mib(row['stored_bytes']):>11} {ratio:>11.3f}"
        )
    count = sum(trainable.values())
    lines.append(
        f"{'total':<10} {count:>12,} {_mib(stats['raw_bytes']):>10} "
        f"{_mib(stats['stored_bytes']):>11} {stats['ratio']:>11.3f}"
    )
    lines.append(
        f"trainable: {count:,} of {total:,} parameters ({100 * count / max(total, 1):.3f}%)"
    )
    return "\n".join(lines)
