"""Fused attention's saved tensors: which of them its backward recomputes the probabilities
from (they keep 8 bits, kind ``fused_attention``), and which arguments are masks rather than
data for the statistics rule, and which saved tensors are its statistics (the log-sum-exp).
Read by :func:`.recognition.classify` and the pack path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .recognition import Call

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
        found.add((t.data_ptr(), _unbatched(t.shape)))
        found.add((t.dtype, _unbatched(t.shape)))
        shapes.append(tuple(t.shape))
    (*batch, length, _), value = shapes[0], shapes[2]
    found.add((None, _unbatched((*batch, length, value[-1]))))
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        found.add((mask.data_ptr(), _unbatched(mask.shape)))
        found.add((mask.dtype, _unbatched(mask.shape)))  # autocast's cast of it
    return frozenset(found)


def _unbatched(shape: tuple | torch.Size) -> tuple:
    """``shape`` without leading 1s: the CPU kernel saves 3-D ``(B, L, E)`` arguments as
    ``(1, B, L, E)`` views, and they were missed (coded at 4 bits: q and k bias gradients
    at cosine 0.59 with a scale of 3)."""
    shape = tuple(shape)
    start = 0
    while start < len(shape) - 1 and shape[start] == 1:
        start += 1
    return shape[start:]


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
    shape = _unbatched(t.shape)
    if (t.data_ptr(), shape) in fused or (None, shape) in fused or (ALL, None) in fused:
        return True
    return any(
        isinstance(key, torch.dtype) and key != t.dtype and size == shape for key, size in fused
    )


#: CUDA's memory-efficient attention pads its log-sum-exp's query dimension to a multiple of
#: this (PyTorch's ``kAlignLSE``).
LSE_ALIGN = 32


def statistics(t: torch.Tensor, call: Call) -> bool:
    """True for reduced statistics of a norm or attention op (see ``STATS_KINDS``): a shape
    none of its data has, and fewer elements than the largest. For attention, the log-sum-exp
    is told by its own shapes (one value per query row and head, the rows padded or not: see
    :func:`attention_shapes`), and its query, key, value and output, split into heads, by their
    element counts, never statistics: measured against the largest operand alone,
    cross-attention's shorter side (the query and output of 100 queries over 850 keys, or the
    key and value of 100 keys under 850 queries) was kept whole instead of at 8 bits. Other
    tensors smaller than the largest operand (a float mask smaller than the query) stay
    statistics."""
    shape = tuple(t.shape)
    if shape in call.arg_shapes:
        return False
    if call.lse is not None:
        if shape in call.lse:
            return True
        if t.numel() in call.data_numels:  # the query, key, value or output, split into heads
            return False
    return t.numel() < call.arg_numel


def attention_shapes(raw: str, args: tuple, kwargs: dict) -> tuple[frozenset, frozenset] | None:
    """``(log-sum-exp shapes, data element counts)`` of an attention call. The log-sum-exp
    has one value per query row and head: ``(*batch, heads, rows)``, the rows padded to
    :data:`LSE_ALIGN` or not, with or without a trailing 1 (cuDNN). The data are the query,
    key, value and output, whatever their split into heads. None where the query, key and
    value are not read."""
    query = kwargs.get("query", args[0] if args else None)
    key = kwargs.get("key", args[1] if len(args) > 1 else None)
    value = kwargs.get("value", args[2] if len(args) > 2 else None)
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key, value)):
        return None
    if raw == "multi_head_attention_forward":  # (N, B, E) or (N, E), seq first, projected
        heads = kwargs.get("num_heads", args[4] if len(args) > 4 else None)
        if not isinstance(heads, int) or heads < 1:
            return None
        rows, width = query.shape[0], query.shape[-1]
        batch = query.shape[1] if query.dim() == 3 else 1
        lead: tuple[int, ...] = (batch, heads)
        data = {rows * batch * width, key.shape[0] * batch * width}
    else:  # (..., N, D)
        rows, lead = query.shape[-2], tuple(query.shape[:-2])
        out = query.numel() // query.shape[-1] * value.shape[-1]
        data = {query.numel(), key.numel(), value.numel(), out}
    padded = -(-rows // LSE_ALIGN) * LSE_ALIGN
    lse = {(*lead, rows), (*lead, padded), (*lead, rows, 1), (*lead, padded, 1)}
    # The CPU kernel's 3-D arguments get a leading 1, their log-sum-exp too: (1, B, L). It
    # was coded at 4 bits where B * L happened to be a data tensor's size (cross-attention
    # of 512 queries over 64 keys of 8: q and v bias gradients 5% off).
    lse |= {(1, *shape) for shape in lse}
    return frozenset(lse), frozenset(data)
