"""Keeping secrets out of logs, the ledger, reports and error messages.

Every secret a run resolves is registered here; :func:`redact` replaces any registered secret in a string,
:func:`describe_request` is the one function that builds request descriptions (it never includes headers), and
:func:`structlog_processor` scrubs every log event before it is rendered.
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import Any

__all__ = ["describe_request", "redact", "register_secret", "structlog_processor"]

_MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()  # every secret value resolved in this process; never logged


def register_secret(value: str) -> None:
    """Remember a secret so that it is masked wherever it would be printed or stored."""
    if value and len(value) >= 4:  # masking 1-3 character strings would mangle ordinary text
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """Return ``text`` with every registered secret masked."""
    if not _secrets or not text:
        return text
    for secret in tuple(_secrets):
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, BaseException):
        return redact(repr(value))
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def describe_request(
    method: str, url: str, *, endpoint: str | None = None, batch_id: str | None = None
) -> str:
    """A human description of a request for logs and errors: method and URL without query secrets or headers."""
    parts = [method.upper(), redact(url.split("?", 1)[0])]
    if endpoint:
        parts.append(f"endpoint={endpoint}")
    if batch_id:
        parts.append(f"batch={batch_id}")
    return " ".join(parts)


def structlog_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor that masks registered secrets in every field of an event."""
    if not _secrets:
        return event_dict
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(value)
    return event_dict
