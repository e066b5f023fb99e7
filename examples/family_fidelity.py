"""Gradient fidelity and compression of S2A bias-only at 4 bits on timm models, against the
uncompressed run: one row per model, in Markdown.

    uv run python examples/family_fidelity.py efficientvit_b0 tiny_vit_5m_224
    uv run python examples/family_fidelity.py --calibrate efficientvit_b0

Random init, eval mode (no dropout or drop-path), batch 2 at the model's own input size.
A zero-initialised head (sequencer2d) is re-drawn: with it no gradient reaches the backbone.
``--calibrate`` runs ``handle.calibrate`` first, on another random batch than the measured
one, and adds the number of modules it widened.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

from lightning_s2a import S2AConfig, apply_s2a


def _grads(model, x, y, backbone_only: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    head = {id(p) for p in model.get_classifier().parameters()} if backbone_only else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    return torch.cat([p.grad.reshape(-1) for p in params])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


def measure(name: str, calibrate: bool = False) -> str:
    """One table row: cosine over all trainable gradients, over the backbone's, compression
    (and with ``calibrate``, the modules widened of those that save tensors)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    for p in model.get_classifier().parameters():
        if p.dim() > 1 and not p.abs().max():
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    y = torch.randint(0, 10, (2,))
    x_other, y_other = torch.randn_like(x), torch.randint(0, 10, (2,))
    runs = {}
    widened = ""
    for compress in (False, True):
        with apply_s2a(model, S2AConfig(bits=4, compress=compress)) as handle:
            if calibrate and compress:
                errors = handle.calibrate(lambda: F.cross_entropy(model(x_other), y_other))
                widened = f" {len(handle.engine.module_bits)} of {len(errors)} |"
            runs[compress] = (_grads(model, x, y, False), _grads(model, x, y, True))
            stats = handle.stats()
    (exact, exact_bb), (approx, approx_bb) = runs[False], runs[True]
    return (
        f"| {name} | {_cosine(exact, approx):.4f} | {_cosine(exact_bb, approx_bb):.4f} | "
        f"{1 / stats['ratio']:.1f}x |{widened}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="timm model names")
    parser.add_argument("--calibrate", action="store_true", help="calibrate first")
    args = parser.parse_args()
    torch.set_num_threads(2)
    calibrated, names = args.calibrate, args.models
    print(
        "| model | gradient cosine | backbone cosine | compression |"
        + (" widened modules |" if calibrated else "")
    )
    print("|---|---:|---:|---:|" + ("---:|" if calibrated else ""))
    for model_name in names:
        print(measure(model_name, calibrated), flush=True)
