"""The one registry of platforms: adding a platform is a package under ``sync/platforms/`` plus one line here.

Importing this module (``import sync`` does) also makes the registry the catalogue the job loader checks jobs
against (:func:`sync.config.use_platforms`): the configuration layer itself imports nothing from the platforms.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

from sync.config import Job, use_platforms
from sync.errors import BadJobError, JobProblem
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


def preload_client(job: Job) -> threading.Thread | None:
    """Import the connector module of ``job``'s platform (``<platform package>.client``: aiohttp and all) in a
    background thread, and return the thread (None when there is no such module).

    A platform imports its connector only when a client is asked for, so that loading or planning a job never
    loads aiohttp; a run asks for one right after planning. Started before the planning, the import overlaps the
    reading of the input (polars and pyarrow decode without the GIL) instead of delaying the first request.
    """
    package = type(platform_for(job)).__module__.rpartition(".")[0]
    name = f"{package}.client"
    if not package or importlib.util.find_spec(name) is None:
        return None
    thread = threading.Thread(
        target=importlib.import_module, args=(name,), name="preload-client", daemon=True
    )
    thread.start()
    return thread
