"""Run-side settings: where a job sends, how hard it may push, how it retries, and where its secret lives."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sync.errors import SecretError


def base_url_problem(url: str, *, scheme: bool = True) -> str | None:
    """What is wrong with ``url`` as a platform's base URL (a job file's, a command line's, a Meiro job's), or
    None: an http(s) URL with a host (``scheme=False``: left to the job schema's pattern), no credentials in it,
    no query string or fragment. The message never repeats the URL — one refused for the credentials written in
    it would print them — and every error about a request names its URL, so a URL with credentials must not get
    that far."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return "not a URL"
    if scheme and (parts.scheme not in ("http", "https") or not host):
        return "must be an http:// or https:// URL with a host"
    if "@" in parts.netloc:
        return "credentials may not be written in the URL"
    if parts.query or parts.fragment:
        return "a base URL takes no query string or fragment (endpoints are appended to it)"
    return None


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a job sends: the platform, its base URL and where the secret lives (never the secret itself)."""

    platform: str
    base_url: str
    secret_env: str | None = None
    secret_file: str | None = None
    verify_tls: bool = True
    """TLS certificate checks; only a job aimed at a local sandbox may turn them off."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Platform-specific, non-secret settings (e.g. a brand ID, a company ID)."""
    account: str | None = None
    """Which account at the base URL: a fingerprint of the secret and of ``extra`` (:meth:`for_account`), set
    once a command has read the secret; None when it has not (then :attr:`key` is :attr:`url_key`)."""

    @property
    def url_key(self) -> str:
        """``<platform>-<hash of the base URL>``: the destination without its account (what pushsync recorded
        before session 37, and what a command that has not read the secret knows)."""
        digest = hashlib.sha256(self.base_url.encode("utf-8")).hexdigest()[:10]
        return f"{self.platform}-{digest}"

    @property
    def key(self) -> str:
        """``<platform>-<hash of the base URL>-<account fingerprint>``: which destination this is, without its
        address or its secret. The snapshot state's directory is named by it, and the ledgers (SQLite and
        PostgreSQL) record it with each run, so that one job file serving staging and production (``base_url``
        from the environment), or a test app and a live app behind one base URL (Netmera's: the API key names
        the app), never resumes, or joins, the other's run, nor takes what one confirmed as sent to the other.
        Without :attr:`account`, :attr:`url_key`."""
        return self.url_key if self.account is None else f"{self.url_key}-{self.account}"

    def for_account(self, secret: str) -> Destination:
        """This destination with its :attr:`account` set from ``secret`` and the ``extra`` settings that name the
        account on this platform (``PlatformLimits.account_settings``; :func:`account_fingerprint`)."""
        named = _account_settings[0](self.platform)
        account = {k: v for k, v in self.extra.items() if k in named}
        return dataclasses.replace(self, account=account_fingerprint(secret, account))

    def for_readable_account(self, environ: Mapping[str, str] | None = None) -> Destination:
        """:meth:`for_account` with the secret the job names, when it can be read; else this destination as it
        is (``plan`` and ``state show`` need no secret: the state's directory is then found by its base URL,
        :func:`sync.state.StateStore`)."""
        if self.account is not None:
            return self
        try:
            return self.for_account(resolve_secret(self, environ))
        except SecretError:
            return self


def _no_account_settings(platform: str) -> frozenset[str]:
    del platform
    return frozenset()


_account_settings: list[Callable[[str], frozenset[str]]] = [_no_account_settings]
"""Which ``extra`` settings name the account, per platform: set by :func:`sync.config.use_platforms` from the
installed catalogue (``PlatformLimits.account_settings``); without one, none (the key alone)."""


def account_settings_from(lookup: Callable[[str], frozenset[str]]) -> None:
    """Where :meth:`Destination.for_account` learns a platform's account settings (called by ``use_platforms``:
    this module imports nothing of the platforms' layer)."""
    _account_settings[0] = lookup


def account_fingerprint(secret: str, extra: Mapping[str, str] | None = None) -> str:
    """Eight hex digits that tell accounts at one base URL apart: PBKDF2-SHA256 of the secret with the
    non-secret account settings (``extra``: a brand ID, a company ID) as salt, cut to 32 bits. The secret cannot
    be read back from it — a platform's key is far longer than 32 bits, and the work factor makes trying a
    list of guessed passwords against a recorded fingerprint slow — so it may be recorded (directory names,
    the ledger) where the secret never is. ~1 ms."""
    salt = "pushsync-account\0" + "\0".join(f"{k}={v}" for k, v in sorted((extra or {}).items()))
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt.encode("utf-8"), 5000, dklen=4)
    return digest.hex()


def same_destination(recorded: str | None, ours: str | None) -> bool:
    """Whether a run (or a state) recorded for destination ``recorded`` is of destination ``ours``
    (:attr:`Destination.key` values). An unknown one (None: recorded by a pushsync that did not record
    destinations) is taken as the same, and so is one that names no account (recorded before accounts were
    told apart, or known by a command that has not read the secret) at the same platform and base URL."""
    if recorded is None or ours is None or recorded == ours:
        return True
    return ours.startswith(recorded + "-") or recorded.startswith(ours + "-")


@dataclass(frozen=True, slots=True)
class RateBudgetSpec:
    """At most ``requests`` requests per ``period`` seconds, counting every attempt (retries included)."""

    requests: int
    period: float
    align: bool = True
    """Release per clock-aligned window (servers counting fixed windows); False: N per ``period + margin``."""
    margin: float | None = None
    """Seconds kept free before a window's end; None: learned from the latencies observed (docs/run.md)."""

    @property
    def interval(self) -> float:
        return self.period / self.requests


@dataclass(frozen=True, slots=True)
class BudgetGroupSpec:
    """A budget shared by several endpoints (a limit per account or API key): every attempt at any of them
    takes a slot from the group as well as from its endpoint's own budget."""

    name: str
    budget: RateBudgetSpec
    endpoints: tuple[str, ...]
    """Endpoint names; ``("*",)`` is every endpoint of the job."""

    def holds(self, endpoint: str) -> bool:
        """Whether an attempt at ``endpoint`` takes a slot from this group."""
        return "*" in self.endpoints or endpoint in self.endpoints


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: sleep uniform(0, min(max_delay, base_delay * 2**attempt))."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0
    """The longest wait a server may ask for (Retry-After) that a run waits out; a longer one stops the run."""


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """How hard a run may push: global and per-endpoint concurrency, time-outs, rate budgets."""

    concurrency: int = 8
    per_endpoint_concurrency: Mapping[str, int] = field(default_factory=dict)
    request_timeout: float = 30.0
    drain_timeout: float = 30.0
    queue_size: int = 64
    budgets: Mapping[str, RateBudgetSpec] = field(default_factory=dict)
    """Per endpoint (e.g. ``tagUsers``); the key ``"*"`` applies to endpoints not named."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    budget_groups: tuple[BudgetGroupSpec, ...] = ()
    """Budgets shared by several endpoints, on top of each endpoint's own."""
    abort_after_connection_failures: int = 20
    """Abort the run (exit 3) after this many requests in a row got no answer at all (refused, DNS, reset);
    0: never. Any answer, even an error status, starts the count again."""

    def budget_for(self, endpoint: str) -> RateBudgetSpec | None:
        """The endpoint's own budget (``"*"`` when it is not named), if any."""
        return self.budgets.get(endpoint) or self.budgets.get("*")

    def groups_for(self, endpoint: str) -> tuple[BudgetGroupSpec, ...]:
        """The budget groups an attempt at ``endpoint`` takes a slot from."""
        return tuple(g for g in self.budget_groups if g.holds(endpoint))

    def max_rate(self, endpoint: str) -> float | None:
        """The most requests per second ``endpoint`` may send: its own budget's or a group's, the lowest (None:
        no budget limits it)."""
        specs = [s for s in (self.budget_for(endpoint), *(g.budget for g in self.groups_for(endpoint))) if s]
        return min((s.requests / s.period for s in specs), default=None)


def _unusable(value: str, where: str) -> SecretError | None:
    """The error for a secret holding a line break or another control character (never in a real key, and
    refused by HTTP in a header), or None. Says which kind, never the value."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            kind = (
                "a line break"
                if char in "\r\n\x85\u2028\u2029"
                else f"a control character (U+{ord(char):04X})"
            )
            return SecretError(
                f"the secret in {where} holds {kind} inside it; a key is one line of printable characters: "
                "check how it was set (the value is not shown)"
            )
    return None


def _warn_if_others_can_read(path: Path) -> None:
    """Warn (never refuse) about a secret file everyone may read: Kubernetes and Docker mount secret files 0644
    unless told otherwise, so refusing would break those deployments; the warning says how to close it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        from sync.logs import get_logger  # imported late: configuration is loaded before logging is set up

        get_logger().warning(
            "secret.file_readable_by_others",
            path=str(path),
            mode=f"{stat.S_IMODE(mode):04o}",
            hint=f"chmod 600 {path}",
        )


def resolve_secret(destination: Destination, environ: Mapping[str, str] | None = None) -> str:
    """Read the destination's secret from the environment variable or file the job names.

    Surrounding whitespace is dropped (a key file ends with a line break); a secret with a line break or
    another control character inside is refused. A secret file others may read is warned about.
    Raises :class:`SecretError` naming the variable or file — never the value.
    """
    env = os.environ if environ is None else environ
    if destination.secret_env:
        value = env.get(destination.secret_env)
        if value and value.strip():
            value = value.strip()
            error = _unusable(value, f"environment variable {destination.secret_env}")
            if error is not None:
                raise error
            return value
        if not destination.secret_file:
            raise SecretError(f"environment variable {destination.secret_env} is not set or empty")
    if destination.secret_file:
        path = Path(os.path.expanduser(destination.secret_file))
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise SecretError(f"secret file {path} is not UTF-8 text") from exc
        if not value:
            raise SecretError(f"secret file {path} is empty")
        error = _unusable(value, f"secret file {path}")
        if error is not None:
            raise error
        _warn_if_others_can_read(path)
        return value
    raise SecretError("the job names no secret (destination.secret.env or destination.secret.file)")
