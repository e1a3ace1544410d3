"""The service fixtures (a real Redis, the tiny model and its subspace, settings in the environment, the real app
and its clients): worker tests drive the worker through the API, as users do."""

from tests.service.conftest import alice, bob, env_settings, server, service_settings  # noqa: F401
