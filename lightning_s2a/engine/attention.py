"""Fused attention's saved tensors: which of them its backward recomputes the probabilities
from (they keep 8 bits, kind ``fused_attention``), and which arguments are masks rather than
data for the statistics rule. Read by :func:`.recognition.classify` and the pack path."""

from __future__ import annotations

import torch

#: Keyword arguments of attention ops that are masks, not data (see ``classify``).
ATTENTION_MASKS = ("attn_mask", "key_padding_mask")

#: Attention ops whose backward recomputes ``softmax(q k^T)`` from the saved query and key.
FUSED_ATTENTION = ("scaled_dot_product_attention", "flex_attention")


def fused_operands(args: tuple, kwargs: dict) -> frozenset:
    """``(data_ptr, shape)`` of a fused attention's query, key and value (positional or
    keyword), and ``(None, shape)`` of its output: what its backward reads besides the
    log-sum-exp (kept exact as a statistic).

    That backward recomputes the probabilities as ``exp(q k^T s - lse)`` from the saved query
    and key and the exact log-sum-exp, and takes ``D = rowsum(dO * out)`` from the saved
    output where the value gives ``dP = dO v^T``; it then uses ``P * (dP - D)``, a difference
    that peaked attention makes small. Codes' error in the query and key enters through the
    exponential, and codes of the output and value that disagree enter through that
    difference: at 4 bits a reviewer's timm ViT with attention as peaked as a pretrained one
    (mean top probability 0.52, 0.74) lost its gradient (backbone cosine 0.89, 0.55; 8 bits
    for query and key alone gave 0.98, 0.86; for all four, 0.999, 0.998). An unfused attention
    saves ``q`` and ``k`` for a matmul and the probabilities for the softmax, where error
    enters linearly.

    A float mask is added to the logits before that exponential and is read the same way
    (a Swin-style bias and shift mask: backbone cosine 0.62 at 4 bits), so it is named too.
    Under autocast the kernel saves its own casts of fp32 inputs, whose addresses are not the
    arguments': a tensor of an argument's shape in another dtype is taken for its cast
    (cross-attention's key and value were missed). ``nn.MultiheadAttention`` without
    attention weights runs SDPA inside one call the mode sees whole: everything it saves but
    statistics is named (``(ALL, None)``; torchvision's ViT kept 4 bits: cosine 0.016).
    """
    found: set[tuple] = set()
    shapes = []
    for position, name in ((0, "query"), (1, "key"), (2, "value")):
        t = args[position] if len(args) > position else kwargs.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            return frozenset()
        found.add((t.data_ptr(), tuple(t.shape)))
        found.add((t.dtype, tuple(t.shape)))
        shapes.append(tuple(t.shape))
    (*batch, length, _), value = shapes[0], shapes[2]
    found.add((None, (*batch, length, value[-1])))
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        found.add((mask.data_ptr(), tuple(mask.shape)))
        found.add((mask.dtype, tuple(mask.shape)))  # autocast's cast of it
    return frozenset(found)


#: In :func:`fused_operands`' set: every tensor the call saves (an MHA without weights).
ALL = "all"


def attention_without_weights(args: tuple, kwargs: dict) -> frozenset:
    """:func:`fused_operands` of ``F.multi_head_attention_forward``: everything it saves
    where it runs SDPA (``need_weights=False``); nothing where it computes and returns the
    probabilities (they are saved by a softmax, and error enters linearly)."""
    need_weights = kwargs.get("need_weights", args[15] if len(args) > 15 else True)
    return frozenset() if need_weights else frozenset({(ALL, None)})


def fused_operand(t: torch.Tensor, fused: frozenset) -> bool:
    """True for a tensor a fused attention saves that :func:`fused_operands` names: its
    query, key, value or float mask (or autocast's cast of them), or a tensor of its output's
    shape (the output; also the probabilities of a math fallback where they have that shape,
    then coded wider than they need)."""
    shape = tuple(t.shape)
    if (t.data_ptr(), shape) in fused or (None, shape) in fused or (ALL, None) in fused:
        return True
    return any(
        isinstance(key, torch.dtype) and key != t.dtype and size == shape for key, size in fused
    )
