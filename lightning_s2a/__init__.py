"""lightning_s2a: fine-tune frozen backbones with S2A (Structure to Activation).

Train only small activation modules and keep the tensors that backward needs in 4 bits,
with derivative-aware codes for the nonlinearities. One entry point: :func:`apply_s2a`.
"""

from .api import S2AHandle, apply_s2a
from .config import S2AConfig

__all__ = ["S2AConfig", "S2AHandle", "apply_s2a"]
__version__ = "0.1.0"
