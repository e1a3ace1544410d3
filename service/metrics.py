"""Prometheus metrics of the API and the workers (names end in their unit; counters in _total)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter("ipt_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram("ipt_http_request_duration_seconds", "HTTP request latency", ["method", "route"])
PREDICT_BATCH_SIZE = Histogram("ipt_predict_batch_size_inputs", "Inputs per micro-batched forward pass",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
PREDICT_BATCH_TASKS = Histogram("ipt_predict_batch_distinct_tasks", "Distinct tasks per forward pass",
                                buckets=(1, 2, 4, 8, 16, 32, 64))
PREDICT_BATCH_TOKENS = Histogram("ipt_predict_batch_tokens", "Tokens fed per micro-batched forward pass (its rows' "
                                 "inputs and options, and prompts not held by the prefix KV cache)",
                                 buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768))
HEAP_TRIM_SECONDS = Histogram("ipt_heap_trim_seconds", "Seconds the model thread spent handing the C heap's free "
                              "pages back to the OS after a pass (service.heap; at most once a second)",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
PROMPT_CACHE = Counter("ipt_prompt_cache_lookups_total", "Soft-prompt cache lookups", ["result"])
PROMPT_CACHE_EVICTIONS = Counter("ipt_prompt_cache_evictions_total", "Soft prompts evicted from the prompt cache")
PROMPT_CACHE_BYTES = Gauge("ipt_prompt_cache_bytes", "Bytes of soft prompts held by the prompt cache")
PREFIX_CACHE = Counter("ipt_prefix_kv_cache_lookups_total",
                       "Prefix KV cache lookups (a task's prompt keys and values), per task of a batch", ["result"])
PREFIX_CACHE_EVICTIONS = Counter("ipt_prefix_kv_cache_evictions_total", "Tasks evicted from the prefix KV cache")
PREFIX_CACHE_REJECTED = Counter("ipt_prefix_kv_cache_admissions_rejected_total",
                                "Computed prefix KV entries not kept: asked for less often than the entry they would "
                                "have pushed out")
PREFIX_CACHE_BYTES = Gauge("ipt_prefix_kv_cache_bytes", "Bytes of keys and values held by the prefix KV cache")
QUEUE_LENGTH = Gauge("ipt_ist_queue_length_jobs", "IST jobs waiting in the queue")
QUEUE_OLDEST_AGE = Gauge("ipt_ist_queue_oldest_job_age_seconds",
                         "How long the oldest IST job still waiting to start has waited (0: none waits)")
TASKS_BY_STATUS = Gauge("ipt_tasks_by_status_tasks", "Stored tasks by status", ["status"])
MODEL_LOAD = Gauge("ipt_model_load_duration_seconds", "Time to load the backbone and Proj_b")
IST_JOBS = Counter("ipt_ist_jobs_total", "IST jobs finished, by outcome", ["outcome"])
IST_DURATION = Histogram("ipt_ist_job_duration_seconds", "IST job wall time",
                         buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800))
LIVE_WORKERS = Gauge("ipt_live_workers", "Workers of this API's queue whose heartbeat is recent (0: tasks wait)")
