"""The platform layer: the :class:`sync.platforms.base.Platform` protocol, the one registry
(:mod:`sync.platforms.registry`) and one package per platform (its Platform object, request shapes and connector).

aiohttp is imported only here and in the sandboxes (the local emulators, which depend on this layer and never the
other way round); everything above sees our own records (:mod:`sync.records`) and errors (:mod:`sync.errors`).
"""
