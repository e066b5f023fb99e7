"""The compared methods, one table: name -> how to prepare a model for training with it.

Each preparer freezes/wraps the model in place and returns a *meter*: a context manager
around one training forward whose ``saved_bytes()`` gives the bytes kept for backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..api import apply_s2a
from ..engine.accounting import SavedBytesCounter
from ..structure.families import find_blocks
from ..structure.head import find_head, head_modules


class CounterMeter:
    """Baselines: count the storages autograd keeps with a plain saved-tensor hook (nothing
    is changed). The hook's Python runs on every saved tensor: one step is counted, and not
    timed (timed with it, BitFit read 1.15x to 1.3x slower at 32 px)."""

    #: Counting costs time of its own: the bench counts one step and times the others.
    hooked = True

    def __init__(self, model: nn.Module) -> None:
        self.model, self.counter = model, None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.counter = SavedBytesCounter(self.model)
        with self.counter:
            yield

    def saved_bytes(self) -> int:
        # The storages kept alive: counted by views, a linear probe's saved x[:, 0] read as
        # 3 KB where it keeps the final norm's whole output (ViT-B: 40,000x less than full
        # fine-tuning instead of about 200x).
        return self.counter.storage_bytes if self.counter else 0


class HandleMeter:
    """S2A (and uncompressed BitFit through S2A's counting mode): the engine's own accounting."""

    #: The engine counts as it runs, every step: no hook of the bench's own.
    hooked = False

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        yield

    def saved_bytes(self) -> int:
        return self.handle.stats()["stored_bytes"]


def _full(model: nn.Module, bits: int) -> CounterMeter:
    for p in model.parameters():
        p.requires_grad_(True)
    return CounterMeter(model)


def _linear_probe(model: nn.Module, bits: int) -> CounterMeter:
    head = {id(p) for p in find_head(model, "auto").parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    return CounterMeter(model)


def _bitfit(model: nn.Module, bits: int) -> CounterMeter:
    # S2A's bias structure (biases and head train, frozen BatchNorms in eval), then the engine
    # off: plain PyTorch steps, counted like the other baselines. Timed with the engine's
    # bookkeeping attached, "BitFit" ran 8-12% slower than plain BitFit.
    apply_s2a(model, modules="bias", compress=False, surgery=False).engine.detach()
    return CounterMeter(model)


def _checkpointed(model: nn.Module, bits: int) -> CounterMeter:
    blocks, _, _ = find_blocks(model, None)
    for block in blocks:
        forward = block.module.forward

        def wrapped(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.module.forward = wrapped
    return _full(model, bits)


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the layers LoRA adapts: every Linear except the head, or, in a model
    whose only Linear is the head (a CNN), every ungrouped convolution. peft cannot give a
    rank-8 update to grouped (depthwise) convolutions, so they stay frozen."""
    heads = head_modules(find_head(model, "auto"))
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(m is h for h in heads)
    ]
    if linears:
        return linears
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and not any(m is h for h in heads)
    ]


def _lora(model: nn.Module, bits: int) -> CounterMeter:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(
            "the LoRA baseline needs peft: uv sync --group bench (or pip install peft)"
        ) from err
    heads = head_modules(find_head(model, "auto"))
    names = [n for n, m in model.named_modules() if any(m is h for h in heads)]
    targets = lora_targets(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=names)
    return CounterMeter(get_peft_model(model, config))


def _s2a(modules: str) -> Callable[[nn.Module, int], HandleMeter]:
    def prepare(model: nn.Module, bits: int, **fields: Any) -> HandleMeter:
        return HandleMeter(apply_s2a(model, modules=modules, bits=bits, **fields))

    return prepare


#: Method name -> (preparer, uses ``bits``). Ratios are taken against "full".
METHODS: dict[str, tuple[Callable[[nn.Module, int], Any], bool]] = {
    "full": (_full, False),
    "full+checkpoint": (_checkpointed, False),
    "linear_probe": (_linear_probe, False),
    "bitfit": (_bitfit, False),
    "lora": (_lora, False),
    "s2a_bias": (_s2a("bias"), True),
    "s2a_prompt": (_s2a("prompt"), True),
    "s2a_bias+prompt": (_s2a("bias+prompt"), True),
    "s2a_side": (_s2a("side"), True),
}


def expand(names: list[str], bits: list[int]) -> list[tuple[str, int | None]]:
    """(method, bits) pairs to run: S2A methods once per bit width, the others once."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; known: {list(METHODS)}.")
    runs: list[tuple[str, int | None]] = []
    for name in names:
        runs.extend((name, b) for b in bits) if METHODS[name][1] else runs.append((name, None))
    return runs


def build_model(name: str, classes: int, resolution: int, **kwargs: Any) -> nn.Module:
    """A timm model for ``resolution`` px input: models built for one input size (ViT, Swin)
    are built for it (``img_size``); the others take any size as they are."""
    import timm

    try:
        return timm.create_model(name, num_classes=classes, img_size=resolution, **kwargs)
    except TypeError as err:  # no img_size argument: a model that takes any input size
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, num_classes=classes, **kwargs)


def label(method: str, bits: int | None) -> str:
    """The row name of a run: ``s2a_bias@4bit``, or the method's name."""
    return method + (f"@{bits}bit" if METHODS[method][1] else "")


def trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; weights held in 4 bits (``frozen_dtype="nf4"``)
    count in the total, as the frozen parameters they are to a user. peft keeps a frozen
    copy of each module it trains whole (the head), which the model has once."""
    from ..structure.four_bit import held_numel

    params = [p for n, p in model.named_parameters() if ".original_module." not in n]
    total = sum(p.numel() for p in params) + held_numel(model)
    return sum(p.numel() for p in params if p.requires_grad), total
