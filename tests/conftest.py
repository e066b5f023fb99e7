"""Shared helpers: seeded gradients of the trainable parameters, and cosine similarity."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


def assert_close_in_norm(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, msg: str = ""
) -> None:
    """``‖actual − expected‖ ≤ rel · ‖expected‖``: a tolerance scaled to the tensor's norm.

    Element-wise ``rtol``/``atol`` fail on whichever element another reduction order (another
    CPU model, thread count or kernel) happens to move most, typically one near zero after
    cancellation; the norm of the difference does not depend on which elements moved. Exactness
    is checked in float64 with a tiny ``rel``: paths that agree to rounding differ there by
    ~1e-15, while a real bug (a wrong eps, a lost term) moves the result by far more.
    """
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (msg, actual.dtype, expected.dtype)
    a, e = actual.detach().double(), expected.detach().double()
    err, scale = (a - e).norm().item(), e.norm().item()
    assert err <= rel * scale, f"{msg}: ‖a − e‖ = {err:.3g} > {rel:g} · ‖e‖ = {rel * scale:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def adapter_round_trip(factory, config, tmp_path, size):
    """Apply ``config`` to ``factory()``, move every trainable parameter off its initial
    value, save an adapter and load it into a fresh ``factory()`` built with the same seed.
    Returns ``(model, fresh, x)``: both should give the same outputs on ``x``."""
    from lightning_s2a import apply_s2a, load_adapter, save_adapter

    torch.manual_seed(0)
    model = factory().eval()
    apply_s2a(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = factory().eval()
    load_adapter(fresh, tmp_path / "a.safetensors")
    return model, fresh, torch.randn(2, *size)
