"""``side_merge="add"``: the side network's output added to the trained head's (classic
side-tuning), or to the model's own features without a head; against the frozen model and
the ``"replace"`` side built with the same weights."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_s2a import S2AConfig, apply_s2a
from tests.conftest import adapter_round_trip, assert_close_in_norm
from tests.test_structure import SIZE, SMALL

HEADS = {"vit": "head", "resnet": "fc", "effnet": "classifier"}


def _side_last(model) -> torch.nn.Linear:
    """The side network's last Linear (its output layer), pooled or hierarchical."""
    return [m for m in model.s2a_side.modules() if isinstance(m, torch.nn.Linear)][-1]


def _pair(family: str, side: str, head: bool, **fields):
    """The frozen model, and two copies with the same side weights: merge 'add', 'replace'."""
    torch.manual_seed(0)
    frozen = SMALL[family]().double().eval()
    if not head:
        frozen.reset_classifier(0)
    cfg = S2AConfig(modules=["side"], side=side, input_size=SIZE, **fields)
    models = {}
    for merge in ("add", "replace"):
        model = copy.deepcopy(frozen)
        torch.manual_seed(1)
        models[merge] = (model, apply_s2a(model, cfg.replace(side_merge=merge)))
    return frozen, models


@pytest.mark.parametrize(
    "family, side, head",
    [
        ("vit", "pooled", True),
        ("resnet", "hierarchical", True),
        ("effnet", "pooled", False),
    ],
    ids=["vit-pooled", "resnet-hierarchical", "effnet-pooled-no-head"],
)
def test_the_output_is_the_frozen_models_plus_the_sides(family, side, head):
    frozen, models = _pair(family, side, head, compress=False)
    (added, _), (replaced, _) = models["add"], models["replace"]
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        base = frozen(x)
        assert_close_in_norm(added(x), base + replaced(x), rel=1e-12)
        _side_last(added).weight.zero_()
        _side_last(added).bias.zero_()
        assert_close_in_norm(added(x), base, rel=1e-12)  # a zero side leaves the frozen model


@pytest.mark.parametrize("family", ["vit", "effnet"])
def test_the_head_trains_on_the_backbones_features_and_only_its_input_is_stored(family):
    _, models = _pair(family, "pooled", True)  # compressed at 4 bits
    model, handle = models["add"]
    model.train()
    head = model.get_submodule(HEADS[family])
    features = []
    head.register_forward_hook(lambda m, args, out: features.append(args[0].detach()))
    x, y = torch.randn(2, *SIZE, dtype=torch.float64), torch.tensor([1, 2])
    out = model(x)
    assert torch.is_grad_enabled()  # the backbone's no-grad region closed again
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    # the head's gradient is the linear probe's: dL/dW = g^T f, dL/db = sum g
    g, f = out.grad, features[0]
    assert_close_in_norm(head.weight.grad, g.T @ f, rel=1e-12)
    assert_close_in_norm(head.bias.grad, g.sum(0), rel=1e-12)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{HEADS[family]}.weight", f"{HEADS[family]}.bias"} | {
        f"s2a_side.{n}" for n, _ in model.s2a_side.named_parameters()
    }
    # the backbone stores nothing; the head keeps its input (exact: trainable_input_bits)
    parts = handle.stats()["by_part"]
    assert set(parts) == {"side", "head"}
    assert parts["head"]["stored_bytes"] == f.numel() * f.element_size()
    assert "added to the trained head's output" in handle.summary()


class _LogSoftmaxHead(nn.Module):
    """A user's model that works on its head's output: log-probabilities, scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.GELU()) for c in (3, 16, 16)]
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3))).log_softmax(-1) * 0.5


@pytest.mark.parametrize("merge", ["replace", "add"])
def test_what_the_model_does_after_its_head_has_the_sides_gradient(merge):
    torch.manual_seed(0)
    model, x = _LogSoftmaxHead().double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    cfg = S2AConfig(
        modules=["side"], head="head", blocks="blocks.*", input_size=(3, 16, 16), side_merge=merge
    )
    with apply_s2a(model, cfg, compress=False) as handle:
        out = model(x)
        assert out.requires_grad
        F.nll_loss(out, torch.tensor([1, 2])).backward()
        side = _side_last(model)
        assert side.weight.grad is not None and side.weight.grad.abs().sum() > 0
        if merge == "add":
            assert model.head.weight.grad.abs().sum() > 0
        # the blocks stored nothing; on the model's own frame ('backbone') only log_softmax's
        # output was saved (the scale by a number saves nothing)
        parts = handle.stats()["by_part"]
        assert set(parts) == {"side", "backbone"} | ({"head"} if merge == "add" else set())
        assert parts["backbone"]["stored_bytes"] == out.numel() * out.element_size()


@pytest.mark.parametrize("merge", ["replace", "add"])
def test_the_head_run_on_its_own_is_a_clear_error_that_leaves_autograd_on(merge):
    model = SMALL["resnet"]()
    with apply_s2a(model, modules="side", side_merge=merge, input_size=SIZE):
        features = torch.randn(2, model.num_features, 2, 2)
        with pytest.raises(RuntimeError, match=r"the head ran outside it.*model\(x\)"):
            model.forward_head(features)
        assert torch.is_grad_enabled()
        model(torch.randn(2, *SIZE)).sum().backward()  # the model itself still trains
        assert model.s2a_side.proj[0].weight.grad is not None


def test_replace_leaves_the_head_frozen_and_unused():
    _, models = _pair("vit", "pooled", True)
    model, handle = models["replace"]
    assert not any(p.requires_grad for p in model.head.parameters())
    model(torch.randn(2, *SIZE, dtype=torch.float64)).sum().backward()
    assert set(handle.stats()["by_part"]) == {"side"}
    assert "added to" not in handle.summary()


def test_without_a_head_the_features_stay_a_constant_and_the_side_trains():
    _, models = _pair("effnet", "pooled", False)
    model, handle = models["add"]
    model.train()
    model(torch.randn(2, *SIZE, dtype=torch.float64)).square().mean().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("s2a_side.") for n in trained)
    assert all(p.grad is not None for p in model.s2a_side.parameters())
    assert set(handle.stats()["by_part"]) == {"side"}
    assert "added to EfficientNet's output" in handle.summary()


def test_a_hierarchical_side_without_a_head_has_nothing_to_add_to():
    model = SMALL["resnet"]()
    model.reset_classifier(0)
    cfg = S2AConfig(
        modules=["side"], side="hierarchical", side_merge="add", head=None, input_size=SIZE
    )
    with pytest.raises(ValueError, match=r"no model output to add to.*side_merge='replace'"):
        apply_s2a(model, cfg)
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def test_a_trained_head_is_not_cast_to_the_frozen_dtype():
    model = SMALL["vit"]()
    with apply_s2a(model, modules="side", side_merge="add", frozen_dtype="bfloat16"):
        assert model.head.weight.dtype == torch.float32 and model.head.weight.requires_grad
        assert model.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    with apply_s2a(model, modules="side", frozen_dtype="bfloat16"):
        assert model.head.weight.dtype == torch.bfloat16  # unused: frozen and cast


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"modules": ["side"], "side_merge": "sum"}, r"side_merge: 'sum' is not one of"),
        ({"modules": ["bias"], "side_merge": "add"}, r"side_merge='add' acts only with the 'side"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        S2AConfig(**fields)


def test_adapter_round_trip_keeps_the_trained_head(tmp_path):
    cfg = S2AConfig(modules=["side"], side_merge="add", input_size=SIZE)
    model, fresh, x = adapter_round_trip(SMALL["resnet"], cfg, tmp_path, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh.fc.weight, model.fc.weight)  # the trained head travels
        assert torch.equal(fresh(x), model(x))


class _BatchNormHead(nn.Module):
    """A user's model whose head normalizes its pooled features first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        )
        self.head = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("merge", ["replace", "add"])
def test_a_replaced_heads_batch_norm_is_held_and_a_trained_heads_trains(merge):
    """The head a 'replace' side stands in for trains not, but still runs in every training
    forward: its BatchNorm's statistics moved (after remove() the model's output was 0.5
    off at a scale of 0.6). Held now, as the backbone's; a head that trains ('add') keeps
    its BatchNorm training, as without S2A."""
    torch.manual_seed(0)
    model = _BatchNormHead()
    before = model.head[0].running_mean.clone()
    handle = apply_s2a(
        model, S2AConfig(modules=["side"], side_merge=merge, head="head", input_size=(3, 16, 16))
    )
    model.train()
    model(torch.randn(8, 3, 16, 16) + 2.0).sum().backward()
    held = any(bn is model.head[0] for bn in handle.held_batch_norms())
    moved = not torch.equal(model.head[0].running_mean, before)
    assert (held, moved) == ((True, False) if merge == "replace" else (False, True))
    handle.remove()


@pytest.mark.parametrize("merge", ["replace", "add"])
def test_an_input_that_needs_a_gradient_is_refused_by_the_side(merge):
    """The side runs the backbone without autograd: a generator trained through it (a GAN's
    discriminator) got no gradient at all, silently (x.grad None every step)."""
    torch.manual_seed(0)
    model = SMALL["resnet"]()
    handle = apply_s2a(model, S2AConfig(modules=["side"], side_merge=merge, input_size=SIZE))
    x = torch.randn(2, *SIZE, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"no gradient reaches its input.*modules=\['bias'\]"):
        model(x)
    assert torch.is_grad_enabled()  # the refused call left autograd on
    model(x.detach()).sum().backward()  # detached (or under no_grad) it runs
    with torch.no_grad():
        model(x)
    handle.remove()


@pytest.mark.parametrize("merge", ["replace", "add"])
def test_a_head_whose_output_is_no_row_per_image_is_refused(merge):
    """A per-token head (a ViT without pooling: (B, N, classes)) was replaced by the side's
    (B, classes), silently; added to, it failed inside torch's broadcasting."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=5, depth=2, img_size=32, patch_size=8, global_pool=""
    )
    handle = apply_s2a(model, S2AConfig(modules=["side"], side_merge=merge))
    with pytest.raises(
        RuntimeError, match=r"output of shape \(2, 17, 5\) with one of shape \(2, 5\)"
    ):
        model(torch.randn(2, 3, 32, 32))
    handle.remove()


class _LogProbs(nn.Module):
    """A user's model whose head ends in LogSoftmax (trained with NLL), or, ``by_weight``,
    runs its last Linear through ``F.linear`` with the layer's weight."""

    def __init__(self, by_weight: bool = False) -> None:
        super().__init__()
        self.encoder = SMALL["resnet"]()
        self.encoder.reset_classifier(0)
        self.classifier = nn.Sequential(nn.Linear(self.encoder.num_features, 4), nn.LogSoftmax(1))
        self.by_weight = by_weight

    def forward(self, x):
        h = self.encoder(x)
        if self.by_weight:
            fc = self.classifier[0]
            return F.linear(h, fc.weight, fc.bias).log_softmax(1)
        return self.classifier(h)


@pytest.mark.parametrize("merge", ["replace", "add"])
def test_what_the_head_does_after_its_last_linear_applies_to_the_sides_output(merge):
    """The side's output replaced the whole head's, dropping its LogSoftmax: an NLL loss on
    raw scores ran to -25 in ten steps, then NaN, silently."""
    torch.manual_seed(0)
    model = _LogProbs().double()
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    cfg = S2AConfig(modules=["side"], head="classifier", side_merge=merge, input_size=SIZE)
    with apply_s2a(model, cfg) as handle:
        out = model(x)
        assert "at the head's last Linear (0; the layers after it follow)" in handle.summary()
        # log-probabilities, whose gradient reaches the side network
        assert torch.allclose(out.logsumexp(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
        F.nll_loss(out, torch.tensor([0, 1, 2])).backward()
        assert _side_last(model).weight.grad.abs().sum() > 0
    model.by_weight = True
    with apply_s2a(model, cfg), pytest.raises(RuntimeError, match="did not run as a module"):
        model(x)


class _TokenMean(nn.Module):
    def forward(self, h):
        return h.mean(1)


class _PerToken(nn.Module):
    """A head that classifies each token, then averages: its last Linear's output is no
    (batch, classes) row, so the side stands in for the whole head's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = SMALL["vit"]()
        self.encoder.reset_classifier(0)
        self.encoder.global_pool = ""
        self.classifier = nn.Sequential(nn.Linear(self.encoder.num_features, 4), _TokenMean())

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_a_head_that_pools_after_its_last_linear_is_replaced_whole():
    torch.manual_seed(0)
    model = _PerToken()
    cfg = S2AConfig(modules=["side"], head="classifier", input_size=SIZE)
    with apply_s2a(model, cfg):
        assert model(torch.randn(2, *SIZE)).shape == (2, 4)


class _TwoHeads(nn.Module):
    """CrossViT's layout: a ModuleList of heads, each called on its own branch."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x).mean(1)
        return (self.head[0](h) + self.head[1](h)) / 2

    def get_classifier(self) -> nn.Module:
        return self.head


def test_a_side_for_a_list_of_heads_names_its_members():
    """The side's hook on a ModuleList never ran: the first forward failed, blaming F.linear
    or an early return. Said at apply, with the members to name (which works). The blocks
    are found outside the head (its two Linears were taken for blocks too)."""
    model = _TwoHeads()
    with pytest.raises(ValueError, match=r"an ModuleList.*S2AConfig\(head='head\.0,head\.1'\)"):
        apply_s2a(model, S2AConfig(modules=["side"], input_size=(5, 8)))
    assert not any("s2a" in n for n, _ in model.named_modules())
    model = _TwoHeads()
    apply_s2a(
        model,
        S2AConfig(modules=["side"], head="head.0,head.1", blocks="blocks.*", input_size=(5, 8)),
    )
    assert model(torch.randn(2, 5, 8)).shape == (2, 2)
