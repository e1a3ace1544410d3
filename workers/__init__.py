"""RQ workers: IST jobs on a process-wide model (loaded once per worker process)."""
