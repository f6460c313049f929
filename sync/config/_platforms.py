"""What the job loader needs to know about a platform, without knowing any platform.

The configuration layer imports nothing from :mod:`sync.platforms`: the platform layer depends on the
configuration (its builders read :class:`sync.config.Source`), so the other direction would be a cycle. The loader
asks the platforms it is given — a :class:`PlatformCatalog`, by default the one :mod:`sync.platforms.registry`
installs when the package is imported (:func:`use_platforms`) — for their :class:`PlatformLimits` and their job
checks. A :class:`sync.platforms.base.Platform` is a :class:`PlatformRules`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sync.config._job import Source
from sync.config._settings import BudgetGroupSpec, RateBudgetSpec
from sync.errors import JobProblem

__all__ = ["PlatformCatalog", "PlatformLimits", "PlatformRules", "installed_platforms", "use_platforms"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformLimits:
    """A platform's limits and the defaults a job starts from (its own ``dispatch`` settings override them)."""

    max_batch: int
    """Unique IDs one request may name at most; the loader refuses a larger ``batch_size``."""
    default_batch_size: int
    endpoints: tuple[str, ...] = ()
    """Every endpoint the connector sends to: the names a job may use under ``dispatch`` (besides ``"*"``);
    empty: any name."""
    single_user_endpoints: frozenset[str] = frozenset()
    """Endpoints that take one user per request whatever the batch size."""
    default_budgets: Mapping[str, RateBudgetSpec] = field(default_factory=dict)
    """Rate budget per endpoint (``"*"``: every endpoint not named)."""
    default_budget_groups: tuple[BudgetGroupSpec, ...] = ()
    """Limits the platform counts over several endpoints together (NotifyVisitors' per-family limits); a job's
    group of the same name replaces one."""
    starter: StarterJob | None = None
    """What ``pushsync init`` writes for this platform's destination (None: init does not offer it, e.g. when a
    job needs settings no file header can suggest)."""


@dataclass(frozen=True, slots=True)
class StarterJob:
    """The destination of a first job (``pushsync init``): the production URL, the conventional name of the key's
    environment variable, and the contact fields (``email``, ``msisdn``) a users source may map."""

    base_url: str
    secret_env: str
    contact_fields: frozenset[str] = frozenset()


class PlatformRules(Protocol):
    """The part of a platform the job loader uses."""

    @property
    def name(self) -> str:
        """The ``destination.platform`` value that selects it."""
        ...

    @property
    def limits(self) -> PlatformLimits: ...

    @property
    def snapshot_mode(self) -> bool:
        """Whether ``mode: snapshot`` works with this platform's endpoints (docs/sync.md)."""
        ...

    def job_problems(self, sources: Sequence[Source], extra: Mapping[str, str]) -> list[JobProblem]:
        """What a job asks of this platform that it cannot do; empty when all is well."""
        ...


class PlatformCatalog(Protocol):
    """The platforms a job may name."""

    def get(self, name: str) -> PlatformRules | None: ...

    def names(self) -> Sequence[str]: ...


_installed: list[PlatformCatalog] = []


def use_platforms(catalog: PlatformCatalog) -> None:
    """Make ``catalog`` the platforms :func:`sync.config.load_job` checks jobs against by default (the platform
    registry calls this when it is imported, which ``import sync`` does)."""
    _installed[:] = [catalog]


def installed_platforms() -> PlatformCatalog:
    """The catalogue installed by :func:`use_platforms`."""
    if not _installed:  # only when sync.config is used without the package's __init__ having run
        raise RuntimeError("no platform registry installed: import sync.platforms.registry first")
    return _installed[0]
