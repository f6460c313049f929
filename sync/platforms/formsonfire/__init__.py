"""Forms On Fire "POST Push API" (and its white-label brands): push bodies and their JSON/XML serialisation
(:mod:`.requests`, no I/O) and the aiohttp connector (:mod:`.client`). The emulator is
:mod:`sync.sandboxes.formsonfire`.

Facts from seed 003 (``/work/shared/platforms.md`` §4): ``POST /api/v2/push?format=json|xml``, one user per
request, body JSON or XML by Content-Type (none → XML), XML root declaring ``xmlns:i``, XML elements in
alphabetical order, ``CompanyId`` and ``IntegrationKey`` inside the body.
"""

from __future__ import annotations

from enum import StrEnum

PLATFORM = "formsonfire"
ENDPOINT = "push"
"""The one endpoint, relative to the API root (``https://<node>/api/v2/``)."""
XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"
"""The namespace every XML request's root must declare as ``xmlns:i``."""
FIELDS = (
    "Body",
    "CompanyId",
    "ExpirySecs",
    "IntegrationKey",
    "Sound",
    "Title",
    "UserEmail",
    "UserExternalId",
    "UserId",
)
"""Every request field, in the (ordinal, alphabetical) order XML bodies must use."""
DEFAULT_XML_ROOT = "PushRequest"
"""[I] The XML root element's name is not documented; the sandbox accepts any by default."""


class UserKey(StrEnum):
    """Which identifier names the target user (one is required)."""

    USER_ID = "UserId"
    """The user's API identifier."""
    USER_EMAIL = "UserEmail"
    USER_EXTERNAL_ID = "UserExternalId"


class BodyFormat(StrEnum):
    """Request/response serialisation: the body's Content-Type and the ``format`` query parameter."""

    JSON = "json"
    XML = "xml"


__all__ = [
    "DEFAULT_XML_ROOT",
    "ENDPOINT",
    "FIELDS",
    "PLATFORM",
    "XSI_NAMESPACE",
    "BodyFormat",
    "UserKey",
]
