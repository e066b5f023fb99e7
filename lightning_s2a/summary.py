"""``handle.summary()``: a readable table of what trains and what the last forward kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .engine.accounting import part_of
from .engine.calibration import WIDE_BITS
from .structure.four_bit import held_numel

if TYPE_CHECKING:
    from .api import S2AHandle
    from .engine.hooks import SavedTensorEngine

PARTS = ("backbone", "prompt", "side", "head", "outside")  # outside: engine/outside.py


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
        trainable[part_of(name, prefixes)] += p.numel()
    total += held_numel(handle.model)  # weights held in 4 bits are frozen parameters too
    stats = handle.stats()
    parts = stats.get("by_part", {})
    cfg = handle.config
    lines = [
        f"S2A modules={'+'.join(cfg.modules)} bits={cfg.bits} compress={cfg.compress} "
        f"surgery={cfg.surgery} bn_mode={cfg.bn_mode}",
        f"{'part':<10} {'trainable':>12} {'raw MiB':>10} {'stored MiB':>11} {'stored/raw':>11}",
    ]
    measured = stats["raw_bytes"] > 0  # bytes are known only after a training forward

    def bytes_cells(raw: int, stored: int) -> str:
        if not measured:
            return f"{'-':>10} {'-':>11} {'-':>11}"
        ratio = f"{stored / raw:>11.3f}" if raw else f"{'-':>11}"
        return f"{_mib(raw):>10} {_mib(stored):>11} {ratio}"

    for part in [p for p in PARTS if trainable[p] or p in parts]:
        row = parts.get(part, {"raw_bytes": 0, "stored_bytes": 0})
        lines.append(
            f"{part:<10} {trainable[part]:>12,} "
            + bytes_cells(row["raw_bytes"], row["stored_bytes"])
        )
    count = sum(trainable.values())
    lines.append(
        f"{'total':<10} {count:>12,} " + bytes_cells(stats["raw_bytes"], stats["stored_bytes"])
    )
    if handle.structure.block_rule:
        lines.append(f"blocks ({len(handle.structure.blocks)}): {handle.structure.block_rule}")
    if handle.structure.side_rule:
        lines.append(f"side: {handle.structure.side_rule}")
    if cfg.calibrate or handle.engine.calibrated or handle.engine.module_bits:
        lines.append(calibration_line(handle.engine))
    if not measured:
        lines.append("(bytes: none measured yet; they are filled in after a training forward)")
    lines.append(
        f"trainable: {count:,} of {total:,} parameters ({100 * count / max(total, 1):.3f}%)"
    )
    held, built = handle.weight_bytes()
    lines.append(
        f"weights: {_mib(held)} MiB held, {_mib(built)} MiB as built "
        f"(frozen_dtype={cfg.frozen_dtype})"
    )
    copies = sum(t.numel() * t.element_size() for t in handle.structure.cast_originals.values())
    if copies:
        lines.append(
            f"  plus {_mib(copies)} MiB of exact copies of those weights in host (CPU) memory, "
            "for remove(), state_dict and adapters: on a GPU the device holds the saving; a "
            "run on the CPU keeps both"
        )
    return "\n".join(lines)


def calibration_line(engine: SavedTensorEngine, show: int = 3) -> str:
    """One line on calibration: how many modules it widened, the worst errors it measured."""
    wide = engine.module_bits
    if not engine.calibrated and wide:
        return (
            f"calibration: {len(wide)} modules at {WIDE_BITS} bits or exact, restored from a "
            "checkpoint measured under other code settings, in use until measured again "
            "(calibrate=True: on the first training batch)"
        )
    if not engine.calibrated:
        return (
            "calibration: not run yet (S2ACallback runs it on the first training batch unless "
            "a checkpoint restored holds it; without Lightning, call handle.calibrate(loss_fn))"
        )
    errors = engine.calibration
    worst = sorted(wide, key=lambda n: -errors.get(n, 0.0))[:show]
    named = ", ".join(f"{n or '(model)'} {100 * errors.get(n, 0.0):.1f}%" for n in worst)
    exact = sum(b > WIDE_BITS for b in wide.values())
    return (
        f"calibration: {len(wide)} of {len(errors)} modules widened to "
        f"{min((b for b in wide.values() if b <= WIDE_BITS), default=WIDE_BITS)} bits (local "
        "gradient error "
        "above tolerance)"
        + (f", {exact} of them kept exact ({WIDE_BITS} bits not enough)" if exact else "")
        + (f": {named}" + (", ..." if len(wide) > show else "") if wide else "")
    )
