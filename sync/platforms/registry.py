"""The one registry of platforms: adding a platform is a package under ``sync/platforms/`` plus one line here.

Importing this module (``import sync`` does) also makes the registry the catalogue the job loader checks jobs
against (:func:`sync.config.use_platforms`): the configuration layer itself imports nothing from the platforms.
"""

from __future__ import annotations

from sync.config import Job, use_platforms
from sync.errors import BadJobError, JobProblem
from sync.platforms.base import Platform, Registry
from sync.platforms.formsonfire.platform import FORMSONFIRE
from sync.platforms.netmera.platform import NETMERA
from sync.platforms.notifyvisitors.platform import NOTIFYVISITORS

__all__ = ["REGISTRY", "platform_for"]

REGISTRY = Registry([NETMERA, NOTIFYVISITORS, FORMSONFIRE])
"""Every platform a job's ``destination.platform`` may name."""

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
