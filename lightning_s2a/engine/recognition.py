"""Operator recognition for the engine: what is running while autograd saves a tensor.

:class:`OperatorMode` (a ``TorchFunctionMode``) sees every torch call of a compressed forward
and records the recognised operator as a :class:`Call`, which the pack hook reads to choose a
quantizer; the rules that keep some saved tensors exact (weights in another form, reduced
statistics) live here too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention import (
    ATTENTION_MASKS,
    FUSED_ATTENTION,
    attention_shapes,
    attention_without_weights,
    fused_operands,
)
from .contexts import checkpoint_input, dual_level_open, engine_saves
from .ops import POSITION_OPERANDS, ElementwiseSpec, call_arg
from .quantizers import QUANTIZERS, pack_two_level

if TYPE_CHECKING:
    from .hooks import SavedTensorEngine

# Kinds whose operators also save reduced statistics (mean, rstd, logsumexp): those are tiny
# and precision-critical, so they are kept exact: tensors shaped like none of the op's inputs
# and smaller than the largest. Larger ones (the attention probabilities that SDPA's math path
# saves, with a float mask on CPU) are no statistics and are quantized like its inputs.
STATS_KINDS = ("norm", "attention")
#: Kinds whose codes follow the tensor's rows (a norm's, softmax's): an expanded view of one
#: is coded as it is, not as the tensor it repeats.
ROW_KINDS = ("norm", "softmax")
#: Norms over the trailing dimensions given as ``normalized_shape``.
ROW_NORMS = ("layer_norm", "native_layer_norm", "rms_norm")
#: Norms over each channel (dimension 1) across the batch: BatchNorm.
CHANNEL_NORMS = ("batch_norm", "native_batch_norm")


def norm_row(raw: str, args: tuple, kwargs: dict) -> int:
    """How many consecutive values (in logical order) a norm normalizes together: the
    ``normalized_shape`` of a layer or RMS norm, (C / G) x H x W of a group norm, H x W of an
    instance norm; 0 for other ops (BatchNorm's rows are its channels)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.numel():
        return 0
    if raw in ROW_NORMS:
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape", ())
        if isinstance(shape, int):
            return shape
        row = 1 if len(shape) else 0
        for d in shape:  # no generator: torch.compile (compress=False) traces this
            row *= int(d)
        return row
    if raw == "group_norm":
        groups = args[1] if len(args) > 1 else kwargs.get("num_groups", 0)
        return x.numel() // (x.shape[0] * int(groups)) if x.dim() >= 2 and groups else 0
    if raw == "native_group_norm":  # (input, weight, bias, N, C, HxW, group, eps)
        return int(args[4]) // int(args[6]) * int(args[5]) if len(args) > 6 else 0
    if raw == "instance_norm":
        return x[0, 0].numel() if x.dim() >= 3 else 0
    return 0


#: Said once: checkpointing and S2A work against each other.
CHECKPOINT_WARNING = (
    "activation checkpointing under S2A: each checkpointed region's inputs are kept exact "
    "(backward recomputes the region from them), which usually takes more memory than S2A's "
    "codes of the whole region. Turn checkpointing off (timm: set_grad_checkpointing(False); "
    "HF: gradient_checkpointing_disable()) to keep less."
)


def outside_call(compress: bool = True, custom_coded: bool = False) -> Call:
    """The :class:`Call` of a tensor saved outside any operator: a checkpoint's input
    (kind "checkpoint", kept exact; warned about once), or what a custom autograd Function
    saves (kind "custom", kept exact unless ``op_bits`` names it; warned about once per
    line that calls one). Coded as min-max "generic" until 2026-12-07, a Function comparing a saved
    input in backward (a max written by hand) gave zero gradients, a fused LayerNorm
    Function lost the norm's row-aligned groups (backbone cosine 0.37), and a head's
    trainable input was coded. Nothing is said where nothing is compressed, nor where
    ``op_bits`` asks for custom codes."""
    if checkpoint_input():
        if compress:
            warnings.warn(CHECKPOINT_WARNING, stacklevel=4)
        return Call(kind="checkpoint")
    if not compress or custom_coded:
        return Call(kind="custom")
    # Attributed to the line that called the Function (torch saves after its forward
    # returns, from C++: no frame of the Function is left to name it by); once per line.
    warnings.warn(CUSTOM_WARNING, stacklevel=4)
    return Call(kind="custom")


#: Said once per calling line: what a custom Function saves stays exact.
CUSTOM_WARNING = (
    "S2A keeps exact what a custom autograd Function (the one called on this line) saves for "
    "backward: the engine cannot see which operator it computes, and codes that do not fit "
    "its backward can silently change the gradient. Its bytes count as kind 'custom' in "
    "stats(); op_bits={'custom': 4} codes them with min-max codes where you have checked "
    "that its gradient tolerates them."
)


def constant(t: torch.Tensor, weight_numels: set[int]) -> bool:
    """True for a floating tensor computed without autograd (nothing trained reaches it) with
    as many elements as a weight of the model, or a view of one: a weight in another form (a
    4-bit weight dequantized, then sliced: a slimmable conv's ``W[:48, :48]``, split qkv
    weights; such slices were coded as activations). A frozen embedding's output or the
    model's input is no weight: it is coded like any activation."""
    whole = t._base if t._base is not None else t
    return (
        t.grad_fn is None
        and not t.requires_grad
        and t.is_floating_point()
        and whole.numel() in weight_numels
    )


#: Calls of one module in a forward that get codebooks of their own (one nn.GELU shared by
#: the blocks of a deep model); later calls share the last: each codebook is fitted and
#: refitted, and 64 of them made a shared activation's first steps 28x slower.
OWN_CODEBOOK_CALLS = 16

#: A tensor reduced along a dimension must be this many times smaller than the largest tensor
#: saved before it in the forward to count as a statistic (see :func:`reduced`).
REDUCED_RATIO = 16


def reduced(t: torch.Tensor, largest: int, shapes: set[torch.Size]) -> bool:
    """True for a per-row or per-channel statistic that any op saves: a tensor with a size-1
    dimension after the first (a ``keepdim`` reduction: a hand-written layer norm's standard
    deviation ``(B, L, 1)``, a squeeze-excitation gate ``(N, C, 1, 1)``), at least
    ``REDUCED_RATIO`` times smaller than the largest tensor saved so far in the account (the
    forward, or the training step's forwards) or than the model's input, and the reduction of
    one of those saved tensors or inputs: the same shape but larger where it has size 1.

    Broadcast back over its row, every element shares its error: min-max groups spanning
    rows of different scale gave the small rows a step wider than themselves (a hand-written
    layer norm's input-gradient cosine 0.65, a torchvision EfficientNet's SE biases 0.78).
    Kept exact, it costs a fraction of its row's codes. Activations laid out with a size-1
    dimension (a time-major batch of 1, single-frame video) are no reduction of anything saved:
    they stay coded.
    """
    shape = t.shape
    if t.numel() * REDUCED_RATIO > largest or 1 not in shape[1:]:
        return False
    dims = len(shape)
    for other in shapes:
        if (
            len(other) == dims
            and other != shape
            and all(
                o == s or (s == 1 and i > 0)
                for i, (o, s) in enumerate(zip(other, shape, strict=True))
            )
        ):
            return True
    return False


def row_widths(model: nn.Module, group: int, heads: Sequence[str] = ()) -> frozenset[int]:
    """The model's feature widths that are no multiple of the min-max ``group``: Linear
    in/out features (but the classes a head under ``heads`` puts out: an NCHW map 7 wide
    is no row of a 7-class head), layer/RMS norm sizes (a per-head q/k norm's too), and the
    length of any other module's 1-D parameter (a hand-written RMSNorm's weight, a layer
    scale), convolutions and batch, group and instance norms aside (their 1-D parameters
    are channels, not rows).

    A tensor saved with one of these as its last dimension is coded in groups along its
    rows: a hand-written row norm (``x * rsqrt(mean(x**2) + eps)``, ``F.normalize``) is no
    recognised norm, and its saved input, grouped in memory order across rows of 96, gave a
    small row (a padding token 1000x smaller) its neighbour's step: a bias before it 4x off.
    """
    skip = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
    widths = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            head = any(name == h or name.startswith(h + ".") for h in heads if h)
            widths.update((m.in_features,) if head else (m.in_features, m.out_features))
            continue
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.normalized_shape:
            widths.add(m.normalized_shape[-1])
        elif not isinstance(m, skip):
            params = m._parameters.values()
            widths.update(p.numel() for p in params if p is not None and p.dim() == 1)
    return frozenset(w for w in widths if w > 1 and w % group)


def exact_code(kind: str, call: Call) -> bool:
    """True where the quantizer's code is exact: the two-level kinds of the quantizer table
    (masks, dropout), and 1-bit derivative steps."""
    return QUANTIZERS.get(kind) is pack_two_level or (call.spec is not None and call.spec.exact)


@dataclass
class Call:
    """The recognised operator that is running while tensors get saved."""

    kind: str
    spec: ElementwiseSpec | None = None
    site: tuple | None = None
    arg_shapes: frozenset = frozenset()
    arg_numel: int = 0
    #: The shapes an attention's log-sum-exp may have (None for other calls) and its data's
    #: element counts: see :func:`statistics`.
    lse: frozenset | None = None
    data_numels: frozenset = frozenset()
    dim: int = -1
    #: A norm over rows of this many consecutive values each (see ``quantizers.pack_norm``).
    row: int = 0
    #: A norm over each channel across the batch (see ``quantizers.pack_norm``).
    channels: bool = False
    #: A fused attention's query, key and value as ``(data_ptr, shape)`` and its output's
    #: shape: its backward recomputes the probabilities from them (see :func:`fused_operands`).
    fused: frozenset = frozenset()
    #: Shape of the operand that says where the op samples (``grid_sample``'s grid), and
    #: the storages of that operand and of the op's input: a saved tensor of that shape is
    #: kind "position" (see ``ops.POSITION_OPERANDS``), unless it is the input itself (an
    #: input shaped like the grid: width 2, or 3 in 3-D).
    position: tuple | None = None
    position_ptrs: tuple[int, int] = (0, 0)


#: The call of a torch op the tables do not name (``cumprod``, ``atan``, ``max_pool1d``).
GENERIC = Call(kind="generic")


class OperatorMode(TorchFunctionMode):
    """Records the operator being called, for the pack hook; otherwise transparent."""

    def __init__(self, engine: SavedTensorEngine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        engine = self.engine
        if engine._busy:
            return func(*args, **kwargs)
        info = engine._func_info(func)
        call = engine._classify(info, args, kwargs)
        rewrite = info[3]
        if rewrite is not None and (dual_level_open() or not engine_saves(engine)):
            # Under forward-mode AD (a dual level open) the rewrites' autograd Functions have
            # no jvp: torch's own ops run, as without S2A (they failed with "You must
            # implement the jvp function", S2A unnamed).
            # Inside another owner's saved-tensor hooks (a non-reentrant checkpoint) the
            # engine saves nothing, and the recomputation in backward runs without this
            # mode: a rewrite here would save other tensors than the recomputation.
            rewrite = None
        # A torch op outside the tables is "generic" while it runs: a tensor saved with no
        # call set is one a custom autograd Function saves (see outside_call).
        previous, engine._call = engine._call, GENERIC if call is None else call
        try:
            if rewrite is not None:
                result = rewrite(func, args, kwargs)
                if result is not NotImplemented:
                    return result
            return func(*args, **kwargs)
        finally:
            engine._call = previous


# Argument types that are no parameter, told by type alone: ``isinstance(a, nn.Parameter)``
# runs a Python ``__instancecheck__`` (about 700 calls a ViT-Ti step, 2% of it).
_NEVER_PARAMETERS = frozenset({torch.Tensor, int, float, bool, type(None), str, torch.dtype})


def classify(engine: SavedTensorEngine, info: tuple, args: tuple, kwargs: dict) -> Call | None:
    """The :class:`Call` for one torch call with the engine's ``_func_info`` ``info``, or None
    for a call that is no recognised operator and takes no parameter."""
    raw, factory, kind, _ = info
    spec = factory(raw, args, kwargs) if factory is not None else None
    if spec is not None:
        kind = "elementwise"
    param_ids = engine._param_ids
    params = []
    outside_trained = False  # a trained parameter from outside the model (a module of its own)
    for a in (*args, *kwargs.values()) if kwargs else args:
        if type(a) in (list, tuple):  # an RNN's weights come as one list
            params += [b for b in a if id(b) in param_ids]
        elif id(a) in param_ids:
            params.append(a)
        elif type(a) not in _NEVER_PARAMETERS and isinstance(a, nn.Parameter):
            if a not in engine._outside_ids:
                check_known(engine, a)
            outside_trained = outside_trained or a.requires_grad
    if kind is None and not params and not outside_trained:
        return None
    if (
        outside_trained
        or any(id(p) in engine._weight_ids for p in params)
        or (kind in ("linear", "matmul") and derived_weight(engine, args, kwargs))
    ):
        kind = "trainable"  # its saved input feeds a trainable weight's gradient
    call = Call(kind=kind or "generic", spec=spec)
    if kind in STATS_KINDS:
        # The op's data, not its weights: nn.MultiheadAttention passes in_proj_weight
        # (3 E^2), and every tensor smaller than it looked like a statistic.
        # Plain loops over lists: torch.compile (compress=False) traces this, and its guards
        # on a tuple iterator failed (a BatchNorm model did not compile).
        # A weight in another form (nf4's dequantized out_proj weight) is no data either.
        # An attention's mask is no data either: a float bias larger than q (TinyViT's
        # position biases, (heads, N, N)) made the math path's reshaped q, k and v look
        # like statistics, kept whole (4.3 of 15.5 MiB stored).
        data = list(args[:3]) if raw == "scaled_dot_product_attention" else list(args)
        data += [v for k, v in kwargs.items() if k not in ATTENTION_MASKS]
        shapes, numel = set(), 0
        for a in data:
            if (
                isinstance(a, torch.Tensor)
                and id(a) not in param_ids
                and not constant(a, engine._weight_numels)
            ):
                shapes.add(tuple(a.shape))
                numel = max(numel, a.numel())
        call.arg_shapes = frozenset(shapes)
        call.arg_numel = numel
        shapes_of = attention_shapes(raw, args, kwargs) if kind == "attention" else None
        if shapes_of is not None:
            call.lse, call.data_numels = shapes_of
        call.row = norm_row(raw, args, kwargs)
        call.channels = raw in CHANNEL_NORMS
        if raw in FUSED_ATTENTION:
            call.fused = fused_operands(args, kwargs)
        elif raw == "multi_head_attention_forward":
            call.fused = attention_without_weights(args, kwargs)
    elif raw in POSITION_OPERANDS:
        pos, key = POSITION_OPERANDS[raw]
        grid = call_arg(args, kwargs, pos, key, None)
        if isinstance(grid, torch.Tensor):
            call.position = tuple(grid.shape)
            source = call_arg(args, kwargs, 0, "input", None)
            if isinstance(source, torch.Tensor) and source.shape == grid.shape:
                call.position_ptrs = (grid.data_ptr(), source.data_ptr())
            if grid.requires_grad:  # the grid trains: its gradient differences the input
                call.kind = "sampled"
    elif kind == "softmax":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
        call.dim = -1 if dim is None else int(dim)
    elif kind == "elementwise" and spec is not None and not spec.exact:
        frame = engine._frames[-1] if engine._frames else ["", {}, 0]
        count = frame[1].get(spec.name, 0)
        frame[1][spec.name] = count + 1
        # The module's first call in a forward keeps its plain name (as saved before); calls
        # past OWN_CODEBOOK_CALLS (a cell unrolled over a long sequence) share the last one.
        call_index = min(frame[2], OWN_CODEBOOK_CALLS - 1)
        site = f"{frame[0]}#{call_index}" if call_index else frame[0]
        call.site = (site, spec.name, count)
    return call


def check_known(engine: SavedTensorEngine, p: nn.Parameter) -> None:
    """Raise if ``p``, a parameter the engine did not see at ``apply_s2a``, is the model's:
    a module added or replaced since (``reset_classifier``, a new head), which S2A neither
    froze nor hooked (its saved input and weight were coded as activations, and 'side'
    read the old head). A parameter from outside the model is noted, and its storage kept
    as parameters' are (never coded as an activation, nor counted as one)."""
    for name, module in engine.model.named_modules():
        for leaf, q in module._parameters.items():
            if q is p:
                where = f"{name}.{leaf}" if name else leaf
                raise RuntimeError(
                    f"{type(engine.model).__name__}'s {where!r} is not among the parameters "
                    "S2A was applied to: the module was added or replaced after apply_s2a "
                    "(reset_classifier, a new head), so S2A neither froze nor hooked it and "
                    "would code its tensors as activations. Build the model in its final "
                    "form before apply_s2a (reset_classifier first), or call handle.remove() "
                    "and apply_s2a again."
                )
    _note_outside(engine, p)


def _note_outside(engine: SavedTensorEngine, p: nn.Parameter) -> None:
    engine._outside_ids[p] = True
    # Traced by torch.compile (compress=False, nothing packed): a fake tensor, no storage.
    with contextlib.suppress(RuntimeError):
        engine._param_storages.add(p.untyped_storage().data_ptr())


@torch.compiler.disable  # storage pointers and autograd nodes: eager, also under compile
def derived_weight(engine: SavedTensorEngine, args: tuple, kwargs: dict) -> bool:
    """True if a linear or matmul call gets a trainable weight in another form: a view
    (``x @ self.weight.T``, same storage) or computed from it with autograd within a few
    steps (weight norm, a cosine classifier's normalized weight, ``W * s``; as many
    elements). Positional, keyword and listed operands (``einsum``) alike."""
    operands: list[Any] = []
    for a in (*args, *kwargs.values()):
        if type(a) in (list, tuple):
            operands.extend(a)
        else:
            operands.append(a)
    for t in operands:
        if not isinstance(t, torch.Tensor) or not t.requires_grad or id(t) in engine._param_ids:
            continue
        if t.untyped_storage().data_ptr() in engine._trained_storages:
            return True
        if t.numel() in engine._trained_numels and _from_weight(engine._weight_ids, t.grad_fn):
            return True
    return False


def _from_weight(weight_ids: set[int], fn: Any, depth: int = 4) -> bool:
    """True if a trainable weight is among the autograd inputs of ``fn`` within ``depth``
    steps (an activation of the same size is computed through many more)."""
    frontier, seen = [fn], set()
    for _ in range(depth):
        nxt = []
        for f in frontier:
            for g, _ in getattr(f, "next_functions", ()):
                if g is None or id(g) in seen:
                    continue
                seen.add(id(g))
                if id(getattr(g, "variable", None)) in weight_ids:
                    return True
                nxt.append(g)
        frontier = nxt
    return False
