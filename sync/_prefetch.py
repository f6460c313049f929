"""One item made ahead on a worker thread: the overlap of polars/Arrow work (which releases the GIL) with the
Python work of the caller on a second core."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["ahead"]

_T = TypeVar("_T")
_END = object()


def ahead(items: Iterable[_T], *, thread_name: str = "pushsync-ahead") -> Generator[_T, None, None]:
    """``items``, each next one made on a worker thread while the caller uses the current one.

    For items whose making is polars or Arrow work (reading, decoding, selecting, encoding: the GIL is released)
    and whose use is partly Python: the two overlap on two cores. At most one item is made ahead, so memory holds
    two; closing the iterator early waits for the one under way. An exception raised making an item is raised
    here, in the caller's thread."""
    source = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix=thread_name) as pool:
        pending = pool.submit(next, source, _END)
        while True:
            item = pending.result()
            if item is _END:
                return
            pending = pool.submit(next, source, _END)
            yield item  # type: ignore[misc]
