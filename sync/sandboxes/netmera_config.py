"""Configuration and request validation of the Netmera sandbox: the documented error codes, the choices made
where Netmera documents nothing ([I] in platforms.md), and the field checks that raise the documented errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from aiohttp import web

from sync.platforms.netmera import MAX_IDS_PER_REQUEST
from sync.sandboxes._base import SandboxSettings
from sync.sandboxes._core import ApiError

__all__ = [
    "API_KEY_INVALID",
    "EXT_ID_NOT_FOUND",
    "INTERNAL_ERROR",
    "INVALID_JSON",
    "MISSING_PARAMETER",
    "NOT_AUTHORIZED",
    "QUOTA_EXCEEDED",
    "SEGMENT_NOT_FOUND",
    "LastPage",
    "NetmeraSandboxConfig",
    "UnknownExtId",
    "Validator",
    "WriteResponse",
    "bool_query",
    "missing",
]

# Netmera's documented error codes [D].
INTERNAL_ERROR = 2001
INVALID_JSON = 2009
API_KEY_INVALID = 2010
MISSING_PARAMETER = 2020
NOT_AUTHORIZED = 2022
EXT_ID_NOT_FOUND = 5016
QUOTA_EXCEEDED = 5022
SEGMENT_NOT_FOUND = 5042


class UnknownExtId(StrEnum):
    """What a write naming an extId the sandbox has never seen does [I]."""

    CREATE = "create"
    """Create the user (default: Netmera registers users on first sight — an assumption)."""
    ERROR = "error"
    """Refuse the whole request: 400, code 5016."""


class WriteResponse(StrEnum):
    """The success body of write calls, which Netmera does not document [I]."""

    EMPTY_OBJECT = "empty_object"
    """200 with ``{}`` (default)."""
    EMPTY = "empty"
    """200 with an empty body."""


class LastPage(StrEnum):
    """The next-page link on the last page of getDeviceTokens / getSegmentUsers [I]."""

    OMIT = "omit"
    """No ``nextPage`` key at all (default)."""
    NULL = "null"
    """``"nextPage": null``."""


@dataclass(frozen=True, slots=True)
class NetmeraSandboxConfig(SandboxSettings):
    """Everything a Netmera sandbox can be told. Build from YAML/JSON with :meth:`from_mapping`.

    Also ``limits`` (per endpoint name, e.g. ``tagUsers``, or ``"*"``; off by default), ``faults``, ``seed``,
    ``stats_window`` and ``seed_file`` (JSON or Parquet of users/devices/segments, see
    :meth:`NetmeraState.load_file`) from :class:`SandboxSettings`.
    """

    api_key: str = "netmera-sandbox-key"
    unknown_ext_id: UnknownExtId = UnknownExtId.CREATE
    write_response: WriteResponse = WriteResponse.EMPTY_OBJECT
    last_page: LastPage = LastPage.OMIT
    segment_next_page_field: str = "nextPage"
    """Name of the next-page link of getSegmentUsers, assumed ``nextPage`` [I]."""
    max_ids_per_request: int = MAX_IDS_PER_REQUEST
    too_many_ids_code: int = QUOTA_EXCEEDED
    """Error code of the 400 for more than ``max_ids_per_request`` unique IDs (undocumented) [I]."""
    type_error_code: int = INVALID_JSON
    """Error code of the 400 for a field of the wrong type; Netmera's Java backend reports a body it cannot map
    as invalid JSON, so 2009 is assumed [I]."""
    delete_users_enabled: bool = True
    """deleteUsersPermanently "needs prior activation in the panel": False answers 403, code 2022."""
    require_json_content_type: bool = True
    """POSTs without ``Content-Type: application/json`` get 415, code 2009 [I] (the header is documented)."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Larger request bodies are refused with 413 (Netmera's own limit is not documented)."""
    public_url: str | None = None
    """Root used in ``nextPage`` links; default: the scheme and host the request came to."""
    stateless: bool = False
    """Check every write's request shape as strictly as ever, then answer at once and keep nothing: no users,
    tags or events, so a benchmark measures the client, not the emulator (``pushsync sandbox netmera
    --stateless``). Reads answer as for an empty platform; checks that need state (unknown extIds, a profile
    attribute that is not an array, a segment that does not exist) are not made. The ``applied`` counters of
    ``/_sandbox/stats`` still count what each accepted write names."""
    categories: frozenset[str] | None = None
    """The categories "defined in the Netmera panel" — setCategoryPreferences' ``category`` is "the name of the
    category which is defined in Netmera panel" [D]. When given, a request naming any other category is refused
    whole (400, code 2020 [I]: the code is undocumented), so a job's misspelt category fails its dry run here
    instead of being kept as a preference the platform would not hold. None (default): every name is taken, as
    the sandbox cannot know a panel's categories."""
    limit_groups: Mapping[str, str] = field(default_factory=dict)
    """Endpoint → the limit bucket it shares with others (``{"*": account}`` with ``limits: {account: ...}``:
    one limit for the whole account, every endpoint counted together). Off by default."""

    _enums: ClassVar[Mapping[str, type[StrEnum]]] = {
        "unknown_ext_id": UnknownExtId,
        "write_response": WriteResponse,
        "last_page": LastPage,
    }

    @classmethod
    def _convert(cls, kwargs: dict[str, Any]) -> None:
        categories = kwargs.get("categories")
        if categories is not None:
            if isinstance(categories, str) or not all(type(c) is str and c for c in categories):
                raise ValueError("categories must be a list of category names (non-empty strings)")
            kwargs["categories"] = frozenset(categories)

    def __post_init__(self) -> None:
        if self.stateless and self.seed_file is not None:
            raise ValueError("a stateless sandbox keeps no state: it cannot load a seed_file")
        if self.stateless and self.unknown_ext_id is UnknownExtId.ERROR:
            raise ValueError(
                "a stateless sandbox knows no users: unknown_ext_id: error needs the stateful mode"
            )


# ------------------------------------------------------------------------------------------- validation


def missing(name: str) -> ApiError:
    return ApiError(400, MISSING_PARAMETER, f"missing required parameter: {name}")


def bool_query(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise ApiError(400, INVALID_JSON, f"invalid parameter {name}: expected true or false")
    return lowered == "true"


class Validator:
    """Field checks that raise the configured :class:`ApiError`."""

    __slots__ = ("max_ids", "too_many_code", "type_code")

    def __init__(self, config: NetmeraSandboxConfig) -> None:
        self.max_ids = config.max_ids_per_request
        self.too_many_code = config.too_many_ids_code
        self.type_code = config.type_error_code

    def wrong(self, name: str, expected: str) -> ApiError:
        return ApiError(400, self.type_code, f"invalid parameter {name}: expected {expected}")

    def obj(self, body: Any, name: str = "body") -> dict[str, Any]:
        if type(body) is not dict:
            raise self.wrong(name, "a JSON object")
        return body

    def array(self, body: Any, name: str = "body") -> list[Any]:
        if type(body) is not list:
            raise self.wrong(name, "a JSON array")
        if not body:
            raise ApiError(400, MISSING_PARAMETER, f"missing required parameter: {name} is empty")
        return body

    def string(self, obj: dict[str, Any], name: str, where: str = "") -> str:
        value = obj.get(name)
        if value is None:
            raise missing(where + name)
        if type(value) is not str:
            raise self.wrong(where + name, "a string")
        if not value:
            raise missing(where + name)
        return value

    def strings(self, obj: dict[str, Any], name: str) -> list[str]:
        value = obj.get(name)
        if value is None:
            raise missing(name)
        if type(value) is not list:
            raise self.wrong(name, "an array of strings")
        if not value:
            raise missing(name)
        if set(map(type, value)) != {str}:  # C-speed check of 1000 items (``all(...)`` costs twice as much)
            raise self.wrong(name, "an array of strings")
        if "" in value:
            # An empty extId (or address) names nobody: refused as an array body's empty ``[i].extId`` and
            # enablePush's empty ``extId`` are, instead of creating (tagUsers) or deleting a user named "".
            raise missing(f"{name}[{value.index('')}]")
        return value

    def unique(self, ids: list[str], what: str = "extIds") -> set[str]:
        unique = set(ids)
        if len(unique) > self.max_ids:
            raise ApiError(
                400,
                self.too_many_code,
                f"at most {self.max_ids} unique {what} per request, got {len(unique)}",
            )
        return unique

    def boolean(self, obj: dict[str, Any], name: str, where: str = "") -> bool:
        value = obj.get(name)
        if value is None:
            raise missing(where + name)
        if type(value) is not bool:
            raise self.wrong(where + name, "true or false")
        return value

    def integer(self, obj: dict[str, Any], name: str, where: str = "") -> int:
        value = obj.get(name)
        if value is None:
            raise missing(where + name)
        if type(value) is not int:
            raise self.wrong(where + name, "an integer")
        return value

    def query_int(self, request: web.Request, name: str, default: int | None) -> int:
        raw = request.query.get(name)
        if raw is None or raw == "":
            if default is None:
                raise missing(name)
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self.wrong(name, "an integer") from None
        if value < 0:
            raise self.wrong(name, "a non-negative integer")
        return value
