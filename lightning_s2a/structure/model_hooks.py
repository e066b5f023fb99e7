"""The hooks the structural surgery puts on a model, as methods of small objects.

A hook that is a closure keeps pointing at what it closed over: after ``copy.deepcopy(model)``
(an EMA or SWA copy) the copy's hooks would still read and write the original's side network
and saved weights, silently. A bound method is deep-copied with its object, and the object's
references (the side network, the saved originals) map onto the copy's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.contexts import redirected_call
from . import four_bit


class SideHooks:
    """Run the backbone without autograd, prepare each block's output as a tap, and replace
    the head's (or the model's) output with the side network's.

    The side network (pooled or hierarchical) says how a tap is prepared (``prepare``) and
    reads the image size: the spatial size of the first 4-D tensor among the model's
    arguments, positional or keyword, with the image's ``channels`` where one has them, else
    ``image``, the size S2A was applied for (None where the side needs none). The
    hierarchical side checks it against each block's map.
    """

    def __init__(
        self,
        model_name: str,
        side: nn.Module,
        image: tuple[int, int] | None,
        add: bool = False,
        channels: int | None = None,
        replaces_model: bool = False,
    ) -> None:
        self.model_name, self.side, self.default_image, self.add = model_name, side, image, add
        self.image, self.channels, self.replaces_model = image, channels, replaces_model
        self.taps: list[torch.Tensor] = []
        self.last: Any = None  # the side's output in this forward, for every head it replaces
        self.grad_was: list[bool | None] = []  # None: a redirected call (see enter)
        self.stood_in = False  # a head's last Linear took the side's output (read_at_linear)

    def enter(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if redirected_call(module):  # Lightning's DDP step through the model's call
            self.grad_was.append(None)  # the real forward runs inside, as its own call
            return
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if torch.is_grad_enabled() and any(v.requires_grad for v in tensors):
            raise RuntimeError(
                f"modules=['side'] runs {self.model_name} without autograd, so no gradient "
                "reaches its input, which needs one here: a generator trained through this "
                "discriminator, an adversarial example, or a trainable module before the "
                "backbone would silently get none. Use modules=['bias'] or ['bias', 'prompt'] "
                "(the backbone runs with autograd), or detach() the input if its gradient is "
                "not wanted."
            )
        # (B, N) per sample of the batch: a causal (T, T) attention mask pads nothing
        batch = next((t.shape[0] for t in tensors if t.dim() >= 2), None)  # the input's

        def token_mask(v: Any) -> bool:
            return _token_mask(v) and v.shape[0] == batch

        masks = [
            k
            for k, v in kwargs.items()
            if (_padding_name(k) and _pads(v)) or (k.lower() in _MASK_NAMES and token_mask(v))
        ]
        masks += [f"argument {i}" for i, v in enumerate(args[1:], 1) if token_mask(v)]
        if masks:
            raise ValueError(
                f"modules=['side'] pools {self.model_name}'s block outputs over every "
                f"position, and cannot read a mask ({', '.join(masks)}): padded positions "
                "would enter the side network's features, and its output would change with "
                "the padding. Use modules=['bias'] or ['bias', 'prompt'] (the model applies "
                "its own mask), or call the model without a mask where nothing is padded "
                "(a (B, N) 0/1 tensor that is no mask, such as token type ids, reads as one "
                f"by position or as {'/'.join(sorted(_MASK_NAMES))}: pass it under another "
                "keyword)."
            )
        self.taps.clear()
        self.last = None
        self.stood_in = False
        self.image = self.default_image
        # model(x) and model(pixel_values=x) alike; an image has the probe's channels, an
        # auxiliary 4-D tensor passed first (a mask) usually not
        maps = [v for v in tensors if v.dim() == 4]
        images = [v for v in maps if v.shape[1] == self.channels] or maps
        if images:
            self.image = (int(images[0].shape[-2]), int(images[0].shape[-1]))
        self.grad_was.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)  # the backbone runs without autograd: stores nothing

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        was = self.grad_was.pop() if self.grad_was else None
        if was is not None:
            self.last = None
            torch.set_grad_enabled(was)
            if self.taps and output is not None:  # (None: the forward raised)
                self.taps.clear()
                raise RuntimeError(
                    f"modules=['side']: {self.model_name}'s blocks ran, but the head whose "
                    "output the side network's stands in for did not run as a module in "
                    "this forward (skipped, its weight used through F.linear, the blocks' "
                    "output returned early), so the trained side network was skipped. Call "
                    "the head as a module, or use modules=['bias'] / ['bias', 'prompt']."
                )

    def tap(self, name: str, index: int, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of block ``name`` (bind the first two with ``functools.partial``)."""
        self._inside(f"block {name!r}")
        if index != len(self.taps):
            raise RuntimeError(
                f"'side' reads each block once per forward, in order; block {name!r} (number "
                f"{index}) ran after {len(self.taps)} taps. Name blocks that run once each, "
                "in order, with S2AConfig(blocks=...)."
            )
        self.taps.append(self.side.prepare(index, output, self.image))

    def _inside(self, what: str) -> None:
        """Raise, before touching the grad mode, if ``what`` runs outside the model's forward."""
        if not self.grad_was or self.grad_was[-1] is None:
            raise RuntimeError(
                f"'side' runs {self.model_name}'s blocks inside its own forward, without "
                f"autograd, and reads them there; {what} ran outside it (through "
                "forward_features, forward_head or another method, or through the model's "
                "parts one by one), so the trained side network would be skipped. Call the "
                "model itself, model(x), or use modules=['bias'] / ['prompt']."
            )

    def open_head(self, module: nn.Module, args: Any) -> None:
        """Pre-hook of a head that trains (``side_merge="add"``): it runs with autograd."""
        self._inside("the head")
        torch.set_grad_enabled(self.grad_was[-1])

    def read_at_linear(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of the Linear a Sequential head ends in before layers without
        weights: the side stands in there, and those layers follow. A per-token Linear
        (the head pools after it) is left to the head's own hook."""
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            return None
        out = self.read_side(module, args, output)
        self.stood_in = True
        return out

    def read_side(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.stood_in:  # the head's own hook, after its last Linear took the side's
            self.stood_in = False
            return None
        if self.grad_was and self.grad_was[-1] is None and self.replaces_model:
            return None  # the end of a redirected call of the model: its output is the step's
        self._inside("the head")  # (the model's own forward hook always runs inside)
        # The cast to the output's dtype is part of the side's graph: inside the grad region
        # (without a head this hook runs before ``exit`` turns autograd back on).
        dtype = output.dtype if isinstance(output, torch.Tensor) else None
        with torch.set_grad_enabled(self.grad_was[-1]):
            if self.taps or self.last is None:
                out = self.side(list(self.taps), self.image)
                if dtype is not None:
                    out = out.to(dtype) if isinstance(out, torch.Tensor) else _cast(out, dtype)
                self.last = out
            else:  # a distilled model's second head in the same forward: the same output
                out = self.last
            if (
                isinstance(out, torch.Tensor)
                and isinstance(output, torch.Tensor)
                and out.shape != output.shape
            ):
                raise RuntimeError(
                    f"modules=['side'] stands in for {type(module).__name__}'s output of shape "
                    f"{tuple(output.shape)} with one of shape {tuple(out.shape)}: the side "
                    "network gives one (batch, classes) row per image, and this head gives "
                    "something else (per-token logits, a dense map). Name a head whose output "
                    "is (batch, classes), or use modules=['bias'] / ['bias', 'prompt']."
                )
            if self.add:  # the trained head's output, or the model's own (a constant)
                out = output + out
        # What the model does after its head (a log_softmax, a scale) works on the side's
        # output: it runs with autograd as the caller asked, or the side would get no
        # gradient. Every block ran before (a block after it would break the tap order).
        torch.set_grad_enabled(self.grad_was[-1])
        self.taps.clear()
        return out


def _token_mask(value: Any) -> bool:
    """True for a (B, N) tensor after the input that looks like a padding mask passed by
    position and pads something: boolean, 0/1 integer or float (HF's ``attention_mask``), or
    additive float (0 kept, -inf or a large negative number padded)."""
    if not torch.is_tensor(value) or value.dim() != 2 or not _pads(value):
        return False
    if value.dtype == torch.bool:
        return True
    if value.is_complex():
        return False
    binary = bool(((value == 0) | (value == 1)).all())
    additive = value.is_floating_point() and bool(((value == 0) | (value <= -1e4)).all())
    return binary or additive


#: Keywords users name a padding mask by (``model(x, mask=pad)``): refused where the value
#: looks like one (see :func:`_token_mask`); until 2026-12-07 only the names below were.
_MASK_NAMES = frozenset(
    {"mask", "pad_mask", "key_mask", "input_mask", "token_mask", "seq_mask", "valid_mask"}
)


def _padding_name(name: str) -> bool:
    """A keyword that names a padding mask (``src_key_padding_mask``, HF's
    ``attention_mask``), not another mask (``head_mask``, ``bool_masked_pos``)."""
    name = name.lower()
    return "padding_mask" in name or name == "attention_mask"


def _pads(mask: Any) -> bool:
    """True for a tensor mask with more than one value: one that marks some positions apart
    (all ones, HF's mask of an unpadded batch, pads nothing in either convention)."""
    if not torch.is_tensor(mask) or not mask.numel():
        return False
    flat = mask.reshape(-1)
    return bool((flat != flat[0]).any())


def _cast(pyramid: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each map of a feature pyramid in ``dtype``, as the same kind of list."""
    return type(pyramid)(f.to(dtype) for f in pyramid)


def moved(current: torch.Tensor, original: torch.Tensor) -> bool:
    """True if the cast weight ``current`` no longer holds its original's value in its own
    dtype: it was unfrozen and trained since (or changed otherwise), and keeps what it has.
    The original rounded through a low-precision cast is no change: the model converted
    since (``model.float()`` of a bf16-held weight) has trained nothing."""
    value = current.detach()
    return not any(
        torch.equal(value, original.to(via).to(value.device, value.dtype))
        for via in (original.dtype, torch.bfloat16, torch.float16)
    )


class OriginalsHooks:
    """Checkpoints hold a frozen weight cast by ``frozen_dtype`` as the user built it, and a
    loaded state dict makes the loaded value its new original (a resumed run never gets a
    stale weight). Registered on the layer that owns the weight, so the state dict of any
    module above it, and every name the layer is registered under, holds the original.

    A weight whose value moved since the cast (unfrozen and trained, also if frozen again
    since: :func:`moved`) is held as it is now, in the dtype it was built in, not as
    the stale original. Loading it still makes the loaded value its original, so whatever
    puts originals back (the end of fit, ``remove()``) never gives it an older one; torch
    loads its parameter as any other.
    """

    def __init__(self, originals: dict[str, torch.Tensor], name: str) -> None:
        self.originals, self.name = originals, name
        self.leaf = name.rpartition(".")[2]

    def __getstate__(self) -> dict[str, Any]:
        return _own_original(self)

    def state_dict(self, layer: nn.Module, state_dict: dict, prefix: str, meta: Any) -> None:
        original = self.originals.get(self.name)
        value = state_dict.get(prefix + self.leaf)
        if original is None or value is None:
            return
        trained = moved(value, original)
        state_dict[prefix + self.leaf] = value.to(original.dtype) if trained else original.clone()

    def load(self, layer: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        original = self.originals.get(self.name)
        value = state_dict.get(prefix + self.leaf)
        if original is None or not isinstance(value, torch.Tensor):
            return
        if value.shape == original.shape:
            self.originals[self.name] = value.detach().to("cpu", original.dtype, copy=True)


class HeldLayerHooks:
    """The same for one layer held in 4 bits, on the layer itself: its weight is no parameter
    while held, so its entry is added on save and taken out (and quantized) on load."""

    def __init__(self, originals: dict[str, torch.Tensor], name: str, quant_type: str) -> None:
        self.originals, self.name, self.quant_type = originals, name, quant_type

    def __getstate__(self) -> dict[str, Any]:
        return _own_original(self)

    def state_dict(self, layer: nn.Module, state_dict: dict, prefix: str, meta: Any) -> None:
        if not four_bit.is_held(layer):
            return
        state_dict[prefix + "weight"] = self.originals[self.name].clone()
        if hasattr(state_dict, "move_to_end"):  # the layer's entries come last: in its order
            for name in four_bit.parameter_order(layer):
                if prefix + name in state_dict:
                    state_dict.move_to_end(prefix + name)

    def load(self, layer: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        if not four_bit.is_held(layer):
            return
        if prefix + "weight" not in state_dict:
            # No parameter, so torch would not miss it: a strict load lacking the weight
            # said "All keys matched" and kept the old one (args: metadata, strict, missing)
            args[2].append(prefix + "weight")
            return
        value, original = state_dict[prefix + "weight"], self.originals[self.name]
        if not isinstance(value, torch.Tensor) or value.shape != original.shape:
            got = getattr(value, "shape", type(value).__name__)
            raise RuntimeError(
                f"size mismatch for {prefix}weight: the checkpoint has {got}, the model "
                f"{tuple(original.shape)} (held in 4 bits by frozen_dtype={self.quant_type!r})."
            )
        del state_dict[prefix + "weight"]  # no parameter to load it into
        # quantized in the original's dtype, as at apply: a model converted since (bf16-true)
        # gets the codes it trained with, and the weight still comes back in its dtype; a
        # loaded weight more precise than that (fp32, into a model converted to bf16 before
        # S2A) is quantized as it is and kept so: rounded to bf16 first, 0.9% of a
        # ResNet-18's codes differed from the run that saved it
        dtype = original.dtype
        if value.is_floating_point() and value.element_size() > original.element_size():
            dtype = value.dtype
        self.originals[self.name] = value.detach().to("cpu", dtype, copy=True)
        weight = value.detach().to(four_bit.device_of(layer), dtype)
        four_bit.hold(layer, weight, self.quant_type, four_bit.dtype_of(layer))


class NeedsAutocast:
    """Forward pre-hook of a model whose frozen weights ``frozen_dtype`` holds in bf16/fp16:
    an input of another dtype outside autocast would meet them in the first layer with
    torch's "Input type and weight type should be the same"; this says why and what to do.
    Passes while the weights are back in full precision (after fit, ``stop_engine``)."""

    def __init__(self, dtype: torch.dtype, weight: str) -> None:
        self.dtype, self.weight = dtype, weight  # a name, read through the model called

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if redirected_call(module):
            return
        owner, _, leaf = self.weight.rpartition(".")
        held = getattr(module.get_submodule(owner), leaf, None)
        if not isinstance(held, torch.Tensor) or held.dtype != self.dtype:
            return  # given back in full precision
        name = str(self.dtype).removeprefix("torch.")
        device = held.device.type
        if torch.is_autocast_enabled(device):
            other = torch.get_autocast_dtype(device)
            if other == self.dtype:
                return
            other_name = str(other).removeprefix("torch.")
            # Autocast copied every held weight to its own dtype: rounded twice, and the
            # copies kept for backward (a reviewer's ViT kept as many bytes as with
            # frozen_dtype=None; the callback refused it under Lightning's precision only).
            raise RuntimeError(
                f"S2AConfig(frozen_dtype={name!r}) holds the frozen weights in {name}, and "
                f"this forward runs under torch.autocast(dtype=torch.{other_name}): every "
                f"layer would copy them to {other_name}, rounded twice and kept for backward "
                "(the memory frozen_dtype saves, spent again). Autocast to the weights' dtype "
                f"(torch.autocast({device!r}, dtype=torch.{name})), or apply S2A with "
                f"frozen_dtype={other_name!r}."
            )
        x = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if x is None or not x.is_floating_point() or x.dtype == self.dtype:
            return
        raise RuntimeError(
            f"S2AConfig(frozen_dtype={name!r}) holds the frozen weights in {name}, and "
            f"this {str(x.dtype).removeprefix('torch.')} input runs outside autocast: "
            f"run the model under torch.autocast({x.device.type!r}, dtype=torch.{name}) "
            "(Lightning: precision='bf16-mixed'), or give the weights back first with "
            "handle.stop_engine() (or train with frozen_dtype=None)."
        )


def _own_original(hooks: OriginalsHooks | HeldLayerHooks) -> dict[str, Any]:
    """A copied or pickled layer's hooks take their own original, not the whole model's: the
    shared dict is read and written only under each hook's name, and only the handle (which
    no copy has) puts them all back. ``copy.deepcopy(model.head)`` of a bf16-held ViT-B
    copied every weight of the model (~330 MB) with it."""
    own = {k: v for k, v in hooks.originals.items() if k == hooks.name}
    return {**hooks.__dict__, "originals": own}


# Whole models pickled before the BatchNorm hooks moved to their own file name them here.
from .held_statistics import HeldStatistics, _Saved, release_eval  # noqa: E402, F401
