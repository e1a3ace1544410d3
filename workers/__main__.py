"""`python -m workers`: one IST worker (what `ipt worker` and `ipt serve` start)."""

import logging

from workers.worker import run_worker

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker()
