"""Shared helpers: seeded gradients of the trainable parameters, and cosine similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def trainable_grads(model, x, y, seed: int = 1, exclude_head: bool = False) -> torch.Tensor:
    """Flattened gradients of the trainable parameters after one seeded cross-entropy step.

    Reseeding before the forward makes stochastic layers (timm's drop-path) identical across
    the runs being compared.
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    head = set()
    if exclude_head and hasattr(model, "get_classifier"):
        head = {id(p) for p in model.get_classifier().parameters()}
    return torch.cat(
        [p.grad.reshape(-1) for p in model.parameters() if p.requires_grad and id(p) not in head]
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
