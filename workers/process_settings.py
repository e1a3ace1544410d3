"""The settings a worker process was started with (CLI flags included): set once by workers/worker.py,
read by every job it runs (an RQ job gets only its payload)."""

from __future__ import annotations

from service.settings import Settings

_process_settings: Settings | None = None


def set_process_settings(settings: Settings) -> None:
    """The settings this worker process was started with; jobs use them."""
    global _process_settings
    _process_settings = settings


def process_settings() -> Settings:
    """The worker's settings, or settings from the environment when none were set."""
    return _process_settings or Settings()


def reset_process_settings() -> None:
    """Forget the process settings (tests)."""
    global _process_settings
    _process_settings = None
