"""Keeping secrets out of logs, the ledger, reports and error messages.

Every secret a run resolves is registered here; :func:`redact` replaces any registered secret in a string,
:func:`redact_pieces` also any run of :data:`PIECE` characters of one (for what a *server* says, which may echo a
key cut short), :func:`describe_request` is the one function that builds request descriptions (it never includes
headers), and :func:`structlog_processor` scrubs every log event before it is rendered.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import MutableMapping
from typing import Any

__all__ = [
    "PIECE",
    "describe_request",
    "redact",
    "redact_pieces",
    "register_secret",
    "register_url",
    "structlog_processor",
]

PIECE = 8
"""The shortest run of a secret's characters :func:`redact_pieces` masks: shorter runs of a long random key say
nothing about it, and masking them would mangle ordinary text."""

_MASK = "***"
_lock = threading.Lock()
_secrets: set[str] = set()  # every secret value resolved in this process; never logged
# The same, longest first (a URL before the password inside it); replaced whole under the lock.
_ordered: tuple[str, ...] = ()
# Every PIECE-character run of a registered secret; replaced whole under the lock, so readers need none.
_pieces: frozenset[str] = frozenset()


def register_secret(value: str, *, pieces: bool = True) -> None:
    """Remember a secret so that it is masked wherever it would be printed or stored. ``pieces=False``: masked
    where it appears whole only, not its :data:`PIECE`-character runs in what a platform answers — for a value
    that holds a secret among text that is none (a URL: its scheme, host or path would be masked in every
    answer that names them); register the secret part of it on its own."""
    global _pieces, _ordered
    if value and len(value) >= 4:  # masking 1-3 character strings would mangle ordinary text
        with _lock:
            _secrets.add(value)
            _ordered = tuple(sorted(_secrets, key=len, reverse=True))
            if pieces and len(value) >= PIECE:
                _pieces = _pieces | {value[i : i + PIECE] for i in range(len(value) - PIECE + 1)}


_CREDENTIAL_WORDS = ("password", "passwd", "token", "secret")
_CREDENTIAL_NAMES = frozenset({"pwd", "key", "apikey", "api_key", "sig", "signature", "auth", "code"})


def _is_credential(parameter: str) -> bool:
    """Whether a query parameter's value is a credential: ``password=``, ``access_token=``, ``client_secret=``,
    ``key=`` (Google Chat), ``sig=`` (Azure SAS), ``code=`` (Azure Functions). Not ``sslkey=`` (a file's path)."""
    name = parameter.lower()
    return name in _CREDENTIAL_NAMES or any(word in name for word in _CREDENTIAL_WORDS)


_SECRET_SEGMENT = 16
"""The shortest path segment of a webhook URL taken as its key: Slack's, Discord's and Teams' keys are longer,
the names around them (``services``, ``webhooks``, ``webhookb2``) shorter."""


def register_url(url: str, *, secret_path: bool = False) -> tuple[str, ...]:
    """Register what is secret in ``url`` (a database URL, a webhook) and return it, the URL first: the URL itself
    where it appears whole; its password (as written and percent-decoded) and the value of every query parameter
    named like a credential (``password=``, ``access_token=``, ``key=``, ``sig=``...), in pieces too.
    ``secret_path`` (a webhook, whose path is its key): its path where it appears whole, and each path segment of
    :data:`_SECRET_SEGMENT` characters or more in pieces too. Its scheme, host, port, user and database are no
    secret: registered in pieces, they had every platform answer that says ``https://``, ``127.0.0.1:5`` or
    ``customers`` masked there. A URL that does not parse keeps its password in pieces if one can be told apart
    (``user:password@``); with none, or a query that may hold one, the whole URL is registered in pieces too."""
    keys: list[str] = []
    try:
        parts = urllib.parse.urlsplit(url)
        keys.append(parts.password or "")
        keys += [value for name, value in urllib.parse.parse_qsl(parts.query) if _is_credential(name)]
        whole = False
        if secret_path:
            register_secret(parts.path, pieces=False)  # quoted without its scheme and host
            keys += [segment for segment in parts.path.split("/") if len(segment) >= _SECRET_SEGMENT]
    except ValueError:
        # Not a URL urllib reads (``[::1`` for a host): its password told the way libpq reads it, between the
        # scheme's user and the last "@".
        userinfo = url.split("://", 1)[-1].rsplit("@", 1)
        if len(userinfo) == 2 and ":" in userinfo[0]:
            keys.append(userinfo[0].split(":", 1)[1])
        whole = not keys or "?" in userinfo[-1]
    register_secret(url, pieces=whole)
    out = [url]
    for key in keys:
        for form in (key, urllib.parse.unquote(key)):
            register_secret(form)
            out.append(form)
    return tuple(dict.fromkeys(s for s in out if s))


def redact(text: str) -> str:
    """Return ``text`` with every registered secret masked."""
    if not _secrets or not text:
        return text
    for secret in _ordered:
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
