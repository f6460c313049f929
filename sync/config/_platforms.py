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
from sync.config._settings import BudgetGroupSpec, RateBudgetSpec, account_settings_from
from sync.errors import JobProblem

__all__ = [
    "PlatformCatalog",
    "PlatformLimits",
    "PlatformRules",
    "StarterField",
    "StarterJob",
    "installed_platforms",
    "use_platforms",
]


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
    account_settings: frozenset[str] = frozenset()
    """The ``destination.extra`` settings that name the account (NotifyVisitors' ``brand_id``, Forms On Fire's
    ``company_id``): part of :attr:`sync.config.Destination.key` with the key's fingerprint. The others (a time
    zone, a pace, a message default) are not: changing one is the same account, whose runs are resumed."""


@dataclass(frozen=True, slots=True)
class StarterJob:
    """What ``pushsync init`` writes for a platform: the destination of a first job (the production URL, the
    conventional name of the key's environment variable) and what of a users source the platform takes, so the
    command maps a file's columns to what the platform accepts without knowing any platform."""

    base_url: str | None
    """The production API's address; None when every account has its own (``init`` then needs ``--base-url``)."""
    secret_env: str
    contact_fields: frozenset[str] = frozenset()
    """The contact fields (``email``, ``msisdn``) a users source may map."""
    opt_ins: frozenset[str] = frozenset()
    """The opt-in channels (``push``, ``email``, ``sms``) a users source may map."""
    tags: bool = False
    """Whether a delimited segments/tags column becomes tags (else it is an attribute like any other column)."""
    fields: tuple[StarterField, ...] | None = None
    """None: every column not mapped otherwise is a profile attribute of its own name. Otherwise the only
    attributes the platform takes (Forms On Fire's message fields), each found by its column's name; the other
    columns are left out of the job, named in a comment."""
    extra_hints: tuple[str, ...] = ()
    """``destination.extra`` lines written commented out below the settings given (``key: value  # what``)."""
    filled_by: Mapping[str, str] = field(default_factory=dict)
    """Attribute names the source's contact and opt-in settings fill (NotifyVisitors' ``mobile`` from
    ``msisdn``), each with that setting (``msisdn``, ``opt_ins.sms``): a column of that name left over once the
    setting is mapped from another column is left out (the platform refuses the job otherwise)."""
    reference: str = "docs/jobs.md"
    """The page of the docs that describes the platform's job."""


@dataclass(frozen=True, slots=True)
class StarterField:
    """An attribute ``pushsync init`` maps a column to by the column's name (Forms On Fire's ``Title``)."""

    attribute: str
    type: str
    """The ``type:`` the mapping is written with (a :class:`sync.config.ValueType` value)."""
    names: tuple[str, ...]
    """Column names that suggest it, lower case with ``_`` for any run of other characters, best first."""


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

    def account_settings(platform: str) -> frozenset[str]:
        rules = catalog.get(platform)
        return rules.limits.account_settings if rules is not None else frozenset()

    account_settings_from(account_settings)


def installed_platforms() -> PlatformCatalog:
    """The catalogue installed by :func:`use_platforms`."""
    if not _installed:  # only when sync.config is used without the package's __init__ having run
        raise RuntimeError("no platform registry installed: import sync.platforms.registry first")
    return _installed[0]
