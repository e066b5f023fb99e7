"""Gradient fidelity against the uncompressed run, bias-only (biases + head train), 4 bits."""

from __future__ import annotations

import pytest
import timm
import torch

from lightning_s2a import S2AConfig, apply_s2a
from lightning_s2a.pretrained import efficientnet_lite0_imagenet
from tests.conftest import cosine, trainable_grads


def _compare(model, bits=4, batch=4, **cfg):
    model.train()
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 10, (batch,))
    with apply_s2a(model, S2AConfig(compress=False)):
        exact = trainable_grads(model, x, y)
        exact_backbone = trainable_grads(model, x, y, exclude_head=True)
    with apply_s2a(model, S2AConfig(bits=bits, **cfg)) as handle:
        approx = trainable_grads(model, x, y)
        approx_backbone = trainable_grads(model, x, y, exclude_head=True)
        stats = handle.stats()
    return cosine(exact, approx), cosine(exact_backbone, approx_backbone), stats


# (model factory, cosine over all trainable params, cosine over backbone biases only)
CASES = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 0.999, 0.999),
    "tf_efficientnet_lite0(imagenet)": (lambda: efficientnet_lite0_imagenet(10), 0.999, 0.99),
    "vit_small_patch16_224": (
        lambda: timm.create_model("vit_small_patch16_224", num_classes=10),
        0.998,
        0.996,
    ),
    "swin_tiny_patch4_window7_224": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10),
        0.998,
        0.998,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bias_only_gradients_match_uncompressed(name):
    factory, min_all, min_backbone = CASES[name]
    cos_all, cos_backbone, stats = _compare(factory())
    assert cos_all >= min_all, cos_all
    # The head's weight gradient is exact (its input is stored exact) and dominates the
    # norm, so the backbone biases are checked on their own as well.
    assert cos_backbone >= min_backbone, cos_backbone
    assert stats["stored_bytes"] < stats["raw_bytes"] / 4


def test_two_bits_is_worse_than_four_but_still_a_gradient():
    model = timm.create_model("vit_small_patch16_224", num_classes=10, depth=4)
    _, cos4, _ = _compare(model, bits=4)
    _, cos2, _ = _compare(model, bits=2)
    assert 0.9 < cos2 < cos4


def test_pretrained_lite0_weights_are_real():
    model = efficientnet_lite0_imagenet().eval()
    # A smooth synthetic image would be arbitrary; instead check the weights are not an init:
    # BatchNorm running statistics of a fresh timm model are exactly 0 and 1.
    bn = model.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    fresh = timm.create_model("tf_efficientnet_lite0")
    assert not torch.equal(model.conv_stem.weight, fresh.conv_stem.weight)


def test_family_fidelity_script_reports_a_measured_row():
    """``examples/family_fidelity.py`` (the per-family table in docs/benchmarks.md)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "family_fidelity.py"
    spec = importlib.util.spec_from_file_location("family_fidelity", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cells = [c.strip() for c in script.measure("resnet10t").strip("|").split("|")]
    assert cells[0] == "resnet10t"
    assert float(cells[1]) > 0.999 and float(cells[2]) > 0.99
    assert float(cells[3].rstrip("x")) > 4
