"""Send exactly N requests over C keep-alive connections, then exit (a load of known size).

wrk runs for a time; counting instructions per request needs a count. Each connection sends
one request at a time (HTTP/1.1, Content-Length answers) and checks for a 200.

Usage: python fixed_load.py URL BODY_FILE N C [HEADER: VALUE ...]
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import urlsplit


async def connection(host: str, port: int, request: bytes, count: int) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    bad = 0
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        bad += status != b"200"
    writer.close()
    return bad


async def main(url: str, body_file: str, n: int, c: int, headers: list[str]) -> int:
    parts = urlsplit(url)
    with open(body_file, "rb") as fh:
        body = fh.read()
    extra = "".join(f"{h}\r\n" for h in headers)
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
    counts = [n // c + (1 if i < n % c else 0) for i in range(c)]
    bad = await asyncio.gather(*(connection(parts.hostname or "127.0.0.1", parts.port or 80, request, k)
                                 for k in counts if k))
    return sum(bad)


if __name__ == "__main__":
    failures = asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]))
    print(f"non-200: {failures}")
    raise SystemExit(1 if failures else 0)
