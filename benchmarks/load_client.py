"""A closed-loop HTTP load client that the benchmarks run as a process of its own, so that the client's work does
not share the served app's interpreter (and its GIL), as with real users.

Reads one JSON object on stdin: {"base": URL, "concurrency": C, "requests": [[path, body], ...]}. C clients each
POST their next request as soon as their last one is answered, until all are answered. Writes one JSON object on
stdout: {"latencies": [seconds per request], "wall": seconds for the whole run, "examples": inputs answered,
"cpu": CPU seconds this process spent in the timed run}. Exits 1 with the answer's text on stderr at the first
non-200 answer.

Each client is one keep-alive HTTP/1.1 connection spoken with h11 (the protocol library under httpx and uvicorn)
over asyncio streams, with the request bodies encoded before the clock starts. A load generator that shares the
served app's 2 cores takes CPU from the model it measures: httpx's AsyncClient spent ~9 ms of CPU per predict
request here (~23% of a core at 25 requests/s, measured 2026-12-07), this client ~0.1 ms per request (a loopback
GET: 0.12 vs 3.1 ms), so the figures describe the server rather than the client (wrk and h2load are lean for the
same reason). Imports nothing heavy.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import h11

READ_BYTES = 1 << 16


class Connection:
    """One keep-alive HTTP/1.1 connection: requests go one after another, each answer read whole."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.protocol = h11.Connection(h11.CLIENT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()

    def encode(self, method: str, path: str, body: bytes = b"") -> list[h11.Event]:
        headers = [("Host", self.host), ("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", "application/json"))
        events: list[h11.Event] = [h11.Request(method=method, target=path, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        return [*events, h11.EndOfMessage()]

    async def send(self, events: list[h11.Event]) -> tuple[int, bytes]:
        """Send one request (h11 events); returns (status code, body) of its answer."""
        assert self.reader is not None and self.writer is not None, "open() first"
        protocol = self.protocol
        if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
            protocol.start_next_cycle()
        self.writer.write(b"".join(protocol.send(e) or b"" for e in events))
        status = 0
        chunks: list[bytes] = []
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                protocol.receive_data(await self.reader.read(READ_BYTES))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise RuntimeError("the server closed the connection before answering")


async def run(base: str, concurrency: int, requests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    connections = [Connection(host, port) for _ in range(max(1, concurrency))]
    encoded = [(path, json.dumps(body).encode(), len(body.get("inputs", ()))) for path, body in requests]
    pending = iter(encoded)
    latencies: list[float] = []
    examples = 0

    async def user(connection: Connection) -> None:
        nonlocal examples
        for path, body, n_inputs in pending:
            events = connection.encode("POST", path, body)
            start = time.perf_counter()
            status, answer = await connection.send(events)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"POST {path}: {status} {answer[:300].decode(errors='replace')}")
            examples += n_inputs

    try:
        # open the connections first, so that the timed run does not pay the TCP handshakes
        await asyncio.gather(*(c.open() for c in connections))
        await asyncio.gather(*(c.send(c.encode("GET", "/livez")) for c in connections))
        cpu = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(user(c) for c in connections))
        wall = time.perf_counter() - start
        return {"latencies": latencies, "wall": wall, "examples": examples, "cpu": time.process_time() - cpu}
    finally:
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)


def main() -> None:
    job = json.load(sys.stdin)
    try:
        result = asyncio.run(run(job["base"], int(job["concurrency"]), [tuple(r) for r in job["requests"]]))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
