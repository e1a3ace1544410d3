"""The service fixtures (a real Redis, the tiny model and its subspace, settings in the environment)."""

from tests.service.conftest import env_settings, service_settings  # noqa: F401
