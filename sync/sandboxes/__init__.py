"""Sandboxes: strict, stateful local emulators of the platforms' APIs (aiohttp.web), one module per platform."""
