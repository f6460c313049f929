"""Keeping secrets out of logs, the ledger, reports and error messages.

Every secret a run resolves is registered here; :func:`redact` replaces any registered secret in a string,
:func:`redact_pieces` also any run of :data:`PIECE` characters of one (for what a *server* says, which may echo a
key cut short), :func:`describe_request` is the one function that builds request descriptions (it never includes
headers), and :func:`structlog_processor` scrubs every log event before it is rendered.
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import Any

__all__ = ["PIECE", "describe_request", "redact", "redact_pieces", "register_secret", "structlog_processor"]

PIECE = 8
"""The shortest run of a secret's characters :func:`redact_pieces` masks: shorter runs of a long random key say
nothing about it, and masking them would mangle ordinary text."""

_MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()  # every secret value resolved in this process; never logged
# Every PIECE-character run of a registered secret; replaced whole under the lock, so readers need none.
_pieces: frozenset[str] = frozenset()


def register_secret(value: str) -> None:
    """Remember a secret so that it is masked wherever it would be printed or stored."""
    global _pieces
    if value and len(value) >= 4:  # masking 1-3 character strings would mangle ordinary text
        with _lock:
            _secrets.add(value)
            if len(value) >= PIECE:
                _pieces = _pieces | {value[i : i + PIECE] for i in range(len(value) - PIECE + 1)}


def redact(text: str) -> str:
    """Return ``text`` with every registered secret masked."""
    if not _secrets or not text:
        return text
    for secret in tuple(_secrets):
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def redact_pieces(text: str) -> str:
    """Return ``text`` with every registered secret masked, and every run of :data:`PIECE` or more characters
    of one: a server that echoes a key may cut it short, or quote part of it.

    Meant for what a platform answered (one message, a bounded body); cost is linear in ``text``."""
    text = redact(text)
    known = _pieces
    if not known or len(text) < PIECE:
        return text
    spans: list[list[int]] = []  # [start, end) of runs to mask; overlapping or touching windows merge
    for i in range(len(text) - PIECE + 1):
        if text[i : i + PIECE] in known:
            if spans and i <= spans[-1][1]:
                spans[-1][1] = i + PIECE
            else:
                spans.append([i, i + PIECE])
    if not spans:
        return text
    out: list[str] = []
    last = 0
    for start, end in spans:
        out += [text[last:start], _MASK]
        last = end
    out.append(text[last:])
    return "".join(out)


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
