"""The one place structlog is configured: JSON lines when stderr is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from sync.redact import structlog_processor

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
    """A bound structlog logger with the given context (job, endpoint, batch...)."""
    return structlog.get_logger("pushsync").bind(**context)
