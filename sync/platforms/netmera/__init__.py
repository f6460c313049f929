"""Netmera REST API 3.0: request shapes and limits (:mod:`.requests`, no I/O) and the aiohttp connector
(:mod:`.client`). The emulator is :mod:`sync.sandboxes.netmera`."""

PLATFORM = "netmera"
MAX_IDS_PER_REQUEST = 1000
"""At most 1000 unique external IDs (or device tokens) per request [D]."""
