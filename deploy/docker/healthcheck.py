"""The image's HEALTHCHECK (Docker only: Kubernetes uses the probes in deploy/k8s instead).

    python healthcheck.py URL [URL ...]

Exits 0 when any URL answers 200 within 3 s, else 1. The image gives it the API's /livez and the worker's
metrics port, so one HEALTHCHECK serves both `ipt api` and `ipt worker` containers. Standard library only.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def healthy(urls: list[str], timeout: float = 3.0) -> bool:
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            continue
    return False


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: healthcheck.py URL [URL ...]")
    sys.exit(0 if healthy(sys.argv[1:]) else 1)
