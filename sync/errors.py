"""The pushsync error tree, named for what the caller must do next.

::

    PushSyncError                      root of everything we raise on purpose
    ├── BadJobError                    the job file is wrong: fix it (lists *every* problem); exit 2
    ├── BadInputError                  an input file cannot be read at all (path, row, column); exit 2
    ├── SecretError                    the secret named by the job is missing or unreadable; exit 2
    ├── StateError                     the ledger or sync state is unusable or refused (e.g. a safety threshold)
    ├── RunStoppedError                a local failure (disk full...) stopped a run after sending began: fix it,
    │                                  then resume; exit 3
    ├── InterruptedRunError            SIGINT/SIGTERM before anything was sent (while planning); exit 4
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
    "InterruptedRunError",
    "JobProblem",
    "PlatformError",
    "PushSyncError",
    "RejectedBatchError",
    "RetryableError",
    "RunStoppedError",
    "SecretError",
    "StateError",
    "printable",
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


_CONTROL_ESCAPES = {
    code: {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code, f"\\x{code:02x}")
    for code in (*range(0x20), *range(0x7F, 0xA0))
}
"""C0 and C1 control characters and DEL, each as Python writes it in a string literal (``\\x00``, ``\\t``)."""


def printable(text: str) -> str:
    """``text`` with its control characters (C0, DEL, C1) escaped as Python escapes them: ``U7\\x00``,
    ``a\\tb``.

    For what is shown to a person — messages, the rejects file, the plan's sample — never for what is matched:
    a NUL written raw to a terminal or a CSV cell is invisible, and a line break or an escape sequence in one
    rewrites what the reader sees. A backslash is left as it is (an ID holding one stays readable and equal to
    itself); only an ID that validation refused can hold a control character, so the escaped form never stands
    for another user's ID that is sent.
    """
    return text.translate(_CONTROL_ESCAPES)


def printable_lines(text: str) -> str:
    """:func:`printable` line by line: the control characters escaped, the text's own line breaks kept (a message
    listing several problems, one a line)."""
    return "\n".join(printable(line) for line in text.split("\n"))


class BadJobError(PushSyncError):
    """The job file is invalid. Carries every problem found, not just the first."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT

    def __init__(self, path: str, problems: Sequence[JobProblem], *, what: str = "job file") -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        # ``what``: the kind of file, for the files read like a job's (a sandbox's config).
        super().__init__(f"{path}: {len(self.problems)} problem(s) in {what}:\n{lines}")


class BadInputError(PushSyncError):
    """An input file cannot be read at all (not CSV, wrong encoding, truncated Parquet...)."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT

    def __init__(self, path: str, message: str, *, row: int | None = None, column: str | None = None) -> None:
        self.path = path
        self.row = row
        self.column = column
        self.reason = message
        where = printable(path)
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {printable(repr(column))}"
        # The message shown escapes control characters (a column name or path holding a NUL, a line break);
        # ``path``, ``column`` and ``reason`` keep them, for code that matches them.
        super().__init__(f"{where}: {printable(message)}")


class SecretError(PushSyncError):
    """The secret a job names (environment variable or file) is missing or unreadable."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT


class StateError(PushSyncError):
    """The ledger or sync state is unusable, or refuses an action (e.g. a removal past the safety threshold)."""

    exit_code = ExitCode.BAD_JOB_OR_INPUT


class RunStoppedError(PushSyncError):
    """A local failure — a full disk, a ledger or state file that cannot be written — stopped a run after it
    began sending. Requests may have gone out, so this is never exit 2 ("nothing was sent"): the run is
    aborted (exit 3). Fix the cause, then ``pushsync resume RUN`` (or run the job again): the ledger and the
    state hold what was confirmed."""

    exit_code = ExitCode.ABORTED


class InterruptedRunError(PushSyncError):
    """SIGINT/SIGTERM arrived before anything was sent (while the job was read, planned or diffed): the run
    stopped with nothing recorded (exit 4)."""

    exit_code = ExitCode.INTERRUPTED


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
    ``dispatch.abort_after_connection_failures``); ``retry_after_estimated`` is True when ``retry_after`` is the
    connector's estimate (NotifyVisitors' window), not a wait the server stated in ``Retry-After``.
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
        retry_after_estimated: bool = False,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after
        self.remaining = remaining
        self.no_connection = no_connection
        """No answer at all (refused, DNS, reset before an answer): a run of these aborts the run."""
        self.retry_after_estimated = retry_after_estimated
        """``retry_after`` was estimated by the connector: only a wait the server stated can stop a run when it
        is longer than ``retry.max_retry_after`` (:mod:`sync.dispatch._sending`)."""

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


class RejectedBatchError(PlatformError):
    """The platform refused the batch's content (400). Record it; split the batch to isolate bad records."""
