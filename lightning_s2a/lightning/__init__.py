"""The Lightning layer: a thin callback and strategies around :func:`lightning_s2a.apply_s2a`."""

from .callback import S2ACallback
from .strategy import S2ADDPStrategy, S2AStrategy, register

register()

__all__ = ["S2ACallback", "S2ADDPStrategy", "S2AStrategy"]
