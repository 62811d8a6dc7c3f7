"""The thinnest aiohttp relay: the floor Frugal's proxy overhead is measured against.

    python scripts/relay.py --upstream http://127.0.0.1:8101 --port 8200

One shared ClientSession; the request body goes up as is, the response bytes come back as they
arrive (SSE included). No parsing, no headers beyond the content type.
"""

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    url = request.app[UPSTREAM] + request.path_qs
    body, headers = await request.read(), {"Content-Type": request.content_type}
    async with request.app[SESSION].request(request.method, url, data=body, headers=headers) as up:
        content_type = up.headers.get("Content-Type", "application/octet-stream")
        response = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)  # no pool cap: the relay must not queue
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    # handler_cancellation: a client that leaves aborts the upstream request, as Frugal does.
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        backlog=4096,  # as the fake engine and Frugal: benchmarks open 1,000 connections at once
        loop=uvloop.new_event_loop(),
    )
