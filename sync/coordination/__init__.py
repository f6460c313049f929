"""Several workers, one job: the run's ledger, its batches as a queue and the rate budgets in PostgreSQL
(docs/scaling.md). Turned on by a database URL (``PUSHSYNC_DATABASE_URL``, ``--database-url`` or the job's
``coordination.database``); without one, nothing here is imported and the embedded SQLite ledger is used.

* :mod:`sync.coordination._db`: connecting (clear errors, the password never shown), the schema, and
  :class:`~sync.coordination._db.Link`: a connection made again when PostgreSQL restarts (bounded);
* :mod:`sync.coordination.ledger`: :class:`PgLedger`, the ledger's interface on PostgreSQL;
* :mod:`sync.coordination.queue`: enqueue (the leader), claims with ``SKIP LOCKED`` and leases (every worker);
* :mod:`sync.coordination.leader`: the leader's planning, beside every worker's sending;
* :mod:`sync.coordination.budget`: budgets shared by every worker, one row per budget;
* :mod:`sync.coordination.summary`: the run's summary from the ledger (every worker's requests);
* :mod:`sync.coordination.runner`: one worker's run, :func:`run_coordinated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sync.coordination._urls import CoordinationError, describe_url

if TYPE_CHECKING:
    from sync.config import Job
    from sync.coordination._seams import WorkerOptions, WorkerOutcome, WorkerSignals
    from sync.coordination.ledger import PgLedger

__all__ = [
    "ENV_VAR",
    "CoordinationError",
    "describe_url",
    "open_ledger",
    "resolve_database_url",
    "run_coordinated",
]

ENV_VAR = "PUSHSYNC_DATABASE_URL"
"""The environment variable that turns coordination on for every job run in that environment."""


def resolve_database_url(
    job: Job | None, flag: str | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The coordination database URL, or None (SQLite): ``--database-url``, else the job's
    ``coordination.database`` (``{env:}``/``{file:}``), else ``PUSHSYNC_DATABASE_URL``. Registered as a secret.
    Raises :class:`sync.errors.SecretError` when the job names a variable or file that is not there."""
    import os

    from sync.config import Destination, resolve_secret
    from sync.coordination._urls import register_url
    from sync.errors import SecretError

    env = os.environ if environ is None else environ
    url: str | None = flag
    coordination = job.coordination if job is not None else None
    if url is None and coordination is not None and (coordination.database_env or coordination.database_file):
        try:
            url = resolve_secret(
                Destination(
                    platform="coordination",
                    base_url="",
                    secret_env=coordination.database_env,
                    secret_file=coordination.database_file,
                ),
                env,
            )
        except SecretError as exc:
            raise SecretError(f"coordination.database: {exc}") from None
    if url is None:
        url = env.get(ENV_VAR) or None
    if url is not None:
        register_url(url)
    return url


async def run_coordinated(
    job: Job, options: WorkerOptions, url: str, signals: WorkerSignals
) -> WorkerOutcome:
    """One worker of the job's run in the coordination database (:func:`sync.coordination.runner.run_coordinated`)."""
    _require_driver()
    from sync.coordination.runner import run_coordinated as _run

    return await _run(job, options, url, signals)


def open_ledger(url: str) -> PgLedger:
    """The PostgreSQL ledger at ``url`` (for ``runs``, ``show``, ``report``, ``resume``, ``retry``)."""
    _require_driver()
    from sync.coordination.ledger import PgLedger

    return PgLedger.open(url)


def _require_driver() -> None:
    """psycopg comes with the ``postgres`` extra: say so instead of a bare ModuleNotFoundError."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise CoordinationError(
            "a coordination database needs the PostgreSQL driver: pip install 'pushsync[postgres]'"
        ) from None
