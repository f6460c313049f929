"""A strict, stateful local emulator of the Netmera REST API 3.0 (see ``docs/sandbox.md``).

Every endpoint of ``/work/shared/platforms.md`` §1 lives under ``/rest/3.0/``. Requests are validated the way
the real API does (``X-netmera-api-key`` → 403/2010, bad JSON → 400/2009, missing field → 400/2020 naming it,
more than 1000 unique extIds → 400) and change the in-memory :class:`~.netmera_state.NetmeraState`; read calls
return the current state. Limits, faults, stats and ``/_sandbox/`` inspection come from :mod:`._core`.

Where the vendor documents nothing ([I] in platforms.md) the behaviour is a :class:`NetmeraSandboxConfig` field.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sync.sandboxes._base import PlatformSandbox
from sync.sandboxes._command import API_KEY_ENV, Built, Credential, SandboxCommand
from sync.sandboxes._core import ApiError, FaultKind, json_response, loads_json
from sync.sandboxes.netmera_config import (
    API_KEY_INVALID,
    INTERNAL_ERROR,
    INVALID_JSON,
    LastPage,
    NetmeraSandboxConfig,
    UnknownExtId,
    Validator,
    WriteResponse,
)
from sync.sandboxes.netmera_handlers import API_PREFIX, NetmeraHandlers
from sync.sandboxes.netmera_state import NetmeraState

__all__ = [
    "API_PREFIX",
    "LastPage",
    "NetmeraSandbox",
    "NetmeraSandboxConfig",
    "UnknownExtId",
    "WriteResponse",
]


# ---------------------------------------------------------------------------------------------- the sandbox


class NetmeraSandbox(NetmeraHandlers, PlatformSandbox[NetmeraSandboxConfig, NetmeraState]):
    """The Netmera emulator: ``await sandbox.start(host, port)`` returns the base URL (ending ``/rest/3.0/``).

    ``state`` is the live :class:`NetmeraState`; ``stats`` the :class:`SandboxStats`; ``core`` the
    :class:`SandboxCore` (use :meth:`configure` to change limits and faults while running).
    """

    api_prefix = API_PREFIX

    def __init__(
        self,
        config: NetmeraSandboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        config = config or NetmeraSandboxConfig()
        self._check = Validator(config)
        self._key = config.api_key.encode()
        super().__init__(
            config,
            NetmeraState(clock),
            clock=clock,
            sleep=sleep,
            fault_error=_fault_error,
            groups=config.limit_groups,
            client_max_size=config.max_body_bytes,
        )

    @property
    def api_key(self) -> str:
        """The key requests must carry in ``X-netmera-api-key``."""
        return self.config.api_key

    # -- plumbing --------------------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        posts: dict[str, Callable[[Any], Any]] = {
            "deleteUsersPermanently": self._delete_users,
            "disablePush": self._disable_push,
            "enablePush": self._enable_push,
            "tagUsers": self._tag_users,
            "untagUsers": self._untag_users,
            "setCategoryPreferences": self._set_category_preferences,
            "setProfileAttributes": self._set_profile,
            "unsetProfileAttributes": self._unset_profile,
            "pushProfileAttributes": self._push_profile,
            "pullProfileAttributes": self._pull_profile,
            "deleteProfileAttributes": self._delete_profile_attributes,
            "deleteProfileAttributeValue": self._delete_profile_attribute_value,
            "sendPushApproval": self._send_push_approval,
            "enableMail": self._enable_mail,
            "disableMail": self._disable_mail,
            "updateEmail": self._update_email,
            "enableSms": self._enable_sms,
            "disableSms": self._disable_sms,
            "updateMsisdn": self._update_msisdn,
            "fireEvents": self._fire_events,
            "sendBulkNotification": self._send_bulk_notification,
            "sendNotification": self._send_notification,
        }
        for name, apply in posts.items():
            app.router.add_post(API_PREFIX + name, self._write_handler(name, apply), name=name)
        gets: dict[str, Callable[[web.Request], Any]] = {
            "getCategoryPreferences": self._get_category_preferences,
            "getProfileAttributes": self._get_profile,
            "getDevices": self._get_devices,
            "getDeviceTokens": self._get_device_tokens,
            "getSegments": self._get_segments,
            "getSegmentUsers": self._get_segment_users,
            "getPushStats": self._get_push_stats,
            "getPushResult": self._get_push_result,
        }
        for name, read in gets.items():
            app.router.add_get(API_PREFIX + name, self._read_handler(read), name=name, allow_head=False)

    def _authenticate(self, request: web.Request) -> str:
        key = request.headers.get("X-netmera-api-key")
        if not key or not hmac.compare_digest(key.encode(), self._key):
            raise ApiError(403, API_KEY_INVALID, "API key is invalid")
        return key

    def _render_error(self, error: ApiError) -> web.StreamResponse:
        return json_response(
            {"code": error.code, "error": error.message}, status=error.status, headers=error.headers
        )

    def _write_handler(self, name: str, apply: Callable[[Any], Any]) -> Any:
        empty = self.config.write_response is WriteResponse.EMPTY
        check_type = self.config.require_json_content_type

        async def handler(request: web.Request) -> web.StreamResponse:
            if check_type and request.content_type != "application/json":
                # Netmera documents the header [D]; a Java backend refuses other media types
                raise ApiError(415, INVALID_JSON, "Content-Type must be application/json")
            raw = await request.read()
            try:
                body = loads_json(raw)
            except ValueError:  # also UnicodeDecodeError, NaN and Infinity
                raise ApiError(400, INVALID_JSON, "invalid JSON") from None
            result = apply(body)
            if result is not None:
                return json_response(result)
            if empty:
                return web.Response(status=200)
            return web.Response(body=b"{}", content_type="application/json")

        handler.__name__ = name
        return handler

    def _read_handler(self, read: Callable[[web.Request], Any]) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return json_response(read(request))

        return handler


def _fault_error(kind: FaultKind) -> ApiError:
    if kind is FaultKind.ERROR_503:
        return ApiError(503, INTERNAL_ERROR, "service unavailable")
    return ApiError(500, INTERNAL_ERROR, "internal error")


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stateless",
        action="store_true",
        help="check request shapes strictly but keep nothing and answer at once (for benchmarks)",
    )


def _command(args: argparse.Namespace, data: dict[str, Any], creds: dict[str, str]) -> Built:
    # None when not given: the config file's ``stateless`` then decides.
    stateless = True if args.stateless else None
    config = NetmeraSandboxConfig.from_mapping(data, **creds, seed_file=args.seed_file, stateless=stateless)
    notes = ["stateless: request shapes are checked, nothing is kept"] if config.stateless else []
    return NetmeraSandbox(config), notes


SANDBOX_COMMAND = SandboxCommand(
    "netmera",
    "the Netmera REST API 3.0 sandbox",
    _command,
    seed_help="users/devices/segments to load (JSON, Parquet, or a dir)",
    credentials=(
        Credential(
            "api_key", API_KEY_ENV, "api key", f"API key to accept (default: ${API_KEY_ENV}, else random)"
        ),
    ),
    options=_options,
)
"""``pushsync sandbox netmera``."""
