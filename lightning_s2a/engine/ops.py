"""The operator table: which torch function is which kind of saved-tensor producer.

Everything the engine knows about operators lives here, keyed by the function's ``__name__``
(so ``F.gelu``, ``torch.sigmoid``, ``Tensor.sigmoid`` and in-place ``relu_`` all resolve the
same way, whether called from an ``nn`` module, timm, HF transformers, or bare user code).

* :data:`OP_KINDS` maps a function name to an *operator kind* ("softmax", "norm", ...). The
  quantizer for each kind is chosen in :mod:`.quantizers`.
* :data:`ELEMENTWISE` (defined in :mod:`.elementwise`) maps elementwise nonlinearities to an
  :class:`ElementwiseSpec`: what the op saves (its input or its output) and the derivative
  as a function of that saved value, which the derivative-aware codes approximate. Ops whose
  derivative takes at most two values (ReLU, LeakyReLU, ReLU6, hardsigmoid, threshold,
  clamp, hard- and softshrink, PReLU with a frozen slope, RReLU in eval) carry an exact
  1-bit ``mask``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .elementwise import ELEMENTWISE, Derivative, ElementwiseSpec, call_arg

__all__ = [
    "ELEMENTWISE",
    "KINDS",
    "OP_KINDS",
    "POSITION_OPERANDS",
    "Derivative",
    "ElementwiseSpec",
    "call_arg",
    "canonical_name",
    "elementwise_spec",
    "is_bias",
]

#: Non-elementwise operators: function name -> operator kind.
OP_KINDS: dict[str, str] = {
    **{n: "softmax" for n in ("softmax", "_softmax")},
    **{
        n: "norm"
        for n in (
            "layer_norm",
            "native_layer_norm",
            "group_norm",
            "native_group_norm",
            "batch_norm",
            "native_batch_norm",
            "instance_norm",
            "rms_norm",
        )
    },
    **{
        n: "attention"
        for n in ("scaled_dot_product_attention", "multi_head_attention_forward", "flex_attention")
    },
    **{
        n: "matmul"
        for n in ("matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum", "baddbmm")
    },
    **{n: "dropout" for n in ("dropout", "dropout1d", "dropout2d", "dropout3d")},
    # Losses, and the log-probabilities they are made of: what they save sits after the
    # trainable head (HF models compute their loss inside forward, ``labels=``), is batch x
    # classes for a classifier, and their gradient bends with any code (cosine 0.94 at 4 bits):
    # kept exact unless op_bits names "loss" (a dense per-pixel loss is large).
    **{
        n: "loss"
        for n in (
            "cross_entropy",
            "nll_loss",
            "log_softmax",
            "_log_softmax",
            "log_sigmoid",
            "logsigmoid",
            "binary_cross_entropy",
            "binary_cross_entropy_with_logits",
            "kl_div",
            "mse_loss",
            "l1_loss",
            "smooth_l1_loss",
            "huber_loss",
            "soft_margin_loss",
            "multilabel_soft_margin_loss",
            "multilabel_margin_loss",
            "multi_margin_loss",
            "poisson_nll_loss",
            "gaussian_nll_loss",
            "cosine_embedding_loss",
            "margin_ranking_loss",
            "hinge_embedding_loss",
            "triplet_margin_loss",
            "triplet_margin_with_distance_loss",
            "ctc_loss",
        )
    },
    # Backwards that divide by their saved inputs' squared norm (1 / (x^2 + y^2)): a code
    # moves a point near the origin a long way (a reviewer's atan2 of two feature maps:
    # biases before it 100-158% off at 4 bits, 18-24% at 8). Kept exact unless asked.
    **{n: "singular" for n in ("atan2", "arctan2", "hypot")},
    # What samples its input at a grid it is given: the grid is kind "position" (see
    # POSITION_OPERANDS), the input what any op saves.
    **{n: "generic" for n in ("grid_sample", "grid_sampler", "grid_sampler_2d", "grid_sampler_3d")},
    **{
        n: "linear"
        for n in (
            "linear",
            "conv1d",
            "conv2d",
            "conv3d",
            "conv_transpose1d",
            "conv_transpose2d",
            "conv_transpose3d",
            "addmm",
        )
    },
}

#: Operand (position, keyword) that says where an op samples its input: the sampling grid of
#: ``grid_sample``, saved for its backward as kind "position". Coded, it moved every sample
#: (min-max groups mix x and y; a step of up to a pixel at 32 px): a bias before a spatial
#: transformer's ``grid_sample`` 34% off at 4 bits, 127% with offsets computed from the
#: features (deformable sampling). Kept exact unless ``op_bits`` names "position": it is
#: 2 values per sample against the input's C channels.
POSITION_OPERANDS: dict[str, tuple[int, str]] = {
    "grid_sample": (1, "grid"),
    "grid_sampler": (1, "grid"),
    "grid_sampler_2d": (1, "grid"),
    "grid_sampler_3d": (1, "grid"),
}

#: Every operator kind the engine can report, in display order. "elementwise" covers
#: :data:`ELEMENTWISE`; "mask" is any boolean tensor; "trainable" is an activation that feeds
#: a trainable weight's gradient; "loss" what a loss function saves (kept exact unless
#: ``op_bits`` names it); "fused_attention" the query, key, value and output a fused attention
#: saves (its backward recomputes the probabilities: 8 bits unless ``op_bits`` names it);
#: "custom" what a user's own ``torch.autograd.Function`` saves with
#: ``ctx.save_for_backward`` (its operator cannot be seen: kept exact unless ``op_bits`` names
#: it); "position" a sampling grid (:data:`POSITION_OPERANDS`) and "singular" what an op
#: whose backward divides by its inputs' squared norm saves (``atan2``, ``hypot``), both kept
#: exact unless ``op_bits`` names them; "sampled" the input of an op sampling it at a grid
#: that trains (deformable sampling: the grid's gradient is a difference of neighbouring
#: input values, 12% off at 4 bits for a bias before it, 2% at 8), at least 8 bits unless
#: ``op_bits`` names it; "generic" any other operator's saved tensors.
KINDS: tuple[str, ...] = (
    "elementwise",
    "mask",
    "softmax",
    "norm",
    "attention",
    "fused_attention",
    "matmul",
    "dropout",
    "linear",
    "trainable",
    "loss",
    "custom",
    "position",
    "sampled",
    "singular",
    "generic",
)


def canonical_name(func: Any) -> str:
    """The table key of a torch function: its ``__name__`` without the in-place underscore."""
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


def elementwise_spec(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> ElementwiseSpec | None:
    """The :class:`ElementwiseSpec` for a call, or None if ``func`` is not elementwise."""
    raw = getattr(func, "__name__", "")
    factory = ELEMENTWISE.get(canonical_name(func))
    return None if factory is None else factory(raw, args, kwargs)


def is_bias(name: str) -> bool:
    """True for a bias parameter: what BitFit trains, and whose gradient needs no saved
    activation (so its op's inputs are not kept exact for it).

    That is ``*.bias``, ``nn.MultiheadAttention``'s packed query/key/value bias
    ``in_proj_bias`` and its ``bias_k``/``bias_v`` (``add_bias_kv=True``: the bias PyTorch
    appends to the key and value sequences), the separate ``q_bias``/``k_bias``/``v_bias``
    of timm's BEiT and EVA attention (additive biases of their input projections; left
    frozen, bias tuning of such models would silently not be BitFit), and the recurrent
    layers' biases: ``bias_ih_l0``, ``bias_hh_l1``, ``bias_ih_l0_reverse`` (nn.RNN, nn.LSTM,
    nn.GRU) and ``bias_ih``, ``bias_hh`` (their cells).
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("bias", "in_proj_bias", "bias_k", "bias_v", "q_bias", "k_bias", "v_bias"):
        return True
    if not leaf.startswith(("bias_ih", "bias_hh")):
        return False
    layer = leaf[len("bias_ih") :]
    if not layer:  # a cell's
        return True
    layer = layer.removesuffix("_reverse")
    return layer.startswith("_l") and layer[2:].isdecimal()
