"""The pushsync error tree, named for what the caller must do next.

::

    PushSyncError                      root of everything we raise on purpose
    ├── BadJobError                    the job file is wrong: fix it (lists *every* problem); exit 2
    ├── BadInputError                  an input file cannot be read at all (path, row, column); exit 2
    ├── SecretError                    the secret named by the job is missing or unreadable; exit 2
    ├── StateError                     the ledger or sync state is unusable or refused (e.g. a safety threshold)
    └── PlatformError                  something the platform answered (or failed to answer)
        ├── FatalPlatformError         401/403 and the like: abort the whole run, retrying cannot help
        ├── RetryableError             429, 5xx, time-outs, dropped connections: back off and retry
        └── RejectedBatchError         400: the platform refused this batch's content: record it, split, go on

Third-party exceptions (aiohttp, polars, sqlite3) are translated into these once, at the boundary
(``raise BadInputError(...) from exc``); aiohttp's, for every connector, in :mod:`sync.platforms._http`.
Messages never contain secrets: request descriptions are built by :func:`sync.redact.describe_request`,
which redacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "BadInputError",
    "BadJobError",
    "ExitCode",
    "FatalPlatformError",
    "JobProblem",
    "PlatformError",
    "PushSyncError",
    "RejectedBatchError",
    "RetryableError",
    "SecretError",
    "StateError",
]


class ExitCode(IntEnum):
    """Process exit codes, documented for schedulers (cron, Airflow, Kubernetes)."""

    OK = 0
    """Every batch went through."""
    PARTIAL = 1
    """The run finished, but some rows were rejected (by validation or by the platform) or failed."""
    BAD_JOB_OR_INPUT = 2
    """The job file, its secret or an input file is unusable; nothing was sent."""
    ABORTED = 3
    """The run was aborted (401/403 from the platform, or a fatal error); work in flight was recorded."""
    INTERRUPTED = 4
    """Stopped by SIGINT/SIGTERM after draining; run ``pushsync resume`` to finish."""
    CRASHED = 5
    """An unexpected error (a bug in pushsync or its environment): never a success, whatever a wrapper maps
    ``1`` to. What reached the ledger before the crash stays there; ``pushsync resume`` picks it up."""


class PushSyncError(Exception):
    """Root of all errors pushsync raises on purpose."""

    exit_code: ExitCode = ExitCode.ABORTED


@dataclass(frozen=True, slots=True)
class JobProblem:
    """One problem in a job file: where it is (a JSON-pointer-like path) and what is wrong."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class BadJobError(PushSyncError):
    """The job file is invalid. Carries every problem found, not just the first."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT

    def __init__(self, path: str, problems: Sequence[JobProblem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s) in job file:\n{lines}")


class BadInputError(PushSyncError):
    """An input file cannot be read at all (not CSV, wrong encoding, truncated Parquet...)."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT

    def __init__(self, path: str, message: str, *, row: int | None = None, column: str | None = None) -> None:
        self.path = path
        self.row = row
        self.column = column
        self.reason = message
        where = path
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class SecretError(PushSyncError):
    """The secret a job names (environment variable or file) is missing or unreadable."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT


class StateError(PushSyncError):
    """The ledger or sync state is unusable, or refuses an action (e.g. a removal past the safety threshold)."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT


class PlatformError(PushSyncError):
    """Something the platform answered, or failed to answer.

    ``status`` is the HTTP status (None when no answer came), ``code`` the platform's own error code.
    """

    def __init__(self, message: str, *, status: int | None = None, code: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class FatalPlatformError(PlatformError):
    """Retrying cannot help and no other batch will do better (401/403): abort the run."""

    exit_code = ExitCode.ABORTED


class RetryableError(PlatformError):
    """A transient failure (429, 5xx, time-out, dropped connection): retry after ``retry_after`` seconds if set.

    ``remaining`` is the server's ``X-RateLimit-Remaining`` when it sent one; ``rate_limited`` is True for 429s;
    ``no_connection`` is True when the server could not be reached at all (counted towards
    ``dispatch.abort_after_connection_failures``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | str | None = None,
        retry_after: float | None = None,
        remaining: int | None = None,
        no_connection: bool = False,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after
        self.remaining = remaining
        self.no_connection = no_connection
        """No answer at all (refused, DNS, reset before an answer): a run of these aborts the run."""

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


class RejectedBatchError(PlatformError):
    """The platform refused the batch's content (400). Record it; split the batch to isolate bad records."""
