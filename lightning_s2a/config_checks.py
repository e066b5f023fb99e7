"""What values each :class:`~lightning_s2a.config.S2AConfig` field allows, and the check
that a config is whole: every field's value and type, and the options that act only under
another setting (:data:`DEPENDENT_OPTIONS`). Kept apart from the dataclass, which reads as the
list of what S2A can be asked to do."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .engine.bitpack import check_bits
from .engine.calibration import WIDE_BITS
from .engine.ops import KINDS

if TYPE_CHECKING:
    from .config import S2AConfig

MODULE_KINDS = ("bias", "prompt", "side")
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
_SIDE = "use modules=['side']"
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
    ("side", "with the 'side' module (it chooses its kind)", _trains("side"), _SIDE),
    ("side_merge", "with the 'side' module (it says what its output does)", _trains("side"), _SIDE),
    (
        "side_strides",
        "with side='hierarchical' (they set its pyramid)",
        lambda config: config.side == "hierarchical",
        "set side='hierarchical'",
    ),
    ("blocks", _PLACED, _trains("prompt", "side"), "add 'prompt' or 'side' to modules"),
    ("block_layout", _PLACED, _trains("prompt", "side"), "add 'prompt' or 'side' to modules"),
    (
        "bnb_quant_type",
        "with backend='bnb' (the other backends code min-max)",
        lambda config: config.backend == "bnb",
        "set backend='bnb'",
    ),
)


def validate(config: S2AConfig) -> None:
    """Check (and normalise: lists to tuples, ``"bias+prompt"`` to its kinds) every field of
    ``config``, raising a ``ValueError`` that names the field and what it allows."""
    check_bits(config.bits, "bits")
    if isinstance(config.modules, str):
        config.modules = (config.modules,)
    if _is_sequence(config.modules) and all(isinstance(m, str) for m in config.modules):
        # "bias+prompt", "bias, prompt" and ["bias+prompt"] (the CLI's [bias+prompt]) alike
        parts = (p.strip() for m in config.modules for p in m.replace("+", ",").split(","))
        config.modules = tuple(p for p in parts if p)
    if not _is_sequence(config.modules):
        raise ValueError(
            f"modules: expected a list of module kinds or a string such as 'bias+prompt', "
            f"got {config.modules!r}; allowed: {MODULE_KINDS}."
        )
    config.modules = tuple(config.modules)
    for m in config.modules:
        if m not in MODULE_KINDS:
            raise ValueError(f"modules: unknown module kind {m!r}; allowed: {MODULE_KINDS}.")
    if len(set(config.modules)) != len(config.modules):
        raise ValueError(f"modules: {config.modules!r} lists a module kind twice.")
    check_composition(config.modules)
    if not config.modules:
        raise ValueError(f"modules: choose at least one of {MODULE_KINDS}.")
    if config.head is not None and (not isinstance(config.head, str) or not config.head):
        raise ValueError(
            f"head: {config.head!r} ({type(config.head).__name__}) is not a submodule name; "
            "allowed: 'auto', the name of a submodule such as 'fc', or None for no head."
        )
    for name in ("head", "frozen_dtype"):  # --s2a.head None on the command line
        if getattr(config, name) in ("None", "none"):
            raise ValueError(
                f"{name}: {getattr(config, name)!r} is the string; for None write null (YAML "
                f"and the command line: --s2a.{name} null) or None in Python."
            )
    for name in ("compress", "stochastic_rounding", "add_bias", "surgery", "calibrate"):
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(
                f"{name}: {value!r} ({type(value).__name__}) is not a bool; allowed: True, False."
            )
    if not isinstance(config.op_bits, Mapping):
        raise ValueError(
            f"op_bits: expected a mapping from operator kind to code width, e.g. "
            f"{{'softmax': 8}}, got {config.op_bits!r}."
        )
    config.op_bits = dict(config.op_bits)
    for kind, b in config.op_bits.items():
        if kind not in KINDS:
            raise ValueError(f"op_bits: unknown operator kind {kind!r}; allowed: {KINDS}.")
        if kind == "trainable":
            raise ValueError(
                "op_bits['trainable']: the width of activations that feed a trainable "
                "weight's gradient is trainable_input_bits (None keeps them exact); set "
                f"S2AConfig(trainable_input_bits={b!r}) instead."
            )
        check_bits(b, f"op_bits[{kind!r}]")
    if config.trainable_input_bits is not None:
        check_bits(config.trainable_input_bits, "trainable_input_bits")
    if config.backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {config.backend!r}; allowed: {BACKENDS}.")
    # Checked whatever the backend, so a typo is not silently ignored until "bnb" is chosen.
    if config.bnb_quant_type not in BNB_QUANT_TYPES:
        raise ValueError(
            f"bnb_quant_type: {config.bnb_quant_type!r} is not one of {BNB_QUANT_TYPES}."
        )
    if config.backend == "bnb" and config.bits != 4:
        raise ValueError(
            f"bits={config.bits} with backend='bnb': bitsandbytes quantizes in 4 bits only; "
            "use bits=4 or backend='torch'."
        )
    if not _is_int(config.group_size):
        raise ValueError(
            f"group_size: {config.group_size!r} ({type(config.group_size).__name__}) is not an "
            f"int; allowed: {GROUP_SIZES}."
        )
    if config.group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: {config.group_size} is not one of {GROUP_SIZES}.")
    if config.backend == "bnb" and config.group_size < 32:
        raise ValueError(
            f"group_size={config.group_size} with backend='bnb': bitsandbytes codes blocks of "
            "32 or more values; use group_size >= 32 or backend='torch'."
        )
    if config.frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype: {config.frozen_dtype!r} is not one of {FROZEN_DTYPES}.")
    if config.frozen_dtype in FOUR_BIT_DTYPES and not config.surgery:
        raise ValueError(
            f"frozen_dtype={config.frozen_dtype!r} needs surgery=True: the frozen-conv rewrite "
            "is what keeps each conv's weight in 4 bits through backward."
        )
    if config.bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode: {config.bn_mode!r} is not one of {BN_MODES}.")
    if config.block_layout not in LAYOUTS:
        raise ValueError(f"block_layout: {config.block_layout!r} is not one of {LAYOUTS}.")
    if config.side_width is not None and (not _is_int(config.side_width) or config.side_width < 2):
        raise ValueError(
            f"side_width: must be an integer of at least 2 or None, got {config.side_width!r} "
            "(the side network normalizes over its width: at width 1 its output is the "
            "same for every input)."
        )
    if config.side not in SIDE_KINDS:
        raise ValueError(f"side: {config.side!r} is not one of {SIDE_KINDS}.")
    if config.side_merge not in SIDE_MERGES:
        raise ValueError(f"side_merge: {config.side_merge!r} is not one of {SIDE_MERGES}.")
    config.side_strides = strides = _as_tuple(config.side_strides)
    if not _positive_ints(strides) or list(strides) != sorted(set(strides)):
        raise ValueError(
            f"side_strides: expected increasing positive integers, finest first, e.g. "
            f"(8, 16, 32), got {config.side_strides!r}."
        )
    if config.input_size is not None:
        config.input_size = _as_tuple(config.input_size)
        if not _positive_ints(config.input_size):
            raise ValueError(
                f"input_size: expected the shape of one sample, e.g. (3, 224, 224), "
                f"got {config.input_size!r}."
            )
    if config.blocks is not None:
        config.blocks = _as_tuple(config.blocks)
        names = (config.blocks,) if isinstance(config.blocks, str) else config.blocks
        if (
            not isinstance(names, tuple)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise ValueError(
                f"blocks: expected a pattern such as 'encoder.layer.*' or a list of module "
                f"names, got {config.blocks!r}; allowed: a non-empty str, a non-empty list of "
                "non-empty str, or None."
            )
    for name in (
        "min_numel",
        "codebook_samples",
        "codebook_refresh",
        "prompt_rank",
        "side_reduction",
    ):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}.")
    tol = config.calibrate_tol
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1
    ):
        raise ValueError(
            f"calibrate_tol: expected a relative error between 0 and 1 (exclusive), e.g. "
            f"0.05, or None (scaled to bits), got {tol!r}."
        )
    if config.calibrate and not config.compress:
        raise ValueError(
            "calibrate=True measures the codes' error, but compress=False stores every "
            "saved tensor exact; drop one of them."
        )
    if config.calibrate and min(config.coded_widths()) >= WIDE_BITS:
        raise ValueError(
            f"calibrate=True widens modules to {WIDE_BITS} bits, but every code is "
            f"{WIDE_BITS} bits or more already (bits={config.bits}, op_bits="
            f"{config.op_bits}, trainable_input_bits={config.trainable_input_bits}); use "
            "fewer bits or calibrate=False."
        )
    if not _is_int(config.seed) or config.seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {config.seed!r}.")
    _check_dependent_options(config)


def _check_dependent_options(config: S2AConfig) -> None:
    """An option set without the setting it acts under would do nothing: said, not
    ignored (:data:`DEPENDENT_OPTIONS`)."""
    for name, under, holds, fix in DEPENDENT_OPTIONS:
        value = getattr(config, name)
        if value != type(config).__dataclass_fields__[name].default and not holds(config):
            raise ValueError(
                f"{name}={value!r} acts only {under}, which this config lacks (modules="
                f"{list(config.modules)}, side={config.side!r}, backend={config.backend!r}). "
                f"{fix[0].upper()}{fix[1:]}, or leave {name} out."
            )


def _is_int(value: Any) -> bool:
    """A real ``int``: not a bool (``True == 1``) and not a float (``4.0 == 4``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _as_tuple(value: Any) -> Any:
    """A list or other non-string sequence as a tuple (as dataclass fields compare), anything
    else as it is, for the check that follows to name."""
    return tuple(value) if _is_sequence(value) else value


def _positive_ints(value: Any) -> bool:
    """A non-empty tuple of positive ``int``s (a shape, pyramid strides)."""
    return isinstance(value, tuple) and bool(value) and all(_is_int(v) and v > 0 for v in value)


def _is_sequence(value: Any) -> bool:
    """A list, tuple or other sequence that is not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))
