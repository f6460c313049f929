"""The system's CA certificates, loaded into the HTTP library's TLS contexts only when a run will use them.

aiohttp builds two TLS contexts when ``aiohttp.connector`` is imported — one that verifies certificates
(``ssl=True``, the default) and one that does not (``ssl=False``, a local sandbox's ``verify_tls: false``) — and
each loads the system's CA bundle: ~0.03 s of CPU apiece on the way to a run's first request (issue 13), and
twice that in wall time on a core shared with other work (issue 14). A run against a plain-``http://`` sandbox
uses neither; a run against an ``https://`` platform uses one.

So a ``pushsync run`` process (the command line turns this on: :data:`DEFER`) imports its connector with the
loading of the default verify paths put off (:func:`ca_loading_deferred`): each context made meanwhile, in that
thread, is noted instead. :func:`load_deferred` later loads the CA certificates into the noted contexts of one
kind — the verifying ones, or the others — exactly as their making would have (``set_default_verify_paths``,
which reads ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` then: the user's CA settings hold), before any connection uses
them: the preload does it for the kind its job's ``https`` base URL needs, and every HTTP session does it again
(a no-op by then) before it opens, unless its base URL is plain ``http`` (no TLS at all: redirects are never
followed). A context nobody loaded is never used; were it used, it would refuse every certificate, never accept
one. Other threads calling ``set_default_verify_paths`` meanwhile are not affected.

Standard library only, and ``ssl`` only when used: the command line and the platform registry import this module
before aiohttp is loaded, and a command that makes no request never loads ``ssl``.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

__all__ = ["DEFER", "ca_loading_deferred", "load_deferred", "plain_http"]

DEFER = False
"""Whether the connector is imported with its contexts' CA loading put off (:func:`ca_loading_deferred`). The
command line sets it for ``pushsync run``: a process it owns, whose HTTP sessions all load what they use. Off for
a program that embeds pushsync, whose own aiohttp calls may use aiohttp's default contexts directly."""

_NAME = "set_default_verify_paths"
_lock = threading.Lock()
_deferring: set[int] = set()  # threads importing with the loading put off
_pending: list[tuple[ssl.SSLContext, Callable[[ssl.SSLContext], None]]] = []  # context, its real loader
_own: object = None  # the class attribute installed, while installed
_previous: object = None  # what the class held before (None: it inherited the method)


def plain_http(url: str) -> bool:
    """Whether ``url`` is a plain ``http://`` URL: no TLS context is ever used for it."""
    return urllib.parse.urlsplit(url).scheme == "http"


def _verifies(context: ssl.SSLContext) -> bool:
    import ssl

    return context.verify_mode != ssl.CERT_NONE


@contextmanager
def ca_loading_deferred() -> Iterator[None]:
    """While inside, the TLS contexts made in this thread do not load the default CA certificates: each is noted
    for :func:`load_deferred` instead. Any other thread's contexts load theirs as always. Not to be nested in one
    thread (the preload enters it once, around one import)."""
    global _own, _previous
    import ssl

    me = threading.get_ident()
    with _lock:
        if not _deferring:
            real: Callable[[ssl.SSLContext], None] = getattr(ssl.SSLContext, _NAME)
            _previous = ssl.SSLContext.__dict__.get(_NAME)

            def set_default_verify_paths(context: ssl.SSLContext) -> None:
                if threading.get_ident() not in _deferring:
                    real(context)
                    return
                with _lock:
                    _pending.append((context, real))

            _own = set_default_verify_paths
            setattr(ssl.SSLContext, _NAME, set_default_verify_paths)
        _deferring.add(me)
    try:
        yield
    finally:
        with _lock:
            _deferring.discard(me)
            if not _deferring and ssl.SSLContext.__dict__.get(_NAME) is _own:
                if _previous is None:
                    delattr(ssl.SSLContext, _NAME)
                else:
                    setattr(ssl.SSLContext, _NAME, _previous)
                _own = _previous = None


def load_deferred(*, verifying: bool) -> None:
    """Load the default CA certificates into every noted context of one kind — those that verify certificates
    (``verifying``), or those that do not — as their making would have. Once each: a no-op when none is left.
    Returns when they are loaded, also when another thread was loading them."""
    with _lock:  # held while loading: a caller must not open a connection with a context still empty
        if not _pending:
            return
        keep = []
        for context, real in _pending:
            if _verifies(context) == verifying:
                real(context)
            else:
                keep.append((context, real))
        _pending[:] = keep
