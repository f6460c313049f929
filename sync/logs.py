"""The one place structlog is configured: JSON lines when stderr is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

from sync.redact import structlog_processor


def _load_structlog_without_rich() -> None:
    """Import structlog without letting it import rich, when neither is loaded yet.

    structlog's package imports ``structlog.dev`` and ``structlog.tracebacks``, which import rich when it is
    installed (~55 ms, a twentieth of a run's start-up) for pretty tracebacks of exceptions a renderer meets
    still attached to an event. Ours never are: :func:`structlog.processors.format_exc_info` turns them into
    text before the renderer (JSON or console) runs, so structlog's use of rich would never show. rich stays
    importable for everything else (the progress bar): it is hidden only while structlog loads.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError meanwhile
    try:
        import structlog  # noqa: F401
    finally:
        if "rich" in sys.modules and sys.modules["rich"] is None:
            del sys.modules["rich"]


_load_structlog_without_rich()

import structlog  # noqa: E402  (loaded above)

__all__ = ["configure_logging", "get_logger"]


class _Stderr:
    """Writes to whatever ``sys.stderr`` is *now*: a stream captured at configure time may be closed later
    (test runners swap it), and a log line must never fail a run."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once per process. ``json=None`` picks JSON when stderr is not a TTY."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog_processor,  # last before rendering: nothing a processor adds escapes redaction
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    """A bound structlog logger with the given context (job, endpoint, batch...).

    In a program that embeds pushsync (``sync.run``) and never configured structlog, the first logger configures
    it as the command line would by default (info, to stderr, JSON unless stderr is a terminal, secrets masked):
    structlog's own defaults print to stdout — into the program's output — and mask nothing. A program that
    configured structlog keeps its own set-up, before or after this call.
    """
    if not structlog.is_configured():
        configure_logging()
    return structlog.get_logger("pushsync").bind(**context)
