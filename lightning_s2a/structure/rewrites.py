"""Every exact memory-saving rewrite, in one table keyed by torch function name.

The engine calls these in place of the original function while a model's forward runs; each
returns ``NotImplemented`` where it does not apply, and the original call runs instead.
"""

from __future__ import annotations

from .frozen_ops import FROZEN_REWRITES, Rewrite
from .pool_ops import compact_max_pool2d

REWRITES: dict[str, Rewrite] = {**FROZEN_REWRITES, "max_pool2d": compact_max_pool2d}
