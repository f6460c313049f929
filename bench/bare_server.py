"""A bare HTTP server for the benchmarks: reads each POST's body whole and answers ``{}`` at once (no checks).

    .venv/bin/python bench/bare_server.py [--port 0]      # prints its base URL (…/rest/3.0/) when ready

Used by ``bench/bench_dispatch.py`` (its default server) to find the client's own cost with a server that can
never be the bottleneck; ``--server stateless`` uses the stateless Netmera sandbox instead, which also checks
every body's shape.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def answer(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"{}", content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/rest/3.0/{endpoint}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"http://127.0.0.1:{bound}/rest/3.0/", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
