"""lightning_s2a: fine-tune frozen backbones with S2A (Structure to Activation).

Train only small activation modules and keep the tensors that backward needs in 4 bits,
with derivative-aware codes for the nonlinearities. One entry point: :func:`apply_s2a`.
"""

from .adapters import load_adapter, save_adapter
from .api import S2AHandle, apply_s2a, get_handle
from .config import S2AConfig
from .lightning import S2ACallback, S2ADDPStrategy, S2AStrategy, load_from_checkpoint

__all__ = [
    "S2ACallback",
    "S2AConfig",
    "S2ADDPStrategy",
    "S2AHandle",
    "S2AStrategy",
    "apply_s2a",
    "get_handle",
    "load_adapter",
    "load_from_checkpoint",
    "save_adapter",
]
__version__ = "0.1.0"
