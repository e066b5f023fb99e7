"""``S2AConfig``: everything :func:`lightning_s2a.apply_s2a` can be asked to do, validated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine.bitpack import SUPPORTED_BITS, check_bits
from .engine.calibration import WIDE_BITS
from .engine.ops import KINDS

MODULE_KINDS = ("bias", "prompt", "side")
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
SIDE_KINDS = ("pooled", "hierarchical")
SIDE_MERGES = ("replace", "add")
DEFAULT_SIDE_STRIDES = (8, 16, 32)
BACKENDS = ("auto", "torch", "triton", "bnb")
BNB_QUANT_TYPES = ("nf4", "fp4")
BN_MODES = ("eval", "train")
FROZEN_DTYPES = (None, "bfloat16", "float16", "nf4", "fp4")
#: Frozen dtypes that hold weights in 4 bits (bitsandbytes) rather than cast them.
FOUR_BIT_DTYPES = BNB_QUANT_TYPES
#: Block output layouts: (B, N, D) tokens, (B, H, W, C), (B, C, H, W), (B, C, L) (1-D convs).
LAYOUTS = ("auto", "tokens", "nhwc", "nchw", "ncl")
GROUP_SIZES = (8, 16, 32, 64, 128, 256)


def check_composition(modules: tuple[str, ...]) -> None:
    """Reject module combinations that cannot train, saying why."""
    if "side" in modules and len(modules) > 1:
        others = [m for m in modules if m != "side"]
        raise ValueError(
            f"modules={list(modules)}: 'side' runs the backbone without autograd, so no "
            f"gradient reaches {others} inside it; use 'side' alone, or {others} without it."
        )


def _trains(*modules: str) -> Callable[[Any], bool]:
    return lambda config: any(m in config.modules for m in modules)


_PLACED = "with the 'prompt' or 'side' module (it says where they go)"
#: Options that act only under another setting: ``(field, under what, whether a config has
#: it, the fix)``. Set otherwise, they would do nothing, so they are refused (said, not
#: ignored: ``add_bias=True`` with ``modules=['prompt']`` trained no added bias, and
#: ``blocks`` beside bias-only was accepted, then made a resume fail as another model); a
#: saved config holding one (accepted before 2026-12-07) loads with it dropped.
DEPENDENT_OPTIONS: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    *(
        (name, f"with the {module!r} module", _trains(module), f"add {module!r} to modules")
        for name, module in (
            ("add_bias", "bias"),
            ("prompt_rank", "prompt"),
            ("side_width", "side"),
            ("side_reduction", "side"),
        )
    ),
    ("blocks", _PLACED, _trains("prompt", "side"), "add 'prompt' or 'side' to modules"),
    ("block_layout", _PLACED, _trains("prompt", "side"), "add 'prompt' or 'side' to modules"),
    (
        "bnb_quant_type",
        "with backend='bnb' (the other backends code min-max)",
        lambda config: config.backend == "bnb",
        "set backend='bnb'",
    ),
    (
        "stochastic_rounding",
        "with a backend other than 'bnb', whose blockwise codes round to nearest (it "
        "would reach the per-row softmax codes only)",
        lambda config: config.backend != "bnb",
        "use backend='auto' or 'torch'",
    ),
)


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
        check_bits(self.bits, "bits")
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        if _is_sequence(self.modules) and all(isinstance(m, str) for m in self.modules):
            # "bias+prompt", "bias, prompt" and ["bias+prompt"] (the CLI's [bias+prompt]) alike
            parts = (p.strip() for m in self.modules for p in m.replace("+", ",").split(","))
            self.modules = tuple(p for p in parts if p)
        if not _is_sequence(self.modules):
            raise ValueError(
                f"modules: expected a list of module kinds or a string such as 'bias+prompt', "
                f"got {self.modules!r}; allowed: {MODULE_KINDS}."
            )
        self.modules = tuple(self.modules)
        for m in self.modules:
            if m not in MODULE_KINDS:
                raise ValueError(f"modules: unknown module kind {m!r}; allowed: {MODULE_KINDS}.")
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"modules: {self.modules!r} lists a module kind twice.")
        check_composition(self.modules)
        if not self.modules:
            raise ValueError(f"modules: choose at least one of {MODULE_KINDS}.")
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise ValueError(
                f"head: {self.head!r} ({type(self.head).__name__}) is not a submodule name; "
                "allowed: 'auto', the name of a submodule such as 'fc', or None for no head."
            )
        for name in ("head", "frozen_dtype"):  # --s2a.head None on the command line
            if getattr(self, name) in ("None", "none"):
                raise ValueError(
                    f"{name}: {getattr(self, name)!r} is the string; for None write null (YAML "
                    f"and the command line: --s2a.{name} null) or None in Python."
                )
        for name in ("compress", "stochastic_rounding", "add_bias", "surgery", "calibrate"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"{name}: {value!r} ({type(value).__name__}) is not a bool; "
                    "allowed: True, False."
                )
        if not isinstance(self.op_bits, Mapping):
            raise ValueError(
                f"op_bits: expected a mapping from operator kind to code width, e.g. "
                f"{{'softmax': 8}}, got {self.op_bits!r}."
            )
        self.op_bits = dict(self.op_bits)
        for kind, b in self.op_bits.items():
            if kind not in KINDS:
                raise ValueError(f"op_bits: unknown operator kind {kind!r}; allowed: {KINDS}.")
            if kind == "trainable":
                raise ValueError(
                    "op_bits['trainable']: the width of activations that feed a trainable "
                    "weight's gradient is trainable_input_bits (None keeps them exact); set "
                    f"S2AConfig(trainable_input_bits={b!r}) instead."
                )
            check_bits(b, f"op_bits[{kind!r}]")
        if self.trainable_input_bits is not None:
            check_bits(self.trainable_input_bits, "trainable_input_bits")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend {self.backend!r}; allowed: {BACKENDS}.")
        # Checked whatever the backend, so a typo is not silently ignored until "bnb" is chosen.
        if self.bnb_quant_type not in BNB_QUANT_TYPES:
            raise ValueError(
                f"bnb_quant_type: {self.bnb_quant_type!r} is not one of {BNB_QUANT_TYPES}."
            )
        if self.backend == "bnb" and self.bits != 4:
            raise ValueError(
                f"bits={self.bits} with backend='bnb': bitsandbytes quantizes in 4 bits only; "
                "use bits=4 or backend='torch'."
            )
        if not _is_int(self.group_size):
            raise ValueError(
                f"group_size: {self.group_size!r} ({type(self.group_size).__name__}) is not an "
                f"int; allowed: {GROUP_SIZES}."
            )
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: {self.group_size} is not one of {GROUP_SIZES}.")
        if self.backend == "bnb" and self.group_size < 32:
            raise ValueError(
                f"group_size={self.group_size} with backend='bnb': bitsandbytes codes blocks of "
                "32 or more values; use group_size >= 32 or backend='torch'."
            )
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype: {self.frozen_dtype!r} is not one of {FROZEN_DTYPES}.")
        if self.frozen_dtype in FOUR_BIT_DTYPES and not self.surgery:
            raise ValueError(
                f"frozen_dtype={self.frozen_dtype!r} needs surgery=True: the frozen-conv rewrite "
                "is what keeps each conv's weight in 4 bits through backward."
            )
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode: {self.bn_mode!r} is not one of {BN_MODES}.")
        if self.block_layout not in LAYOUTS:
            raise ValueError(f"block_layout: {self.block_layout!r} is not one of {LAYOUTS}.")
        if self.side_width is not None and (not _is_int(self.side_width) or self.side_width < 2):
            raise ValueError(
                f"side_width: must be an integer of at least 2 or None, got {self.side_width!r} "
                "(the side network normalizes over its width: at width 1 its output is the "
                "same for every input)."
            )
        if self.side not in SIDE_KINDS:
            raise ValueError(f"side: {self.side!r} is not one of {SIDE_KINDS}.")
        if self.side != "pooled" and "side" not in self.modules:
            raise ValueError(
                f"side={self.side!r} chooses the side network, but modules={list(self.modules)} "
                "trains none; use modules=['side']."
            )
        if self.side_merge not in SIDE_MERGES:
            raise ValueError(f"side_merge: {self.side_merge!r} is not one of {SIDE_MERGES}.")
        if self.side_merge != "replace" and "side" not in self.modules:
            raise ValueError(
                f"side_merge={self.side_merge!r} says what the side network's output does, but "
                f"modules={list(self.modules)} trains none; use modules=['side']."
            )
        if _is_sequence(self.side_strides):
            self.side_strides = tuple(self.side_strides)
        strides = self.side_strides
        if (
            not isinstance(strides, tuple)
            or not strides
            or not all(_is_int(s) and s > 0 for s in strides)
            or list(strides) != sorted(set(strides))
        ):
            raise ValueError(
                f"side_strides: expected increasing positive integers, finest first, e.g. "
                f"(8, 16, 32), got {self.side_strides!r}."
            )
        if strides != DEFAULT_SIDE_STRIDES and self.side != "hierarchical":
            raise ValueError(
                f"side_strides={strides} sets the hierarchical side's pyramid; it has no "
                f"effect with side={self.side!r}. Use side='hierarchical'."
            )
        if self.input_size is not None:
            if _is_sequence(self.input_size):
                self.input_size = tuple(self.input_size)
            if (
                not isinstance(self.input_size, tuple)
                or not self.input_size
                or not all(_is_int(v) and v > 0 for v in self.input_size)
            ):
                raise ValueError(
                    f"input_size: expected the shape of one sample, e.g. (3, 224, 224), "
                    f"got {self.input_size!r}."
                )
        if self.blocks is not None:
            if _is_sequence(self.blocks):
                self.blocks = tuple(self.blocks)
            names = (self.blocks,) if isinstance(self.blocks, str) else self.blocks
            if (
                not isinstance(names, tuple)
                or not names
                or not all(isinstance(n, str) and n for n in names)
            ):
                raise ValueError(
                    f"blocks: expected a pattern such as 'encoder.layer.*' or a list of module "
                    f"names, got {self.blocks!r}; allowed: a non-empty str, a non-empty list of "
                    "non-empty str, or None."
                )
        for name in (
            "min_numel",
            "codebook_samples",
            "codebook_refresh",
            "prompt_rank",
            "side_reduction",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}.")
        tol = self.calibrate_tol
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1
        ):
            raise ValueError(
                f"calibrate_tol: expected a relative error between 0 and 1 (exclusive), e.g. "
                f"0.05, or None (scaled to bits), got {tol!r}."
            )
        if self.calibrate and not self.compress:
            raise ValueError(
                "calibrate=True measures the codes' error, but compress=False stores every "
                "saved tensor exact; drop one of them."
            )
        if self.calibrate and min(self.coded_widths()) >= WIDE_BITS:
            raise ValueError(
                f"calibrate=True widens modules to {WIDE_BITS} bits, but every code is "
                f"{WIDE_BITS} bits or more already (bits={self.bits}, op_bits="
                f"{self.op_bits}, trainable_input_bits={self.trainable_input_bits}); use "
                "fewer bits or calibrate=False."
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}.")
        self._check_dependent_options()

    @classmethod
    def from_saved(cls, fields: Mapping[str, Any]) -> S2AConfig:
        """The config an adapter file or a checkpoint holds. An option saved without the
        setting it acts under (:data:`DEPENDENT_OPTIONS`: accepted until 2026-12-07, and it
        did nothing) is dropped, so that files written then still load."""
        fields = dict(fields)
        dependent = {entry[0] for entry in DEPENDENT_OPTIONS}
        rest = cls(**{k: v for k, v in fields.items() if k not in dependent})
        for name, _, holds, _ in DEPENDENT_OPTIONS:
            if not holds(rest):
                fields.pop(name, None)
        return cls(**fields)

    def _check_dependent_options(self) -> None:
        """An option set without the setting it acts under would do nothing: said, not
        ignored (:data:`DEPENDENT_OPTIONS`)."""
        for name, under, holds, fix in DEPENDENT_OPTIONS:
            value = getattr(self, name)
            if value != type(self).__dataclass_fields__[name].default and not holds(self):
                raise ValueError(
                    f"{name}={value!r} acts only {under}, which this config lacks (modules="
                    f"{list(self.modules)}, backend={self.backend!r}). "
                    f"{fix[0].upper()}{fix[1:]}, or leave {name} out."
                )

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


def _is_int(value: Any) -> bool:
    """A real ``int``: not a bool (``True == 1``) and not a float (``4.0 == 4``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    """A list, tuple or other sequence that is not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


__all__ = [
    "BACKENDS",
    "MODULE_KINDS",
    "SIDE_KINDS",
    "SIDE_MERGES",
    "SUPPORTED_BITS",
    "S2AConfig",
    "check_field_names",
]


#: Fields that change the function the model computes; the rest change only how saved
#: tensors are stored (bits, backend, calibration...), which a resumed run may change.
#: ``input_size`` only sizes prompts: another size fails the strict load of their shapes.
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
