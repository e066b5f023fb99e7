"""``lightning-s2a bench``: S2A against the alternatives, side by side, one process per method."""

import argparse


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--steps 0`` failed after building
    every model, in the statistics of no steps)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0 (``--warmup -1`` timed one step fewer
    than the header said, and ``--warmup -3`` failed after building the model)."""
    return _whole_number(text, 0)
