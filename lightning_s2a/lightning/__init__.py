"""The Lightning layer: a thin callback and strategies around :func:`lightning_s2a.apply_s2a`."""

from .callback import S2ACallback
from .checkpoint import load_from_checkpoint
from .strategy import S2ADDPStrategy, S2AStrategy, register

register()

__all__ = ["S2ACallback", "S2ADDPStrategy", "S2AStrategy", "load_from_checkpoint"]
