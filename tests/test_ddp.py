"""DDP with 2 CPU processes (gloo): the s2a_ddp strategy, and plain DDP with the callback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_fit.py")


def _run(mode, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, SCRIPT, mode, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(SCRIPT)),
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("mode", ["strategy", "callback"])
def test_ddp_two_processes(mode, tmp_path):
    _run(mode, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["ddp_type"] == "DistributedDataParallel" for r in ranks)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were synchronised
    initial = ranks[0]["initial"]
    changed = {k for k in initial if not torch.equal(initial[k], a[k])}
    assert changed and all(k.endswith("bias") or k.startswith("backbone.head.") for k in changed)
    # only the trainable S2A parameters take part in DDP's gradient sync
    assert 0 < ranks[0]["synced_numel"] < 0.1 * ranks[0]["total_numel"]


def test_ddp_fork_with_s2a_applied_before_copies_back_the_trained_prompts(tmp_path):
    """ddp_fork trains copies of the model; with S2A applied in the main process first (as
    the callback's refusal says), Lightning's copy-back gives the main process's model the
    prompts rank 0 trained, not the zeros it started with."""
    _run("fork", tmp_path)
    saved = torch.load(tmp_path / "main.pt", weights_only=False)
    main, applied = saved["state"], saved["applied"]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)["state"]
    prompts = [k for k in rank0 if "s2a_prompt" in k]
    assert prompts and set(main) == set(rank0) == set(applied)
    assert all(not torch.equal(applied[k], rank0[k]) for k in prompts)  # they trained
    assert all(torch.equal(main[k], rank0[k]) for k in rank0)
