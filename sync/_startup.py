"""When each step of the process's start-up was done: marks a run logs at debug level with its first batch
(``run.startup``, docs/run.md), to tell where a slow start went (issue 13).

Standard library only, so that any module on the way to the first request may note its step without importing
more than it did.
"""

from __future__ import annotations

import os
import time

__all__ = ["mark_startup", "startup_marks"]


def _process_age() -> float:
    """Seconds since this process started: from the kernel's record of its start on Linux (to its 10 ms tick),
    else since this module was imported (the interpreter's own start-up and first imports left out)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            # Field 22, counted after the command's closing parenthesis (the command may hold spaces).
            started = int(fh.read().rpartition(b")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
_AGE_AT = _process_age() - (time.perf_counter() - _IMPORTED)
"""The process's age when this module was imported: each mark adds the ``perf_counter`` time since then."""
_MARKS: dict[str, float] = {}


def mark_startup(step: str) -> None:
    """Note that the start-up step ``step`` is done now (its first time only; a dictionary store, so cheap on
    the way to the first request). The run logs the steps at debug level with its first batch:
    :func:`startup_marks`."""
    _MARKS.setdefault(step, _AGE_AT + time.perf_counter() - _IMPORTED)


def startup_marks() -> dict[str, float]:
    """The start-up steps noted so far (:func:`mark_startup`), each as seconds since the process started, in the
    order they happened."""
    return {step: round(at, 3) for step, at in _MARKS.items()}
