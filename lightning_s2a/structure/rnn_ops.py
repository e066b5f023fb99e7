"""Recurrent layers on PyTorch's own kernels while the engine compresses.

On CPU, ``nn.LSTM``/``nn.GRU``/``nn.RNN`` run on oneDNN, and on CUDA on cuDNN. Both save for
backward an opaque ``uint8`` workspace that no code can hold, so it was kept whole: in
sequencer2d_s (timm's LSTM-based model) 568 of the 621 MiB saved per step, and compression
stopped at 1.2x. PyTorch's own kernels compute the same recurrence and save its gates and
states as floating tensors, which the engine codes like any activation (5.0x there, gradient
cosine 1.0000 to the uncompressed run). The rewrite runs the call with oneDNN and cuDNN off,
and puts both switches back as they were. The price is speed: PyTorch's CPU kernels ran 2 to
7 times slower than oneDNN's on one thread (batch 16, hidden 256).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .frozen_ops import Rewrite

_lock = threading.Lock()
_depth = 0
_switches: tuple[bool, bool] = (True, True)


def native_rnn(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` without oneDNN and cuDNN (see module
    docstring); ``NotImplemented`` outside autograd, where nothing is saved.

    The switches are global to the process: calls in several threads share one "off"
    period (the first in saves the switches, the last out restores them), during which
    other threads' operators run without oneDNN and cuDNN too."""
    if not torch.is_grad_enabled():
        return NotImplemented
    _switch_off()
    try:
        return func(*args, **kwargs)
    finally:
        _switch_back()


def _switch_off() -> None:
    global _depth, _switches
    with _lock:
        if _depth == 0:
            _switches = (torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled())
            torch._C._set_mkldnn_enabled(False)
            torch._C._set_cudnn_enabled(False)
        _depth += 1


def _switch_back() -> None:
    global _depth
    with _lock:
        _depth -= 1
        if _depth == 0:
            torch._C._set_mkldnn_enabled(_switches[0])
            torch._C._set_cudnn_enabled(_switches[1])


RNN_REWRITES: dict[str, Rewrite] = dict.fromkeys(
    ("lstm", "gru", "rnn_tanh", "rnn_relu"), native_rnn
)
"""Rewrites keyed by the intercepted torch function's ``__name__``."""
