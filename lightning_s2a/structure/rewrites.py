"""Every exact rewrite, in two tables keyed by torch function name.

The engine calls these in place of the original function while a model's forward runs; each
returns ``NotImplemented`` where it does not apply, and the original call runs instead.
:data:`REWRITES` save memory and come with the structural surgery (``S2AConfig.surgery``);
:data:`COMPRESS_REWRITES` keep gradients right under compression and come with it
(``S2AConfig.compress``).
"""

from __future__ import annotations

from .extremum_ops import EXTREMUM_REWRITES
from .frozen_ops import FROZEN_REWRITES, Rewrite
from .pool_ops import compact_max_pool2d

REWRITES: dict[str, Rewrite] = {**FROZEN_REWRITES, "max_pool2d": compact_max_pool2d}
COMPRESS_REWRITES: dict[str, Rewrite] = dict(EXTREMUM_REWRITES)


def rewrites_for(surgery: bool, compress: bool) -> dict[str, Rewrite]:
    """The rewrites a model's forward needs under these config switches."""
    return {**(REWRITES if surgery else {}), **(COMPRESS_REWRITES if compress else {})}
