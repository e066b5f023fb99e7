"""What a step's other modules save (a head of the user's own beside the S2A'd encoder) is
counted in the step's bytes, kept as it is (engine/outside.py).

Until 2026-12-07 the ``s2a/activation_*`` metrics left such a head out: a reviewer's MLP
head kept 3x the logged bytes.
"""

from __future__ import annotations

import gc
import signal
import weakref

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_s2a import S2ACallback, S2AConfig, apply_s2a
from lightning_s2a.engine.outside import OUTSIDE, OutsideModules
from tests.lightning_helpers import _data, quiet_trainer

WIDTH, HIDDEN, BATCH = 64, 48, 8


def _encoder() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, depth=2, img_size=32, patch_size=8
    )


class MLPHead(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(h)))


def _head_bytes(width: int, batch: int = BATCH) -> int:
    """What the head saves, counted by hand: fc1's input (batch, width), GELU's input and
    fc2's input (batch, HIDDEN) each, in fp32; its weights are parameters, not counted."""
    return 4 * batch * (width + 2 * HIDDEN)


class TwoPartModule(pl.LightningModule):
    """A user's layout: an encoder and an MLP classifier beside it, own optimizer; the step
    calls its parts, or ``self(x)`` (the encoder then runs inside the counted forward)."""

    def __init__(self, through_forward: bool = False) -> None:
        super().__init__()
        self.through_forward = through_forward
        self.encoder = _encoder()
        self.classifier = MLPHead(self.encoder.num_features)

    def forward(self, x):
        return self.classifier(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.through_forward:
            return F.cross_entropy(self(x), y)
        return F.cross_entropy(self.classifier(self.encoder(x)), y)

    def configure_optimizers(self):
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=1e-3)


def _counting_hooks(module: nn.Module) -> int:
    return sum(
        isinstance(getattr(hook, "__self__", None), OutsideModules)
        for m in module.modules()
        for hook in m._forward_pre_hooks.values()
    )


@pytest.mark.parametrize(
    ("compress", "through_forward"), [(True, False), (True, True), (False, True)]
)
def test_metrics_count_the_head_outside_the_backbone(compress, through_forward):
    pl.seed_everything(0)
    model = TwoPartModule(through_forward)
    callback = S2ACallback(S2AConfig(compress=compress), backbone="encoder")
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, _data(16))
    parts = callback.handle.stats()["by_part"]
    width = model.encoder.num_features
    outside = _head_bytes(width)
    # kept as it is, the head's input x[:, 0] holds all 17 tokens' storage (compressed runs
    # copy such a small view; counted at its own bytes until 2026-12-07)
    held = outside if compress else 4 * BATCH * (17 * width + 2 * HIDDEN)
    assert parts[OUTSIDE] == {"raw_bytes": outside, "stored_bytes": held, "tensors": 3}
    backbone = parts["backbone"]
    metrics = callback.epoch_metrics
    assert metrics["s2a/activation_raw_mb"] * 2**20 == backbone["raw_bytes"] + outside
    assert metrics["s2a/activation_stored_mb"] * 2**20 == backbone["stored_bytes"] + held
    if compress:  # the encoder's codes are the engine's still, under the counting hooks
        assert backbone["stored_bytes"] * 3 < backbone["raw_bytes"]
    row = next(r for r in callback.handle.summary().splitlines() if r.startswith("outside"))
    assert f"{outside / 2**20:.2f}" in row  # the summary's rows add up to its total again
    assert _counting_hooks(model) == 0  # off after fit
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    encoder, head = _encoder(), MLPHead(192)
    whole = nn.ModuleDict({"encoder": encoder, "head": head})
    handle = apply_s2a(encoder, S2AConfig(head=None))
    head.requires_grad_(True)
    return whole, handle


def _step(whole: nn.ModuleDict, handle, x: torch.Tensor, passes: int = 1) -> list[torch.Tensor]:
    handle.engine.begin_step()
    for i in range(passes):
        h = whole["encoder"](x)
        out = whole["head"](h) if i == 0 else h  # the head in the first pass only
        out.square().mean().backward()
    return [p.grad.clone() for p in whole.parameters() if p.requires_grad]


def test_counting_changes_no_gradient_and_no_code():
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole, handle = _parts()
    plain = _step(whole, handle, x)
    plain_parts = handle.stats()["by_part"]
    whole, handle = _parts()
    counting = handle.count_outside(whole)
    counted = _step(whole, handle, x)
    counting.remove()
    assert len(plain) == len(counted) > 4
    for a, b in zip(plain, counted, strict=True):
        assert torch.equal(a, b)
    parts = handle.stats()["by_part"]
    assert parts["backbone"] == plain_parts["backbone"]
    assert OUTSIDE not in plain_parts and parts[OUTSIDE]["raw_bytes"] == _head_bytes(192)


def test_the_step_peak_keeps_the_head_of_an_earlier_backward():
    # Two backwards in one step (manual optimization): the first pass ran the head, the
    # second did not. The step keeps at most the first pass's tensors, head included.
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole, handle = _parts()
    counting = handle.count_outside(whole)
    _step(whole, handle, x, passes=2)
    counting.remove()
    peak, last = handle.engine.step_stats(), handle.stats()
    assert OUTSIDE not in last["by_part"]
    assert peak["by_part"][OUTSIDE]["raw_bytes"] == _head_bytes(192)
    assert peak["raw_bytes"] == last["raw_bytes"] + _head_bytes(192)


def test_a_tensor_changed_in_place_after_its_save_raises_as_in_pytorch():
    # Kept as it is, a saved tensor's version is checked at unpack: returned bare from the
    # hooks, PyTorch's check is gone and backward read the changed values silently.
    class InPlaceHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(192, 4)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            s = torch.sigmoid(self.fc(h))  # saves its output
            out = s * 2
            s.add_(1)  # changed after its save
            return out

    torch.manual_seed(0)
    encoder, head = _encoder(), InPlaceHead()
    whole = nn.ModuleDict({"encoder": encoder, "head": head})
    handle = apply_s2a(encoder, S2AConfig(head=None))
    counting = handle.count_outside(whole)
    handle.engine.begin_step()
    out = head(encoder(torch.randn(2, 3, 32, 32)))
    with pytest.raises(RuntimeError, match="inplace operation"):
        out.sum().backward()
    counting.remove()


def test_a_second_s2a_model_in_the_scope_keeps_its_own_codes():
    torch.manual_seed(0)
    first, second, head = _encoder(), _encoder(), MLPHead(2 * 192)
    whole = nn.ModuleDict({"first": first, "second": second, "head": head})
    handle = apply_s2a(first, S2AConfig(head=None))
    other = apply_s2a(second, S2AConfig(head=None))
    counting = handle.count_outside(whole)
    assert counting.modules == len(list(head.modules())) + 1  # the head's and the dict's
    handle.engine.begin_step()
    x = torch.randn(BATCH, 3, 32, 32)
    whole["head"](torch.cat([first(x), second(x)], dim=1)).sum().backward()
    counting.remove()
    theirs = other.stats()
    assert theirs["raw_bytes"] > 0 and theirs["stored_bytes"] * 3 < theirs["raw_bytes"]
    assert handle.stats()["by_part"][OUTSIDE]["raw_bytes"] == _head_bytes(2 * 192)


def test_an_error_in_the_head_leaves_no_hooks_installed():
    class FailingHead(MLPHead):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            self.act(self.fc1(h))
            raise ValueError("user error in the head")

    torch.manual_seed(0)
    encoder, head = _encoder(), FailingHead(192)
    whole = nn.ModuleDict({"encoder": encoder, "head": head})
    handle = apply_s2a(encoder, S2AConfig(head=None))
    counting = handle.count_outside(whole)
    with pytest.raises(ValueError, match="user error"):
        head(encoder(torch.randn(2, 3, 32, 32)))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    counting.remove()
    assert _counting_hooks(whole) == 0


def test_a_graph_dropped_without_backward_frees_what_was_kept():
    # Kept with the bare tensor, an op's saved output made a cycle through its autograd node
    # that Python's collector cannot see: a skipped batch's head outputs stayed alive for
    # good (and the engine's own with compress=False).
    whole, handle = _parts()
    counting = handle.count_outside(whole)
    handle.engine.begin_step()
    h = whole["encoder"](torch.randn(2, 3, 32, 32))
    refs = []
    for _ in range(3):
        out = torch.sigmoid(whole["head"].fc1(h))  # saves its output
        whole["head"].act(out)  # a counted module's call: GELU saves its input
        refs.append(weakref.ref(out))
        del out
    gc.collect()
    assert [r() for r in refs] == [None] * 3
    counting.remove()
    handle.remove()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    with apply_s2a(plain, S2AConfig(head="2", compress=False)):
        ref = weakref.ref(plain[1](plain[0](torch.randn(4, 8))))
        gc.collect()
        assert ref() is None


def test_a_slice_the_head_saves_keeps_no_other_token_alive():
    # timm's pooling x[:, 0] saved by the head's first Linear kept the whole (B, N, D)
    # output alive (17x the slice at 32 px), counted as the slice: kept as a copy now.
    whole, handle = _parts()
    counting = handle.count_outside(whole)
    handle.engine.begin_step()
    tokens = whole["encoder"].forward_features(torch.randn(BATCH, 3, 32, 32))
    assert tokens.shape[1] > 1
    every = StorageWeakRef(tokens.untyped_storage())
    out = whole["head"](tokens[:, 0])
    del tokens
    gc.collect()
    assert every.expired()
    assert handle.stats()["by_part"][OUTSIDE]["stored_bytes"] == _head_bytes(192)
    out.sum().backward()
    counting.remove()


def test_an_interrupted_fit_leaves_no_counting_hooks(tmp_path):
    # A KeyboardInterrupt inside the encoder, run from the module's forward: the engine's
    # hooks sat above the counting ones, which teardown left installed for good (a later,
    # unrelated model's saved tensors were then counted into this engine).
    class Interrupted(TwoPartModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                self.encoder.blocks[0].register_forward_hook(_interrupt)
            return super().training_step(batch, batch_idx)

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl+C while it shuts down
    try:
        with pytest.raises(SystemExit):
            quiet_trainer(max_epochs=1, callbacks=[S2ACallback(backbone="encoder")]).fit(
                Interrupted(through_forward=True), _data(16)
            )
    finally:
        signal.signal(signal.SIGINT, handler)
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _interrupt(*args):
    raise KeyboardInterrupt


class FuncHead(MLPHead):
    """A head whose forward runs torch.func (a gradient penalty on its input)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = super().forward(h)
        grad = torch.func.grad(lambda z: super(FuncHead, self).forward(z).sum())(h.detach())
        return out + 0 * grad.sum()


def test_torch_func_in_a_counted_head_names_the_switch():
    whole, handle = _parts()
    head = FuncHead(192)
    whole["head"] = head
    counting = handle.count_outside(whole)
    handle.engine.begin_step()
    h = whole["encoder"](torch.randn(2, 3, 32, 32))
    with (
        pytest.warns(UserWarning, match=r"count_outside=False"),
        pytest.raises(RuntimeError, match="saved tensor hooks"),
    ):
        head(h)
    counting.remove()
    pl.seed_everything(0)
    model = TwoPartModule()
    model.classifier = FuncHead(model.encoder.num_features)
    callback = S2ACallback(backbone="encoder", count_outside=False)
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, _data(16))
    assert OUTSIDE not in callback.handle.stats()["by_part"]


def test_a_dropout_raised_after_counting_began_is_counted():
    """The step's own p=0 dropout, raised after the counting hooks went on and called from
    the step's body: its mask counted (the first version left p=0 dropouts unhooked outside
    the model as inside, and the mask, with no counted parent, went uncounted)."""
    whole, handle = _parts()
    drop = nn.Dropout(0.0)
    whole["drop"] = drop
    counting = handle.count_outside(whole)
    drop.p = 0.5
    handle.engine.begin_step()
    feats = whole["encoder"](torch.randn(BATCH, 3, 32, 32))
    out = whole["head"](drop(feats))
    outside = handle.stats()["by_part"][OUTSIDE]
    # the head's saves and the dropout's noise (on CPU a float32 tensor, kept as it is)
    assert outside["stored_bytes"] == _head_bytes(192) + 4 * BATCH * 192
    out.sum().backward()
    counting.remove()


def test_a_copied_part_of_the_s2a_model_beside_it_is_counted():
    """A copy of one of the S2A'd model's blocks (made after apply_s2a, trained beside it)
    carries an inert engine that knows no model: counting took it for an S2A'd model, and
    every counted forward failed reading parameters it never collected."""
    import copy

    whole, handle = _parts()
    whole["extra"] = copy.deepcopy(whole["encoder"].blocks[1])
    whole["extra"].requires_grad_(True)
    counting = handle.count_outside(whole)
    handle.engine.begin_step()
    tokens = whole["extra"](whole["encoder"].forward_features(torch.randn(BATCH, 3, 32, 32)))
    out = whole["head"](tokens[:, 0])
    # the copy's block saves (norms, attention, MLP) are counted beside the head's
    assert handle.stats()["by_part"][OUTSIDE]["stored_bytes"] > _head_bytes(192)
    out.sum().backward()
    counting.remove()
