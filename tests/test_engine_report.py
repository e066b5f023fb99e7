"""``examples/engine_report.py``: the step times it reports are steady-state steps."""

from __future__ import annotations

from tests.conftest import load_example

report = load_example("engine_report")


def test_timed_steps_fit_no_codebook():
    """S2A was applied per step, so every timed step fitted every GELU codebook (85% of a
    ViT-Ti step); once per model, past the fits at forwards 1, 2, 3 and 5, none is timed."""
    row = report.measure("vit_tiny_patch16_224", batch=1, steps=2, bits=4, device="cpu", warmup=5)
    assert row["timed_refits"] == 0
    assert row["by_kind"]["elementwise"]["tensors"] == 12  # the GELUs were coded
    assert 0 < row["stored_mib"] < row["raw_mib"]
    early = report.measure("vit_tiny_patch16_224", batch=1, steps=2, bits=4, device="cpu", warmup=1)
    # forwards 2, 3 and 5 refit: left out of the median (2 and 3 were timed, and counted by
    # codebook site, until 2026-12-07), forwards 4 and 6 timed
    assert early["timed_refits"] == 3
