"""Recurrent layers on PyTorch's own kernels while the engine compresses.

On CPU, ``nn.LSTM``/``nn.GRU``/``nn.RNN`` run on oneDNN, and on CUDA on cuDNN. Both save for
backward an opaque ``uint8`` workspace that no code can hold, so it was kept whole: in
sequencer2d_s (timm's LSTM-based model) 568 of the 621 MiB saved per step, and compression
stopped at 1.2x. PyTorch's own kernels compute the same recurrence and save its gates and
states as floating tensors, which the engine codes like any activation (5.0x there, gradient
cosine 1.0000 to the uncompressed run). The rewrite runs the call with oneDNN and cuDNN off,
and puts both switches back as they were.
"""

from __future__ import annotations

from typing import Any

import torch

from .frozen_ops import Rewrite


def native_rnn(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` without oneDNN and cuDNN (see module
    docstring); ``NotImplemented`` outside autograd, where nothing is saved."""
    if not torch.is_grad_enabled():
        return NotImplemented
    mkldnn, cudnn = torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    try:
        return func(*args, **kwargs)
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)


RNN_REWRITES: dict[str, Rewrite] = dict.fromkeys(
    ("lstm", "gru", "rnn_tanh", "rnn_relu"), native_rnn
)
"""Rewrites keyed by the intercepted torch function's ``__name__``."""
