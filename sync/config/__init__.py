"""Job configuration: frozen objects validated at load time.

The run-side settings (destination, rate budgets, retries, concurrency, :func:`resolve_secret`) are in
``_settings``; the job's records (sources, mappings, validation rules, sync mode) in ``_job``; the job-file loader
(YAML validated against the repository's ``schemas/job.schema.json``, then semantic checks) in ``_load``, one
source's parsing in ``_sources``, the YAML reading every job file shares (duplicate keys refused, alias expansion
bounded) in ``_yaml``; what the loader asks of a platform (limits, defaults, job checks) in ``_platforms`` — the
configuration knows no platform: the platform registry (:mod:`sync.platforms.registry`) answers. Import them
from here.
Only the CLI reads environment variables: secrets are resolved by :func:`resolve_secret`, called from the CLI.
"""

from sync.config._job import (
    DEFAULT_NULL_VALUES,
    Alerts,
    AttributeMapping,
    AttributeMode,
    Coordination,
    FileFormat,
    Job,
    NullAction,
    OptIns,
    RemovalAction,
    SnapshotSettings,
    Source,
    SourceKind,
    SyncMode,
    TagAction,
    TagColumn,
    Thresholds,
    ValidationRules,
    ValueType,
)
from sync.config._load import job_schema, load_job, secret_setting
from sync.config._overlaps import shared_fields
from sync.config._platforms import (
    PlatformCatalog,
    PlatformLimits,
    PlatformRules,
    StarterField,
    StarterJob,
    installed_platforms,
    use_platforms,
)
from sync.config._select import sample_notes, select_sources, split_names
from sync.config._settings import (
    BudgetGroupSpec,
    Destination,
    DispatchSettings,
    RateBudgetSpec,
    RetryPolicy,
    account_fingerprint,
    base_url_problem,
    resolve_secret,
    same_destination,
)
from sync.config._sql import DatabaseKind, DatabaseRef, SqlInput, database_kind
from sync.config._yaml import looks_like_a_key, read_job_yaml

__all__ = [
    "DEFAULT_NULL_VALUES",
    "Alerts",
    "AttributeMapping",
    "AttributeMode",
    "BudgetGroupSpec",
    "Coordination",
    "DatabaseKind",
    "DatabaseRef",
    "Destination",
    "DispatchSettings",
    "FileFormat",
    "Job",
    "NullAction",
    "OptIns",
    "PlatformCatalog",
    "PlatformLimits",
    "PlatformRules",
    "RateBudgetSpec",
    "RemovalAction",
    "RetryPolicy",
    "SnapshotSettings",
    "Source",
    "SourceKind",
    "SqlInput",
    "StarterField",
    "StarterJob",
    "SyncMode",
    "TagAction",
    "TagColumn",
    "Thresholds",
    "ValidationRules",
    "ValueType",
    "account_fingerprint",
    "base_url_problem",
    "database_kind",
    "installed_platforms",
    "job_schema",
    "load_job",
    "looks_like_a_key",
    "read_job_yaml",
    "resolve_secret",
    "same_destination",
    "sample_notes",
    "secret_setting",
    "select_sources",
    "shared_fields",
    "split_names",
    "use_platforms",
]
