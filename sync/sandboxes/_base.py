"""What every platform's sandbox shares on top of :mod:`._core`: its settings and its lifecycle.

* :class:`SandboxSettings` — the settings every sandbox has (``limits``, ``faults``, ``seed``, ``stats_window``,
  ``seed_file``) and the one ``from_mapping`` that reads a YAML/JSON document into a platform's config class:
  unknown keys refused, limits, faults, the seed file and the class's enums parsed, then the platform's own
  conversions (:meth:`SandboxSettings._convert`).
* :class:`PlatformSandbox` — builds the :class:`SandboxCore` from those settings, loads the seed file, builds
  the app (core middleware, the platform's routes, the ``/_sandbox/`` inspection routes) and serves it:
  ``start``/``stop``/``url``/``port``/``stats``/``configure``.
* :func:`table` — a state's objects as one polars DataFrame, for ``InspectableState.tables``.

A platform's sandbox subclasses both (its config class and its sandbox class keep their own names) and supplies
``api_prefix``, ``_authenticate``, ``_render_error`` and ``_add_routes``; see ``docs/sandbox.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from sync.sandboxes._core import (
    Admission,
    ApiError,
    FaultKind,
    FaultSpec,
    InspectableState,
    RateLimit,
    RunningServer,
    SandboxCore,
    SandboxStats,
    parse_limits,
    start_app,
)

if TYPE_CHECKING:  # polars is imported when a table is asked for: serving requests never needs it
    import polars as pl

__all__ = ["PlatformSandbox", "SandboxSettings", "SeedFileError", "SeedableState", "table"]

DEFAULT_MAX_BODY = 1024 * 1024
"""aiohttp's own default request-body limit, kept for sandboxes that do not choose one."""


class SeedFileError(ValueError):
    """A seed file that cannot be loaded: ``path`` and ``reason`` (what was wrong, in words)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"seed file {path}: {reason}")
        self.path = path
        self.reason = reason


def _seed_reason(exc: Exception) -> str:
    # A state's loader indexes the document as it expects it: a KeyError's text is only the key ('userID'),
    # a TypeError's or AttributeError's is Python's ("string indices must be integers").
    if isinstance(exc, KeyError):
        return f"an entry lacks {exc.args[0]!r}"
    if isinstance(exc, TypeError | AttributeError):
        return f"not in the shape of GET /_sandbox/state ({exc})"
    return str(exc)


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """The settings every sandbox has; a platform's config class adds its own fields (all with defaults).

    Build a subclass from YAML/JSON with :meth:`from_mapping`.
    """

    limits: Mapping[str, RateLimit] = field(default_factory=dict)
    """Per endpoint name (or limit group), or ``"*"`` for each endpoint not named; ``{}`` = no limits."""
    faults: FaultSpec = field(default_factory=FaultSpec)
    seed: int = 0
    """Seed of the fault sequence: the same seed and requests give the same faults."""
    stats_window: float = 60.0
    """Window (s) for the max-per-window stat of endpoints without a rate limit."""
    seed_file: Path | None = None
    """State loaded at start (the shape the platform's state ``load_file`` reads)."""

    _label: ClassVar[str] = "sandbox"
    """Names the settings in the unknown-keys error."""
    _enums: ClassVar[Mapping[str, type[StrEnum]]] = {}
    """Fields whose document values are parsed into these enums."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> Self:
        """Build from a parsed YAML/JSON document; unknown keys are refused (ValueError).

        ``overrides`` win over the document; one that is None counts as not given (the CLI passes every option,
        given or not)."""
        known = {f.name for f in fields(cls)}
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown {cls._label} settings {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = dict(merged)
        # ``limits: null`` means no limits; ready RateLimit objects (tests, the factories) pass through
        if "limits" in kwargs and not all(
            isinstance(v, RateLimit) for v in (kwargs["limits"] or {}).values()
        ):
            kwargs["limits"] = parse_limits(kwargs["limits"] or {})
        if isinstance(kwargs.get("faults"), Mapping):
            kwargs["faults"] = FaultSpec.from_mapping(kwargs["faults"])
        if kwargs.get("seed_file") is not None:
            kwargs["seed_file"] = Path(kwargs["seed_file"])
        for name, enum in cls._enums.items():
            if name in kwargs:
                kwargs[name] = enum(kwargs[name])
        cls._convert(kwargs)
        return cls(**kwargs)

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        """Override to convert the platform's own values in place (nested records, numbers given as text)."""


class SeedableState(InspectableState, Protocol):
    """A platform's state: inspectable, and loadable from the config's ``seed_file``."""

    def load_file(self, path: Path) -> None:
        """Load the state a seed file describes (raises ValueError/OSError on a bad file)."""
        ...


ConfigT = TypeVar("ConfigT", bound=SandboxSettings)
StateT = TypeVar("StateT", bound=SeedableState)


class PlatformSandbox(Generic[ConfigT, StateT]):
    """A platform's emulator: ``await sandbox.start(host, port)`` returns the base URL (root + ``api_prefix``).

    ``config`` is the platform's settings, ``state`` the live state, ``stats`` the :class:`SandboxStats`,
    ``core`` the :class:`SandboxCore` (use :meth:`configure` to change limits and faults while running), ``app``
    the ``aiohttp`` application. A subclass sets ``api_prefix`` and implements ``_authenticate``,
    ``_render_error`` and ``_add_routes``; anything its hooks use must be set before it calls ``__init__``,
    which builds the app.
    """

    api_prefix: ClassVar[str]
    """Where the API routes live, e.g. ``/rest/3.0/``; limits, faults and stats apply below it only."""

    def __init__(
        self,
        config: ConfigT,
        state: StateT,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Any],
        groups: Mapping[str, str] | None = None,
        rate_limit_error: Callable[[Admission], ApiError] | None = None,
        fault_error: Callable[[FaultKind], ApiError] | None = None,
        middlewares: Sequence[Middleware] = (),
        client_max_size: int = DEFAULT_MAX_BODY,
    ) -> None:
        """``groups``, ``rate_limit_error`` and ``fault_error`` go to :class:`SandboxCore`; ``middlewares`` run
        outside the core's (so they see every request, the core's refusals included)."""
        self.config = config
        self.state = state
        self._clock = clock
        self.core = SandboxCore(
            api_prefix=self.api_prefix,
            authenticate=self._authenticate,
            render_error=self._render_error,
            limits=config.limits,
            groups=groups,
            faults=config.faults,
            seed=config.seed,
            clock=clock,
            sleep=sleep,
            stats_window=config.stats_window,
            rate_limit_error=rate_limit_error,
            fault_error=fault_error,
        )
        if config.seed_file is not None:
            try:
                state.load_file(config.seed_file)
            except OSError as exc:
                raise SeedFileError(config.seed_file, exc.strerror or str(exc)) from exc
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                raise SeedFileError(config.seed_file, _seed_reason(exc)) from exc
        self._server: RunningServer | None = None
        self.url: str | None = None
        self.app = web.Application(
            middlewares=[*middlewares, self.core.middleware], client_max_size=client_max_size
        )
        self._add_routes(self.app)
        self.core.add_inspection_routes(self.app, state)

    # -- the platform's hooks -------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> str:
        """The client's identity (the rate-limit key), or raise :class:`ApiError` (401/403)."""
        raise NotImplementedError

    def _render_error(self, error: ApiError) -> web.StreamResponse:
        """The platform's error body for ``error``; keep ``error.headers`` (Retry-After and the like)."""
        raise NotImplementedError

    def _add_routes(self, app: web.Application) -> None:
        """Add the API routes under ``api_prefix``, each named after its endpoint (the key for limits, faults
        and stats; an unnamed route is keyed by its path below the prefix)."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def stats(self) -> SandboxStats:
        """The counters (also at ``GET /_sandbox/stats``)."""
        return self.core.stats

    def configure(
        self,
        *,
        limits: Mapping[str, RateLimit] | None = None,
        faults: FaultSpec | None = None,
        seed: int | None = None,
    ) -> None:
        """Change rate limits, faults and/or the fault seed while running (None leaves a setting as it is)."""
        self.core.configure(limits=limits, faults=faults, seed=seed)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in the running event loop (port 0: a free one); returns the base URL, e.g.
        ``http://127.0.0.1:PORT/rest/3.0/``. A stopped sandbox can start again, with its state."""
        self.core.reopen()
        self._server = await start_app(self.app, host, port)
        self.url = self._server.root_url + self.api_prefix
        return self.url

    @property
    def port(self) -> int:
        """The port it listens on (RuntimeError when not started)."""
        if self._server is None:
            raise RuntimeError("the sandbox is not started")
        return self._server.port

    async def stop(self) -> None:
        """Stop serving (hung requests are released first so this is quick)."""
        await self.core.close()
        if self._server is not None:
            await self._server.stop()
            self._server = None


T = TypeVar("T")


def table(items: Sequence[T], columns: Mapping[str, tuple[Any, str | Callable[[T], Any]]]) -> pl.DataFrame:
    """``items`` as a polars DataFrame: a column per entry ``name: (polars dtype, attribute name or getter)``.

    The dtypes make the schema explicit, so an empty state still gives the columns (and Parquet files that seed
    a new sandbox)."""
    import polars as pl

    data = {
        name: list(map(attrgetter(get) if isinstance(get, str) else get, items))
        for name, (_dtype, get) in columns.items()
    }
    return pl.DataFrame(data, schema={name: dtype for name, (dtype, _get) in columns.items()})
