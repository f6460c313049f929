"""The one registry of platforms: adding a platform is a package under ``sync/platforms/`` plus one line here.

Importing this module (``import sync`` does) also makes the registry the catalogue the job loader checks jobs
against (:func:`sync.config.use_platforms`): the configuration layer itself imports nothing from the platforms.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Sequence

from sync.config import Job, use_platforms
from sync.errors import BadJobError, JobProblem
from sync.platforms import _tls
from sync.platforms.base import Platform, Registry

__all__ = ["REGISTRY", "platform_for", "preload_client"]

# Each platform is imported when a job names it (or a command lists them all): a run loads its own platform's
# request shapes only — Forms On Fire's XML, NotifyVisitors' families — not every platform's at start-up.


def _netmera() -> Platform:
    from sync.platforms.netmera.platform import NETMERA

    return NETMERA


def _notifyvisitors() -> Platform:
    from sync.platforms.notifyvisitors.platform import NOTIFYVISITORS

    return NOTIFYVISITORS


def _formsonfire() -> Platform:
    from sync.platforms.formsonfire.platform import FORMSONFIRE

    return FORMSONFIRE


REGISTRY = Registry()
"""Every platform a job's ``destination.platform`` may name."""
REGISTRY.defer("netmera", _netmera)
REGISTRY.defer("notifyvisitors", _notifyvisitors)
REGISTRY.defer("formsonfire", _formsonfire)

use_platforms(REGISTRY)


def platform_for(job: Job) -> Platform:
    """The platform ``job`` sends to; :class:`BadJobError` when no platform of that name is registered."""
    platform = REGISTRY.get(job.destination.platform)
    if platform is None:
        raise BadJobError(
            str(job.path),
            [JobProblem("destination.platform", f"no platform {job.destination.platform!r} is registered")],
        )
    return platform


PRELOAD_SWITCH_INTERVAL: float | None = 0.0005
"""The interpreter's thread switch interval (seconds) while a connector is preloaded, when it was Python's default:
the import holds the GIL for most of its ~0.2 s, and with the default 5 ms each call of the input's reading that
gives the GIL up (every polars or pyarrow step) may wait as long to get it back (issue 13). None: left alone."""
_DEFAULT_SWITCH_INTERVAL = 0.005


def _preload(
    name: str, then: Sequence[str], quick: float | None, previous: float, tls: Sequence[bool] | None
) -> None:
    try:
        if tls is None:
            importlib.import_module(name)
        else:
            # The connector's TLS contexts made without the CA certificates; the kind this job's TLS uses loaded
            # now, off the way to the first request as before; a plain-http job loads none (sync/platforms/_tls.py).
            with _tls.ca_loading_deferred():
                importlib.import_module(name)
            for verifying in tls:
                _tls.load_deferred(verifying=verifying)
        from sync._startup import mark_startup

        mark_startup("connector_imported")
        for module in then:
            importlib.import_module(module)
    finally:
        if quick is not None and sys.getswitchinterval() == quick:  # unless someone else has changed it since
            sys.setswitchinterval(previous)


def preload_client(job: Job, *, then: Sequence[str] = ()) -> threading.Thread | None:
    """Import the connector module of ``job``'s platform (``<platform package>.client``: aiohttp and all) in a
    background thread, and return the thread (None when there is no such module).

    A platform imports its connector only when a client is asked for, so that loading or planning a job never
    loads aiohttp; a run asks for one right after planning. Started before the planning, the import overlaps the
    reading of the input (polars and pyarrow decode without the GIL) instead of delaying the first request.
    ``then``: modules the thread imports next (a run's dispatcher), in that order. Meanwhile the thread switch interval is :data:`PRELOAD_SWITCH_INTERVAL` (when it was Python's default): the
    reading gets the GIL back sooner between its steps.

    In a ``pushsync run`` process (:data:`sync.platforms._tls.DEFER`) the connector's TLS contexts load the
    system's CA certificates only for the kind the job's base URL needs: none for plain ``http``.
    """
    package = type(platform_for(job)).__module__.rpartition(".")[0]
    name = f"{package}.client"
    if not package or importlib.util.find_spec(name) is None:
        return None
    previous = sys.getswitchinterval()
    # Shortened only from Python's default: a program that chose its own interval keeps it.
    quick = None
    if PRELOAD_SWITCH_INTERVAL is not None and previous == _DEFAULT_SWITCH_INTERVAL:
        sys.setswitchinterval(PRELOAD_SWITCH_INTERVAL)
        quick = sys.getswitchinterval()  # as the interpreter keeps it (whole microseconds)
    tls: tuple[bool, ...] | None = None
    if _tls.DEFER:
        destination = job.destination
        tls = () if _tls.plain_http(destination.base_url) else (destination.verify_tls,)
    thread = threading.Thread(
        target=_preload, args=(name, tuple(then), quick, previous, tls), name="preload-client", daemon=True
    )
    thread.start()
    return thread
