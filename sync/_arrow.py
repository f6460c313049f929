"""Arrow compute kernels called without importing ``pyarrow.compute``.

``pyarrow.compute`` builds Python wrappers for every kernel when imported (~80 ms): on the way to a lazy run's first
request that is a tenth of the budget. The kernels themselves live in ``pyarrow._compute``; calling them by name
there costs nothing more. A pyarrow that moved that module gets the public wrappers instead.
"""

from __future__ import annotations

from typing import Any

__all__ = ["call"]


def call(name: str, *args: Any) -> Any:
    """The Arrow compute function ``name`` applied to ``args`` (as ``pyarrow.compute.<name>(*args)``)."""
    try:
        from pyarrow._compute import call_function  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - a pyarrow that moved it: the public way
        import pyarrow.compute as pc

        return getattr(pc, name)(*args)
    return call_function(name, list(args))
