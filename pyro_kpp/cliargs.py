"""argparse types shared by the CLIs: bad values are refused at parse time, naming the ``--flag``.

A float option accepts "nan" and "inf" from ``float`` itself; none of ours has a use for
them (a NaN learning rate or noise level silently ruins a run or disables a check).
"""
from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A finite number (argparse reports ``argument --flag: ...`` with our message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
