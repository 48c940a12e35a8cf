"""What the HTTP transport relies on from aiohttp when a peer's stream dies.

A forwarded write whose frame surely never left may be sent to another node; one that
may have arrived must be answered "outcome unknown". The transport tells them apart by
the error aiohttp raises when the stream is already closing: it is raised before any
byte of the frame is written. If an aiohttp upgrade changes that, this test fails.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from kvstore.transport.http import _refused_before_write


async def test_a_send_on_a_stream_whose_peer_vanished_is_refused_before_writing() -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        assert request.transport is not None
        request.transport.abort()           # the peer process dies: no close frame
        return ws

    app = web.Application()
    app.router.add_get("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]   # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"http://127.0.0.1:{port}/stream",
                                    timeout=aiohttp.ClientWSTimeout(ws_close=1.0))
            drain = asyncio.create_task(ws.receive())   # notices the end of the stream
            refused: BaseException | None = None
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                try:
                    await ws.send_bytes(b"frame")
                except (aiohttp.ClientError, ConnectionError, OSError) as e:
                    refused = e
                    break
                await asyncio.sleep(0.01)
            await drain
            assert refused is not None, "sending kept succeeding on a dead stream"
            assert _refused_before_write(refused), repr(refused)
    finally:
        await runner.cleanup()


def test_other_send_failures_are_not_taken_for_unsent() -> None:
    assert not _refused_before_write(ConnectionResetError("Connection lost"))
    assert not _refused_before_write(TimeoutError())
    assert not _refused_before_write(OSError("broken pipe"))
