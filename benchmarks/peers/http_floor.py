"""The HTTP floor: uvloop + httptools answering every request with one canned OIP response.

No routing, no JSON, no model: the cost of HTTP/1.1 keep-alive on this core, which any Python
server built on the same two libraries (modelpod's is) pays at least. The harness passes
BENCH_HOST, BENCH_PORT and BENCH_RESPONSE (the response body, JSON text).
"""

from __future__ import annotations

import asyncio
import os

import httptools
import uvloop


def canned(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)) + body


class Floor(asyncio.Protocol):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport is not None:
            self.transport.write(self.answer)


async def main() -> None:
    answer = canned(os.environ["BENCH_RESPONSE"].encode())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Floor(answer), os.environ.get("BENCH_HOST", "127.0.0.1"),
                                      int(os.environ["BENCH_PORT"]), backlog=2048, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
