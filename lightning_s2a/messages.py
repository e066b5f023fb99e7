"""Wording shared by the warnings and errors that name parts of a model."""

from __future__ import annotations

from collections.abc import Sequence


def some_names(names: Sequence[str], limit: int = 3) -> str:
    """The first ``limit`` names and how many more there are ("a, b, c and 4 more"): a
    message that lists layers stays readable for a model with hundreds of them."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
