"""argparse `type=` checkers shared by the option modules: one message per kind of value."""
from __future__ import annotations

import argparse


def positive_int(value: str) -> int:
    """A whole number >= 1 (counts, steps, every-N intervals)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    """A whole number >= 0 (step numbers where 0 is the start)."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return number


def fraction(value: str) -> float:
    """A number from 0 to 1 (strengths, rescale factors)."""
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number
