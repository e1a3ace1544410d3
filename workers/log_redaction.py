"""Keep users' examples out of worker logs.

When a job raises, RQ logs the error with the job's arguments attached to the log record
(`extra={'arguments': job.args, 'kwargs': job.kwargs}`): for an IST job those are the user's examples,
and any structured log handler (JSON logs shipped to a log store) would write them out. This filter,
on RQ's worker logger, replaces those attributes with a marker and blanks every text of the arguments
that the message itself (the traceback, an exception's text) repeats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

REDACTED = "<redacted>"
MIN_TEXT_CHARS = 4
"""Shorter texts are left in the message: blanking every "a" or "ok" would garble the traceback."""

RQ_WORKER_LOGGER = "rq.worker"


def _texts(value: Any) -> Iterator[str]:
    """Every string inside the arguments (values only: dict keys are field names, not user data)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list | tuple | set):
        for v in value:
            yield from _texts(v)


class JobArgumentsFilter(logging.Filter):
    """Redacts a failed job's arguments from RQ's log records (the record is kept, minus the data)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "arguments") and not hasattr(record, "kwargs"):
            return True
        data = (getattr(record, "arguments", None), getattr(record, "kwargs", None))
        keep = {str(getattr(record, "job_id", ""))}
        texts: set[str] = set()
        for text in _texts(data):
            if len(text) >= MIN_TEXT_CHARS and text not in keep:
                texts.update({text, repr(text)[1:-1]})  # as is, and as a repr inside an exception's text
        record.arguments = REDACTED
        record.kwargs = REDACTED
        if texts:
            message = record.getMessage()
            for text in sorted(texts, key=len, reverse=True):
                message = message.replace(text, REDACTED)
            record.msg, record.args = message, ()
        return True


def install_job_log_redaction() -> None:
    """Add the filter to RQ's worker logger (once per process)."""
    logger = logging.getLogger(RQ_WORKER_LOGGER)
    if not any(isinstance(f, JobArgumentsFilter) for f in logger.filters):
        logger.addFilter(JobArgumentsFilter())
