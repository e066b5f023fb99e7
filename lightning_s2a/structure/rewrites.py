"""Every exact rewrite, in two tables keyed by torch function name.

The engine calls these in place of the original function while a model's forward runs; each
returns ``NotImplemented`` where it does not apply, and the original call runs instead.
:data:`REWRITES` save memory and come with the structural surgery (``S2AConfig.surgery``);
:data:`COMPRESS_REWRITES` keep gradients right under compression, or keep what backward saves
codable (recurrent layers), and come with it (``S2AConfig.compress``).
:data:`FOUR_BIT_REWRITES` keep 4-bit frozen weights (``S2AConfig(frozen_dtype="nf4")``) out of
what backward saves.
"""

from __future__ import annotations

from typing import Any

from .compare_ops import COMPARE_REWRITES, routed_pair
from .extremum_ops import EXTREMUM_REWRITES, masked_extremum
from .four_bit import four_bit_linear
from .frozen_ops import FROZEN_REWRITES, Rewrite
from .periodic_ops import PERIODIC_REWRITES
from .pool_ops import compact_max_pool2d, shape_only_avg_pool2d
from .rnn_ops import RNN_REWRITES
from .sign_ops import SIGN_REWRITES

REWRITES: dict[str, Rewrite] = {
    **FROZEN_REWRITES,
    "max_pool2d": compact_max_pool2d,
    "avg_pool2d": shape_only_avg_pool2d,
}


class FirstOf:
    """One rewrite trying ``rewrites`` in turn, for a name with several forms (``max(x)``
    reduces, ``max(a, b)`` compares): the first that does not decline. A class, not a
    closure: the engine's tables are pickled with the model (``ddp_spawn``, ``deepcopy``)."""

    def __init__(self, *rewrites: Rewrite) -> None:
        self.rewrites = rewrites

    def __call__(self, func: Any, args: tuple, kwargs: dict) -> Any:
        for r in self.rewrites:
            result = r(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return NotImplemented


COMPRESS_REWRITES: dict[str, Rewrite] = {
    **COMPARE_REWRITES,
    **EXTREMUM_REWRITES,
    **{name: FirstOf(masked_extremum, routed_pair) for name in ("max", "min")},
    **PERIODIC_REWRITES,
    **SIGN_REWRITES,
    **RNN_REWRITES,
}
FOUR_BIT_REWRITES: dict[str, Rewrite] = {"linear": four_bit_linear}


def rewrites_for(surgery: bool, compress: bool, four_bit: bool = False) -> dict[str, Rewrite]:
    """The rewrites a model's forward needs under these config switches (4-bit convs go
    through the surgery's frozen conv, which the config requires with 4-bit weights)."""
    return {
        **(REWRITES if surgery else {}),
        **(COMPRESS_REWRITES if compress else {}),
        **(FOUR_BIT_REWRITES if four_bit else {}),
    }
