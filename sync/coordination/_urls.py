"""The coordination database's URL: what may be said about it (never the password), and its one error class.
:func:`register_url` (its password a secret, not its host) is :func:`sync.redact.register_url`.
No driver import here: a run without a coordination database never loads psycopg."""

from __future__ import annotations

import urllib.parse

from sync.errors import StateError
from sync.redact import redact, register_url

__all__ = ["CoordinationError", "check_url", "describe_url", "register_url", "safe_message"]


class CoordinationError(StateError):
    """The coordination database cannot be used (URL, login, reachability, schema). Exit 2 before anything was
    sent; the message names the host and database, never the password."""

    detail: str | None = None
    """The driver's own words, masked (e.g. ``connection refused``), when the error came from it."""


def describe_url(url: str) -> str:
    """``user@host:port/database`` of a PostgreSQL URL: what an error may name (never the password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{user}{host}{port}{parts.path or '/'}"
    except ValueError:
        return "(an unparsable URL)"


def safe_message(exc: BaseException) -> str:
    """The driver's message, first line, with every registered secret masked."""
    text = str(exc).strip().splitlines()
    return redact(text[0] if text else type(exc).__name__)


def check_url(url: str) -> None:
    """Refuse a URL that is not ``postgresql://`` / ``postgres://`` before trying to connect."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("postgresql", "postgres"):
        raise CoordinationError(
            "the coordination database URL must start with postgresql:// (PUSHSYNC_DATABASE_URL, "
            "--database-url or coordination.database in the job)"
        )
