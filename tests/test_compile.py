"""torch.compile with saved-activation compression: a clear error, never a crash inside Inductor.

Compiling is refused when ``compress=True`` however it is done: a ``torch.compile`` result
(or a model with a compiled part) given to ``apply_s2a``, a model compiled after
``apply_s2a``, or a compiled LightningModule given to ``Trainer.fit``. With
``compress=False`` compiling is left alone.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_s2a import S2ACallback, S2AConfig, apply_s2a
from lightning_s2a.engine.compile_guard import S2ACompileError
from tests.lightning_helpers import UserModule, quiet_trainer

FIX = r"compress=False"


def _vit() -> nn.Module:
    # Small, but its compiled backward crashed inside Inductor before the guard existed.
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=4, depth=2, img_size=32, patch_size=8
    )


def _step(model, x, y) -> None:
    F.cross_entropy(model(x), y).backward()


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 3])


def _compile_model(model):
    return torch.compile(model)


def _compile_in_place(model):
    model.compile()
    return model


def _compile_forward(model):
    model.forward = torch.compile(model.forward)
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "compile_",
    [_compile_model, _compile_in_place, _compile_forward],
    ids=["torch.compile", "module.compile", "forward"],
)
def test_compiling_after_apply_s2a_is_a_clear_error(compile_):
    torch.manual_seed(0)
    model = _vit()
    handle = apply_s2a(model, S2AConfig())
    compiled = compile_(model)
    x, y = _batch()
    with pytest.raises(S2ACompileError, match=FIX):
        _step(compiled, x, y)
    # Nothing is left half-installed: the uncompiled model still trains, compressed.
    handle.remove()
    torch._dynamo.reset()
    model = _vit()
    with apply_s2a(model, S2AConfig()) as handle:
        _step(model, x, y)
        assert handle.stats()["ratio"] < 0.5


def test_a_compiled_train_step_is_a_clear_error():
    model = _vit()
    apply_s2a(model, S2AConfig())

    @torch.compile
    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(S2ACompileError, match=FIX):
        train_step(*_batch())


@pytest.mark.parametrize(
    "compile_",
    [
        _compile_model,
        _compile_in_place,
        _compile_forward,
        lambda m: setattr(m, "blocks", torch.compile(m.blocks)) or m,
        lambda m: m.blocks[1].compile() or m,
    ],
    ids=["torch.compile", "module.compile", "forward", "submodule", "submodule.compile"],
)
def test_a_compiled_model_given_to_apply_s2a_is_a_clear_error(compile_):
    model = compile_(_vit())
    with pytest.raises(S2ACompileError, match=FIX):
        apply_s2a(model, S2AConfig())


def test_lightning_fit_of_a_compiled_module_is_a_clear_error(tmp_path):
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_steps=1,
        default_root_dir=tmp_path,
        callbacks=[S2ACallback(S2AConfig(modules=("bias",)))],
    )
    with pytest.raises(S2ACompileError, match=FIX):
        trainer.fit(torch.compile(UserModule()), DataLoader(TensorDataset(*_batch()), batch_size=2))


def test_a_compile_wrapper_is_refused_even_without_compression(tmp_path):
    # With compress=False (what the compile error advises) the wrapper's hooks made Dynamo
    # fail in the first forward: "UnspecializedNNModuleVariable(...) is already tracked".
    with pytest.raises(S2ACompileError, match=r"module\.compile\(\)"):
        apply_s2a(torch.compile(_vit()), S2AConfig(compress=False))

    class CompiledEncoder(UserModule):
        def __init__(self):
            super().__init__()
            self.backbone = torch.compile(self.backbone)

    trainer = quiet_trainer(
        max_steps=1,
        default_root_dir=tmp_path,
        callbacks=[S2ACallback(S2AConfig(compress=False))],
    )
    with pytest.raises(S2ACompileError, match=r"self\.encoder\.compile\(\)"):
        trainer.fit(CompiledEncoder(), DataLoader(TensorDataset(*_batch()), batch_size=2))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_compress_false_still_compiles_and_trains(arch):
    """A BatchNorm model failed to compile inside dynamo's guards (a tuple iterator in the
    operator recognition); ViT only was tested."""
    torch.manual_seed(0)
    model = _vit() if arch == "vit" else timm.create_model("resnet10t", num_classes=5)
    x, y = _batch()
    with apply_s2a(model, S2AConfig(compress=False)):
        _step(model, x, y)
        eager = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        _step(torch.compile(model, backend="aot_eager"), x, y)
        compiled = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _replace_block(model):
    block = model.blocks[1]
    model.blocks[1] = torch.compile(block)
    return lambda: model.blocks.__setitem__(1, block)


def _compile_block_in_place(model):
    block = model.blocks[1]
    block.compile()
    return lambda: block.__dict__.__setitem__("_compiled_call_impl", None)


@pytest.mark.parametrize("compile_", [_replace_block, _compile_block_in_place])
def test_the_same_model_compresses_again_once_uncompiled(compile_):
    """A part compiled after apply_s2a is refused at forward; the engine's state stays whole."""
    torch.manual_seed(0)
    model = _vit()
    handle = apply_s2a(model, S2AConfig())
    undo = compile_(model)
    x, y = _batch()
    with pytest.raises(S2ACompileError, match=FIX):
        _step(model, x, y)
    undo()
    forwards = handle.engine.forwards
    _step(model, x, y)
    assert handle.engine.forwards == forwards + 1
    assert handle.stats()["ratio"] < 0.5
    handle.remove()


def test_a_trained_model_exports_once_its_engine_is_stopped():
    """torch.export of a model whose engine is live is the compile error, which now names
    what to do for an export: stop the engine; then the exported program is eager's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    handle = apply_s2a(model, S2AConfig(head="2"))
    with pytest.raises(S2ACompileError, match=r"handle.stop_engine\(\)"):
        torch.export.export(model, (x,))
    handle.stop_engine()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))
    handle.remove()


@pytest.mark.parametrize("compress", [True, False])
def test_jit_trace_with_autograd_is_a_clear_error_and_traces_without(compress):
    """torch.jit.trace records a forward with autograd on: with the engine live it failed
    inside PyTorch (an internal assert on aten::view; a failed sanity check with
    compress=False) and left the forward open, so the next one warned of an interrupt."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialise the lazy head
    handle = apply_s2a(model, S2AConfig(head="3", compress=compress))
    with pytest.raises(S2ACompileError, match=r"torch\.no_grad\(\).*stop_engine"):
        torch.jit.trace(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no forward was left open
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    with torch.no_grad():  # the engine stays out: the trace is eager's forward
        traced = torch.jit.trace(model, x)
        assert torch.equal(traced(x), model(x))
    handle.remove()


def test_compiled_autograd_is_a_clear_error():
    """Compiled autograd traces the backward with the engine's unpack hooks in it: it failed
    with a false in-place error ('a saved tensor ... is at version 1; expected version 1')."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no compiled_autograd._enable")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
    apply_s2a(model, S2AConfig(head="3", min_numel=1))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with (
        pytest.raises(S2ACompileError, match="compiled autograd"),
        compiled_autograd._enable(torch.compile(backend="eager")),
    ):
        F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()  # eager again: trains
    assert model[0].bias.grad is not None
