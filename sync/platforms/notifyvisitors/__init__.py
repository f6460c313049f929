"""NotifyVisitors REST API v1: request shapes, limits and value formats (:mod:`.requests`, no I/O) and the aiohttp
connector (:mod:`.client`). The emulator is :mod:`sync.sandboxes.notifyvisitors`.

Facts from seed 004 (``/work/shared/platforms.md`` §2); everything here is [D] unless marked otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

PLATFORM = "notifyvisitors"

USER_CREATE = "user/create"
"""Create or update users: ``{"nv": [{"userID", "user_attributes": {...}}]}``."""
EVENT_CREATE = "event/create"
"""Record events: ``{"nv": [{"userID", "event_name", "attributes", "event_time"}]}``."""

MAX_USERS_PER_REQUEST = 100
"""At most 100 users per ``user/create`` call."""
MAX_EVENTS_PER_REQUEST = 1000
"""At most 1000 events per ``event/create`` call."""
MAX_USER_ID_LENGTH = 100
"""``userID`` is at most 100 characters."""
MAX_NAME_LENGTH = 49
"""Attribute and event names are *fewer than* 50 characters."""
MAX_STRING_LENGTH = 999
"""String attribute values are *fewer than* 1000 characters."""

DATE_FORMAT = "%Y-%m-%d"
"""``birth_date`` as YYYY-MM-DD."""
EVENT_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
"""``event_time`` as ``yyyy-MM-dd HH:mm:ss``."""
E164_PATTERN = r"^\+[1-9][0-9]{7,14}$"
"""``mobile`` in E.164: ``+``, a country code not starting with 0, 8 to 15 digits in all."""
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
"""[I] ``email`` must look like an address: a plausibility check (no whitespace, one ``@``, a dot in the
domain), not RFC 5322. A Python pattern (``\\s`` is Python's whitespace)."""
OPT_IN_ATTRIBUTES = ("email_opt_in", "sms_opt_in")
"""Opt-in flags, sent as the strings ``"1"`` / ``"0"`` (the seed's example sends ``email_opt_in: "1"``)."""
DATE_ATTRIBUTES = ("birth_date",)

RATE_LIMITS_PER_MINUTE: Mapping[str, int] = {"user": 100, "event": 500, "campaign": 500, "reporting": 50}
"""Default rate limits per API family, requests per minute; 429 with ``X-RateLimit-Remaining`` above them."""
FAMILY_OF: Mapping[str, str] = {USER_CREATE: "user", EVENT_CREATE: "event"}
"""The API family (rate-limit bucket) of each endpoint pushsync uses."""

__all__ = [
    "DATE_ATTRIBUTES",
    "DATE_FORMAT",
    "E164_PATTERN",
    "EMAIL_PATTERN",
    "EVENT_CREATE",
    "EVENT_TIME_FORMAT",
    "FAMILY_OF",
    "MAX_EVENTS_PER_REQUEST",
    "MAX_NAME_LENGTH",
    "MAX_STRING_LENGTH",
    "MAX_USERS_PER_REQUEST",
    "MAX_USER_ID_LENGTH",
    "OPT_IN_ATTRIBUTES",
    "PLATFORM",
    "RATE_LIMITS_PER_MINUTE",
    "USER_CREATE",
]
