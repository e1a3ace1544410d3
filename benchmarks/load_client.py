"""A closed-loop HTTP load client that the benchmarks run as a process of its own, so that the client's work does
not share the served app's interpreter (and its GIL), as with real users.

Reads one JSON object on stdin: {"base": URL, "concurrency": C, "requests": [[path, body], ...]}. C clients each
POST their next request as soon as their last one is answered, until all are answered. Writes one JSON object on
stdout: {"latencies": [seconds per request], "wall": seconds for the whole run, "examples": inputs answered}.
Exits 1 with the answer's text on stderr at the first non-200 answer. Imports nothing heavy (httpx only).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import httpx


async def run(base: str, concurrency: int, requests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    examples = 0
    pending = iter(requests)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits, trust_env=False) as client:

        async def user() -> None:
            nonlocal examples
            for path, body in pending:
                start = time.perf_counter()
                response = await client.post(path, json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
                examples += len(body.get("inputs", ()))

        # open the connections first, so that the timed run does not pay the TCP handshakes
        await asyncio.gather(*(client.get("/livez") for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(max(1, concurrency))))
        return {"latencies": latencies, "wall": time.perf_counter() - start, "examples": examples}


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
