"""How ``pushsync sandbox <name>`` starts a sandbox: the :class:`SandboxCommand` a sandbox module exposes.

A platform names its sandbox module (:attr:`sync.platforms.base.Platform.sandbox`); that module defines
``SANDBOX_COMMAND``, a :class:`SandboxCommand` — its help, credentials, extra options and how to build the
sandbox from them. The CLI lists the registry's platforms and imports a sandbox module only when it is started,
so no other command loads aiohttp. This module imports nothing heavy: the CLI reads it at start.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sync.sandboxes._base import PlatformSandbox

__all__ = [
    "API_KEY_ENV",
    "CONFIG_HELP",
    "FOF_KEY_ENV",
    "NV_KEY_ENV",
    "NV_TOKEN_ENV",
    "PASSWORD_ENV",
    "Build",
    "Built",
    "Credential",
    "SandboxCommand",
    "command_of",
]

API_KEY_ENV = "NETMERA_SANDBOX_API_KEY"
NV_KEY_ENV = "NOTIFYVISITORS_SANDBOX_API_KEY"
NV_TOKEN_ENV = "NOTIFYVISITORS_SANDBOX_BEARER_TOKEN"
FOF_KEY_ENV = "FORMSONFIRE_SANDBOX_INTEGRATION_KEY"
PASSWORD_ENV = "MEIRO_SANDBOX_PASSWORD"

CONFIG_HELP = "YAML/JSON file: limits, faults, seed, [I] choices"

Built = tuple["PlatformSandbox[Any, Any]", list[str]]
Build = Callable[[argparse.Namespace, dict[str, Any], dict[str, str]], Built]
"""(parsed options, config document, credentials by setting) → (the sandbox, lines to print when it is ready).
May raise ValueError, TypeError, KeyError or OSError for a bad config or seed file."""


@dataclass(frozen=True, slots=True)
class Credential:
    """A secret the sandbox accepts: ``--<setting>``, else ``$env``, else ``setting`` in the config file, else a
    random one, printed once with ``label``."""

    setting: str
    """The config setting (and the option: ``api_key`` → ``--api-key``)."""
    env: str
    label: str
    help: str
    metavar: str = "KEY"


@dataclass(frozen=True, slots=True)
class SandboxCommand:
    """One ``pushsync sandbox <name>`` subcommand: its help, credentials, extra options and how to build it."""

    name: str
    help: str
    build: Build
    seed_help: str = "JSON state to load at start"
    config_help: str = CONFIG_HELP
    credentials: tuple[Credential, ...] = ()
    options: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the platform's own options."""


def command_of(module: str) -> SandboxCommand:
    """The ``SANDBOX_COMMAND`` of the sandbox module ``module`` (imported now)."""
    command = getattr(importlib.import_module(module), "SANDBOX_COMMAND", None)
    if not isinstance(command, SandboxCommand):
        raise TypeError(f"sandbox module {module} defines no SANDBOX_COMMAND (a SandboxCommand)")
    return command
