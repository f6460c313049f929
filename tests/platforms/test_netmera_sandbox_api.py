"""The public surface of the sandbox machinery, pinned: the other sandboxes build on ``_core``."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from sync.sandboxes import _core, netmera
from sync.sandboxes._core import FaultSpec


def test_core_public_names_are_pinned() -> None:
    assert sorted(_core.__all__) == [
        "Admission",
        "ApiError",
        "FaultDecision",
        "FaultInjector",
        "FaultKind",
        "FaultSpec",
        "FixedWindowLimiter",
        "InspectableState",
        "LatencySpec",
        "RateLimit",
        "RunningServer",
        "SandboxCore",
        "SandboxStats",
        "json_response",
        "loads_json",
        "parse_limits",
        "start_app",
    ]
    for name in _core.__all__:
        assert hasattr(_core, name)


def test_netmera_public_names_are_pinned() -> None:
    assert sorted(netmera.__all__) == [
        "API_PREFIX",
        "LastPage",
        "NetmeraSandbox",
        "NetmeraSandboxConfig",
        "UnknownExtId",
        "WriteResponse",
    ]
    for name in netmera.__all__:
        assert hasattr(netmera, name)


async def test_a_stopped_sandbox_can_start_again(netmera_sandbox: Any) -> None:
    sandbox = netmera_sandbox.sandbox
    await netmera_sandbox.post("tagUsers", {"tag": "T", "extIds": ["a"]})
    await sandbox.stop()
    url = await sandbox.start()
    async with netmera_sandbox.session.get(url + "getDeviceTokens", headers=netmera_sandbox.headers) as resp:
        assert resp.status == 200
    assert sandbox.state.tags["T"] == {"a"}  # state survives a restart in the same process
    sandbox.configure(faults=FaultSpec(hang=1.0))
    with pytest.raises(TimeoutError):  # a hang holds the request again (stop had released hangs)
        async with netmera_sandbox.session.get(
            url + "getDeviceTokens", headers=netmera_sandbox.headers, timeout=aiohttp.ClientTimeout(total=0.2)
        ):
            pass


def test_config_from_mapping_refuses_unknown_keys_and_parses_enums() -> None:
    config = netmera.NetmeraSandboxConfig.from_mapping(
        {"unknown_ext_id": "error", "last_page": "null", "limits": {"*": {"per_second": 5}}}
    )
    assert config.unknown_ext_id is netmera.UnknownExtId.ERROR
    assert config.last_page is netmera.LastPage.NULL
    assert config.limits["*"].requests == 5
    with pytest.raises(ValueError, match="api_kee"):
        netmera.NetmeraSandboxConfig.from_mapping({"api_kee": "x"})
