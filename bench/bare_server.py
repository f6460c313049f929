"""A bare HTTP server for the benchmarks: reads each POST's body whole and answers ``{}`` at once (no checks).

    .venv/bin/python bench/bare_server.py [--port 0] [--record FILE]   # prints its base URL (…/rest/3.0/) when ready

``--record FILE``: every request is also appended to FILE as one line, ``<endpoint> <body>`` (one unbuffered
write each, so a SIGTERM loses nothing), for a benchmark to check afterwards what a client sent
(:func:`read_recorded`) without the server spending time on it while the client is measured.

Used by ``bench/bench_dispatch.py`` (its default server) to find the client's own cost with a server that can
never be the bottleneck; ``--server stateless`` uses the stateless Netmera sandbox instead, which also checks
every body's shape.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


async def serve(port: int, record: Path | None) -> None:
    from aiohttp import web

    sink: BinaryIO | None = record.open("wb", buffering=0) if record is not None else None

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        if sink is not None:
            sink.write(b"".join((request.match_info["endpoint"].encode(), b" ", body, b"\n")))
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/rest/3.0/{endpoint}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"http://127.0.0.1:{bound}/rest/3.0/", flush=True)
    await asyncio.Event().wait()


def read_recorded(path: Path) -> Iterator[tuple[str, bytes]]:
    """The requests a ``--record`` server received, in order: (endpoint, body). A JSON body is one line (JSON
    escapes its newlines)."""
    with path.open("rb") as fh:
        for line in fh:
            endpoint, _, body = line.rstrip(b"\n").partition(b" ")
            yield endpoint.decode(), body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--record", type=Path, help="append every request to this file: '<endpoint> <body>' lines"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.record))


if __name__ == "__main__":
    main()
