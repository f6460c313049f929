"""The platform layer: one module per platform (its connector), and the sandboxes (local emulators) beside them.

aiohttp is imported only here and in :mod:`sync.platforms.sandboxes`; everything above sees our own records
(:mod:`sync.records`) and errors (:mod:`sync.errors`).
"""
