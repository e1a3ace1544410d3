"""The IPT web service: task API over Redis, batched predictions, auth and metrics (FastAPI)."""
