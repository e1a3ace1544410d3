"""`python -m workers`: one IST worker (what `ipt worker` and `ipt serve` start); settings from IPT_* variables."""

import argparse
import logging
import os
import signal
import sys

from workers.worker import run_worker

PARENT_ENV = "IPT_EXIT_WITH_PARENT"
"""`ipt serve` sets it to its pid: the worker then gets SIGTERM (a warm shutdown) if that process dies."""


def exit_with_parent() -> None:
    """Linux: ask the kernel to send SIGTERM when the process that started us dies (even by SIGKILL), so that
    a killed `ipt serve` leaves no worker behind; exit at once if it is already gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # it died before prctl took effect
        sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_with_parent()
    run_worker(burst=args.burst)


if __name__ == "__main__":
    main()
