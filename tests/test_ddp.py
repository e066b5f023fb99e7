"""DDP with 2 CPU processes (gloo): the s2a_ddp strategy, and plain DDP with the callback."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a

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
    if mode == "callback":
        # Rank 1 measured no step (its backbone ran whole inside a checkpoint): the epoch's
        # bytes are summed over the ranks, not averaged with its NaN (logged NaN before).
        logged = [r["logged"] for r in ranks]
        keys = ("s2a/activation_raw_mb", "s2a/activation_stored_mb", "s2a/compression")
        assert all(logged[0][k] == logged[1][k] for k in keys)
        raw, stored, compression = (logged[0][k] for k in keys)
        assert raw > stored > 0 and compression == pytest.approx(raw / stored, rel=1e-6)
        # the peak is the most loaded rank's, not the ranks' mean
        peaks = [r["epoch_metrics"]["s2a/peak_memory_mb"] for r in ranks]
        assert logged[0]["s2a/peak_memory_mb"] == pytest.approx(max(peaks), rel=1e-6)


def test_ddp_calibration_decides_on_every_ranks_share(tmp_path):
    """Each rank measures its own share of the first batch; every rank widens by each
    module's largest error over the ranks. Deciding on rank 0's share alone (broadcast to the
    others) missed what only rank 1's share put above the tolerance, and rank 1 reported its
    own errors beside rank 0's widths."""
    _run("calibrate", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    first = [r["local"][0] for r in ranks]  # each rank's first measurement, its own share
    assert set(first[0]) == set(first[1]) and first[0] != first[1]
    largest = {n: max(first[0][n], first[1][n]) for n in first[0]}
    assert ranks[0]["decided"] == ranks[1]["decided"] == largest
    assert ranks[0]["module_bits"] == ranks[1]["module_bits"]
    assert {n for n, e in largest.items() if e > 0.03} <= set(ranks[0]["module_bits"])
    assert all(len(r["local"]) == 2 for r in ranks)  # both measured twice, in step
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])


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


class _Whole(pl.LightningModule):
    """The whole-module layout (no backbone attribute), with a loss term of its own outside
    the model: tanh saves its output for backward in training_step."""

    def __init__(self):
        super().__init__()
        self.encoder = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
        )
        self.classifier = nn.Linear(192, 4)

    def forward(self, x):
        return self.classifier(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        t = torch.tanh(logits.repeat(1, 1024))  # large enough to be coded if it were seen
        self.loss_term_exact = torch.equal(t.grad_fn._saved_result, t)
        return F.cross_entropy(logits, y) + t.pow(2).mean()


class _Wrapper(nn.Module):
    """What DDP does with its module in forward: calls it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("modules", [["bias"], ["side"]])
def test_lightnings_ddp_redirection_is_no_forward_of_the_model(modules):
    """Under DDP, Lightning runs training_step through the module's own call (its forward
    patched on the instance), so S2A's hooks on the module saw the whole step as a forward:
    the step's own loss terms were coded and counted, and 'side' turned autograd off for the
    whole step ("element 0 of tensors does not require grad"). Only the real forward counts:
    gradients and bytes as when training_step is called directly."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g))

    def run(redirect):
        torch.manual_seed(0)
        model = _Whole()
        handle = apply_s2a(model, S2AConfig(modules=modules, head="classifier"))
        if redirect:
            loss = _ForwardRedirection()(_Wrapper(model), model, "training_step", batch, 0)
        else:
            loss = model.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return model, handle, grads

    direct, direct_handle, expected = run(False)
    model, handle, grads = run(True)
    assert expected and any("s2a_side" in n for n in expected) == (modules == ["side"])
    assert direct.loss_term_exact and model.loss_term_exact
    assert set(grads) == set(expected)
    assert all(torch.equal(grads[n], expected[n]) for n in expected)
    assert handle.engine.forwards == direct_handle.engine.forwards == 1
    assert handle.stats() == direct_handle.stats()
