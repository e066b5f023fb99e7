"""The activation-compression engine: saved-tensor hooks and per-operator quantizers.

It knows nothing of Lightning; :func:`lightning_s2a.apply_s2a` is how it is used.
"""

from .hooks import SavedTensorEngine

__all__ = ["SavedTensorEngine"]
