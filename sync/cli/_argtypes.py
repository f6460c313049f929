"""Argument types shared by several commands (argparse ``type=`` callables): standard library only."""

from __future__ import annotations

import argparse
import math

__all__ = ["seconds"]


def seconds(text: str) -> float:
    """A positive, finite number of seconds. As a job file's ``request_timeout`` or ``wait.interval``: a pause or
    time-out of 0 (or less) polled without a break or meant none at all, and NaN slept forever."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value
