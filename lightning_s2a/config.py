"""``S2AConfig``: everything :func:`lightning_s2a.apply_s2a` can be asked to do, validated."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config_checks import (
    BACKENDS,
    DEFAULT_SIDE_STRIDES,
    DEPENDENT_OPTIONS,
    FOUR_BIT_DTYPES,
    MODULE_KINDS,
    SIDE_KINDS,
    SIDE_MERGES,
    check_composition,
    validate,
)
from .engine.bitpack import SUPPORTED_BITS
from .engine.calibration import WIDE_BITS

#: Operator kinds kept exact unless ``op_bits`` names them: what a loss saves (small, after
#: the head, and it bends with codes), what a custom autograd Function saves (the engine
#: cannot see which operator it serves: a saved input compared in backward, a norm's rows),
#: a sampling grid and what atan2/hypot save (see ``engine.ops.KINDS``).
EXACT_UNLESS_ASKED = ("loss", "custom", "position", "singular")
#: Operator kinds at least 8 bits wide unless ``op_bits`` names them, each with the kind whose
#: width it follows above that: what a fused attention's backward recomputes the
#: probabilities from (see ``engine.attention.fused_operands``) and the input a trained
#: sampling grid differences (see ``engine.ops.KINDS``).
AT_LEAST_WIDE = {"fused_attention": "attention", "sampled": "generic"}


@dataclass
class S2AConfig:
    """How to fine-tune a frozen backbone with S2A.

    ``modules`` picks the structural activation modules that train; ``bits`` is the width
    of the saved-activation codes for the non-parametric operators. The remaining fields tune
    the compression engine; their defaults follow the S2A method. Every field's value and type
    is checked at construction (and by :meth:`replace`): a wrong one, such as ``bits="4"`` or
    ``compress=1``, raises a ``ValueError`` naming the field and what it allows, and so does
    ``side`` combined with other modules. What depends on the model (an ``input_size`` that
    does not fit it) is checked by :func:`apply_s2a`, with an error as clear.
    """

    #: Code width for saved activations: 1, 2, 4 or 8.
    bits: int = 4
    #: Structural modules that train: any of "bias", "prompt", "side".
    modules: Sequence[str] = ("bias",)
    #: The task head that stays trainable: "auto" (timm's ``get_classifier()``), a submodule
    #: name such as "fc" (several, comma-separated, for parallel heads a model combines), or
    #: None for no head.
    head: str | None = "auto"
    #: Compress saved activations. False keeps only the structural part (e.g. plain BitFit).
    compress: bool = True
    #: Per-operator-kind code widths overriding ``bits``, e.g. ``{"softmax": 8}``.
    op_bits: Mapping[str, int] = field(default_factory=dict)
    #: Width for activations that feed a trainable weight's gradient (the head's input);
    #: None keeps them exact, because that gradient is the most sensitive.
    trainable_input_bits: int | None = None
    #: Elements per min-max group (offset and scale are stored once per group).
    group_size: int = 64
    #: Stochastic rounding for min-max and softmax codes (unbiased, noisier).
    stochastic_rounding: bool = False
    #: Pack/unpack backend: "auto" (Triton kernels on CUDA where a one-time probe shows they
    #: match the PyTorch reference, PyTorch elsewhere), "torch", "triton" (every kind), or
    #: "bnb" (bitsandbytes 4-bit for the min-max kinds).
    backend: str = "auto"
    #: bitsandbytes 4-bit format when ``backend="bnb"``: "nf4" or "fp4".
    bnb_quant_type: str = "nf4"
    #: Saved tensors with fewer elements than this are kept as they are.
    min_numel: int = 1024
    #: Samples drawn from a call site's tensor to fit its derivative-aware codebook.
    codebook_samples: int = 16384
    #: Refit each derivative-aware codebook after this many training forwards (the first
    #: refits come sooner: 1, 2, 4, ... forwards after its first fit).
    codebook_refresh: int = 1000
    #: Seed for codebook sampling and stochastic rounding, so runs are reproducible.
    seed: int = 0
    #: Rank r of each block's prompt ``A @ B`` (A: positions x r, B: r x channels).
    prompt_rank: int = 8
    #: Side branch: each tap is channel-average pooled to 1/side_reduction of its width.
    side_reduction: int = 4
    #: Side network width; None uses the last tap's pooled width, at most 128.
    side_width: int | None = None
    #: Side network: "pooled" (block outputs averaged over positions; classification) or
    #: "hierarchical" (after HST: keeps the spatial layout and builds a feature pyramid at
    #: ``side_strides``; its output without a head is the pyramid, for dense prediction).
    side: str = "pooled"
    #: What the side network's output does with the frozen backbone's: "replace" the head's
    #: output (the head stays frozen and unused), or "add" to it (classic side-tuning: the
    #: head trains on the backbone's final features, so the side starts from a linear probe;
    #: without a head, the side's output is added to the model's own features).
    side_merge: str = "replace"
    #: Strides of the hierarchical side's pyramid levels, relative to the input, finest first.
    side_strides: Sequence[int] = DEFAULT_SIDE_STRIDES
    #: Blocks that prompt/side attach to, for models outside the known timm families:
    #: a list of module names, or a pattern with ``*`` per name component ("encoder.layer.*").
    blocks: str | Sequence[str] | None = None
    #: Layout of block outputs: "auto" (the family's; else read from the shape and the
    #: block's layers), "tokens", "nhwc", "nchw" or "ncl" (1-D signals, channels first).
    block_layout: str = "auto"
    #: Shape of one input sample the prompts and side are sized for, e.g. (3, 224, 224), or
    #: (tokens, features) for sequences; None: the data module's ``input_size`` (Lightning),
    #: the patch embedding's ``img_size``, a Hugging Face ``config.image_size``, or timm's
    #: pretrained_cfg["input_size"], in that order.
    input_size: Sequence[int] | None = None
    #: Backbone BatchNorm during training: "eval" (running statistics, as in the fine-tuning
    #: literature; then stores nothing) or "train" (batch statistics).
    bn_mode: str = "eval"
    #: With "bias": give frozen Linear/Conv layers that have no bias a zero-initialised one
    #: (and nn.MultiheadAttention(bias=False) its in_proj_bias).
    add_bias: bool = False
    #: Exact frozen-op surgery: frozen convs, eval BatchNorm and p=0 dropout store nothing.
    surgery: bool = True
    #: Keep frozen weight matrices and kernels in "bfloat16" or "float16" (None: as they are).
    #: Use with mixed precision: autocast then needs no per-step low-precision weight copies.
    #: "nf4" / "fp4" hold frozen Linear and Conv weights in 4 bits (bitsandbytes, blocks of
    #: 64), dequantized one layer at a time in forward and again in backward; any precision.
    frozen_dtype: str | None = None
    #: Calibrate on the first training batch (``S2ACallback``) or on
    #: ``handle.calibrate(loss_fn)``: modules whose codes change their local gradient by more
    #: than ``calibrate_tol`` (relative) keep what they save at 8 bits. Costs one exact and
    #: one coded forward with their graphs alive, once.
    calibrate: bool = False
    #: Local relative gradient error above which calibration widens a module; None: 0.05 at
    #: 4 bits (a 4-bit GELU loses about 0.035), doubled per bit fewer, halved per bit more.
    calibrate_tol: float | None = None

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_saved(cls, fields: Mapping[str, Any]) -> S2AConfig:
        """The config an adapter file or a checkpoint holds. An option saved without the
        setting it acts under (:data:`DEPENDENT_OPTIONS`: accepted until 2026-12-07, and it
        did nothing) is dropped, so that files written then still load."""
        fields = dict(fields)
        dependent = {entry[0] for entry in DEPENDENT_OPTIONS}
        # What the table's tests read, as saved: an option the table drops reads as its
        # default after (``side_strides`` goes with a ``side`` dropped before it).
        view = cls(**{k: v for k, v in fields.items() if k not in dependent})
        for name in dependent & fields.keys():
            setattr(view, name, fields[name])
        for name, _, holds, _ in DEPENDENT_OPTIONS:
            if name in fields and not holds(view):
                del fields[name]
                setattr(view, name, cls.__dataclass_fields__[name].default)
        return cls(**fields)

    def bits_for(self, kind: str) -> int | None:
        """Code width for an operator kind; None means stored exact."""
        if kind == "trainable":
            return self.trainable_input_bits
        if kind in EXACT_UNLESS_ASKED:
            return self.op_bits.get(kind)
        base = AT_LEAST_WIDE.get(kind)
        if base is not None:  # at least 8 bits unless asked
            return self.op_bits.get(kind, max(self.op_bits.get(base, self.bits), WIDE_BITS))
        return self.op_bits.get(kind, self.bits)

    def calibration_tol(self, bits: int | None = None) -> float:
        """The local gradient error above which calibration widens a module whose codes are
        ``bits`` wide (default ``self.bits``; see ``calibrate_tol``): a code's error halves
        with each bit, and so does the default."""
        if self.calibrate_tol is not None:
            return float(self.calibrate_tol)
        return 0.05 * 2.0 ** (4 - (self.bits if bits is None else bits))

    def coded_widths(self) -> list[int]:
        """Every code width the config asks for: ``bits``, ``op_bits`` and
        ``trainable_input_bits``; calibration has something to widen below 8."""
        widths = [self.bits, *self.op_bits.values()]
        return widths + ([] if self.trainable_input_bits is None else [self.trainable_input_bits])

    def replace(self, **overrides: Any) -> S2AConfig:
        """A copy with some fields changed (validated again)."""
        check_field_names(overrides)
        return dataclasses.replace(self, **overrides)


def check_field_names(
    names: Iterable[str], also: Iterable[str] = (), also_from: str = "the caller"
) -> None:
    """Raise a ``ValueError`` naming every name that is not an :class:`S2AConfig` field.

    ``also`` lists other names the caller accepts (e.g. a Lightning strategy's own arguments,
    described by ``also_from``); they are not reported, and the message lists them after the
    known fields.
    """
    fields = {f.name for f in dataclasses.fields(S2AConfig)}
    extra = set(also) - fields
    unknown = sorted(set(names) - fields - extra)
    if unknown:
        more = f" Also accepted by {also_from}: {sorted(extra)}." if extra else ""
        raise ValueError(
            f"unknown S2AConfig field(s) {unknown}; known fields: {sorted(fields)}.{more}"
        )


__all__ = [
    "BACKENDS",
    "FOUR_BIT_DTYPES",
    "MODULE_KINDS",
    "SIDE_KINDS",
    "SIDE_MERGES",
    "SUPPORTED_BITS",
    "S2AConfig",
    "check_composition",
    "check_field_names",
]


#: Fields that change the function the model computes; the rest change only how saved
#: tensors are stored (bits, backend, calibration...), which a resumed run may change.
#: ``input_size`` only sizes prompts, and is compared on its own (another layout of as many
#: positions loads by shape): ``identity.check_prompt_size``.
MODEL_FIELDS = (
    "modules",
    "head",
    "prompt_rank",
    "side_reduction",
    "side_width",
    "side",
    "side_merge",
    "side_strides",
    "blocks",
    "block_layout",
    "bn_mode",
    "add_bias",
    "frozen_dtype",
)


def config_differences(a: S2AConfig, b: S2AConfig) -> list[str]:
    """Names of the fields in which two configs differ (for errors that say what differs)."""
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def model_differences(a: S2AConfig, b: S2AConfig) -> list[str]:
    """The fields in which two configs make the model compute another function
    (:data:`~lightning_s2a.config.MODEL_FIELDS`); the same modules listed apart are alike."""
    if a.modules != b.modules and not (set(a.modules) ^ set(b.modules)):
        a = a.replace(modules=b.modules)
    return [f for f in config_differences(a, b) if f in MODEL_FIELDS]
