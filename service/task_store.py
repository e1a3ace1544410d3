"""Task records and task vectors in Redis: the one store module the API and the workers share.

Per task only small metadata and the d_I float32 vector (raw bytes) are stored; never the examples,
never a soft prompt. Keys:
    ipt:task:{id}            hash: owner, name, kind, status, labels, timings, scores, progress, version
    ipt:task:{id}:z          raw little-endian float32 bytes of z
    ipt:tenant:{owner}:tasks sorted set of the owner's task ids by creation time
    ipt:tenant:{owner}:active set of the owner's task ids that may still be queued or running (pruned
                             when counted, so a final or deleted task leaves it at the next count)
    ipt:idem:{sha256(owner, key)} task id created under an Idempotency-Key (24 h)
`version` grows each time a vector is written, so caches keyed by (id, version) never serve a stale
prompt, on any replica.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import redis

IDEMPOTENCY_TTL_S = 24 * 3600


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


@dataclass
class TaskRecord:
    id: str
    owner: str
    name: str
    kind: str
    status: TaskStatus
    labels: list[str] | None
    d_intrinsic: int
    artifact_id: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    dev_score: float | None = None
    steps: int | None = None
    progress_step: int = 0
    progress_total: int = 0
    progress_dev: float | None = None
    error: dict[str, str] | None = None
    version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, task_id: str, h: dict[bytes, bytes]) -> TaskRecord:
        d = {k.decode(): v.decode() for k, v in h.items()}

        def opt_float(key: str) -> float | None:
            return float(d[key]) if d.get(key) not in (None, "") else None

        return cls(
            id=task_id, owner=d["owner"], name=d["name"], kind=d["kind"], status=TaskStatus(d["status"]),
            labels=json.loads(d["labels"]) if d.get("labels") else None, d_intrinsic=int(d["d_intrinsic"]),
            artifact_id=d.get("artifact_id", ""), created_at=float(d["created_at"]),
            started_at=opt_float("started_at"), finished_at=opt_float("finished_at"),
            dev_score=opt_float("dev_score"), steps=int(d["steps"]) if d.get("steps") else None,
            progress_step=int(d.get("progress_step", 0)), progress_total=int(d.get("progress_total", 0)),
            progress_dev=opt_float("progress_dev"),
            error=json.loads(d["error"]) if d.get("error") else None, version=int(d.get("version", 0)),
        )


class TaskStore:
    """Task metadata and vectors over one Redis connection (decode_responses must be off)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @staticmethod
    def _key(task_id: str) -> str:
        return f"ipt:task:{task_id}"

    # ------------------------------------------------------------------------------------- create, read
    def create(self, owner: str, name: str, kind: str, labels: list[str] | None, d_intrinsic: int,
               artifact_id: str, idempotency_key: str | None = None) -> tuple[TaskRecord, bool]:
        """Create a queued task; returns (record, created). With an Idempotency-Key already used by this
        owner, returns the task created then and created=False."""
        task_id = uuid.uuid4().hex
        now = time.time()
        mapping = {"owner": owner, "name": name, "kind": kind, "status": TaskStatus.QUEUED.value,
                   "labels": json.dumps(labels) if labels else "", "d_intrinsic": d_intrinsic,
                   "artifact_id": artifact_id, "created_at": now, "version": 0}
        pipe = self.r.pipeline()
        pipe.hset(self._key(task_id), mapping=mapping)
        pipe.zadd(f"ipt:tenant:{owner}:tasks", {task_id: now})
        pipe.sadd(self._active_key(owner), task_id)
        pipe.execute()
        if idempotency_key:
            # the task exists before the key points at it, so a concurrent request never sees a dangling key
            idem = self._idempotency_key(owner, idempotency_key)
            if not self.r.set(idem, task_id, nx=True, ex=IDEMPOTENCY_TTL_S):
                existing = self.r.get(idem)
                earlier = self.get(existing.decode(), owner) if existing else None
                if earlier is not None:
                    self.delete(task_id, owner)
                    return earlier, False
                self.r.set(idem, task_id, ex=IDEMPOTENCY_TTL_S)  # the earlier task was deleted
        record = self.get(task_id)
        assert record is not None
        return record, True

    @staticmethod
    def _idempotency_key(owner: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(f"{owner}\x00{idempotency_key}".encode()).hexdigest()
        return f"ipt:idem:{digest}"

    @staticmethod
    def _active_key(owner: str) -> str:
        return f"ipt:tenant:{owner}:active"

    def idempotent_task(self, owner: str, idempotency_key: str) -> TaskRecord | None:
        """The owner's task created earlier under this Idempotency-Key, if it still exists."""
        existing = self.r.get(self._idempotency_key(owner, idempotency_key))
        return self.get(existing.decode(), owner) if existing else None

    def active_count(self, owner: str) -> int:
        """How many of the owner's tasks are queued or running; tasks that ended or were deleted leave the
        active set here (cost: one pipeline over at most the active tasks)."""
        key = self._active_key(owner)
        ids = list(self.r.smembers(key))
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hget(self._key(i.decode()), "status")
        done = [i for i, s in zip(ids, pipe.execute(), strict=True)
                if s is None or TaskStatus(s.decode()).is_final]
        if done:
            self.r.srem(key, *done)
        return len(ids) - len(done)

    def get(self, task_id: str, owner: str | None = None) -> TaskRecord | None:
        """The task, or None when it does not exist or (with `owner`) belongs to someone else."""
        h = self.r.hgetall(self._key(task_id))
        if not h:
            return None
        record = TaskRecord.from_hash(task_id, h)
        if owner is not None and record.owner != owner:
            return None
        return record

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[TaskRecord], int]:
        key = f"ipt:tenant:{owner}:tasks"
        ids = [i.decode() for i in self.r.zrevrange(key, offset, offset + limit - 1)]
        records = [r for r in (self.get(i, owner) for i in ids) if r is not None]
        return records, int(self.r.zcard(key))

    def vector(self, task_id: str) -> tuple[np.ndarray, int] | None:
        """(z as float32 [d_I], version) of a trained task."""
        pipe = self.r.pipeline()
        pipe.get(f"{self._key(task_id)}:z")
        pipe.hget(self._key(task_id), "version")
        raw, version = pipe.execute()
        if raw is None or version is None:
            return None
        return np.frombuffer(raw, dtype="<f4").copy(), int(version)

    def vectors(self, owner: str) -> dict[str, np.ndarray]:
        """Every trained vector of an owner (for similarity search)."""
        ids = [i.decode() for i in self.r.zrange(f"ipt:tenant:{owner}:tasks", 0, -1)]
        pipe = self.r.pipeline()
        for i in ids:
            pipe.get(f"{self._key(i)}:z")
        return {i: np.frombuffer(raw, dtype="<f4").copy() for i, raw in zip(ids, pipe.execute(), strict=True) if raw}

    # ---------------------------------------------------------------------------------- state changes
    def _update_if(self, task_id: str, allowed: set[TaskStatus], mapping: dict[str, Any]) -> bool:
        """Apply `mapping` only when the task exists and is in one of `allowed` states (atomically)."""
        final = "status" in mapping and TaskStatus(mapping["status"]).is_final
        return self._transition(task_id, allowed, lambda pipe, key: pipe.hset(
            key, mapping={k: ("" if v is None else v) for k, v in mapping.items()}), final=final)

    def _transition(self, task_id: str, allowed: set[TaskStatus], write: Callable[[Any, str], Any],
                    final: bool = False) -> bool:
        """Run `write(pipeline, key)` in a transaction, only while the task is in an `allowed` state
        (optimistic locking with WATCH: a concurrent change retries the check). A `final` transition also
        takes the task out of its owner's active set."""
        key = self._key(task_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    status, owner = pipe.hmget(key, "status", "owner")
                    if status is None or TaskStatus(status.decode()) not in allowed:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    write(pipe, key)
                    if final and owner is not None:
                        pipe.srem(self._active_key(owner.decode()), task_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def mark_running(self, task_id: str, total_steps: int, batch_tasks: int = 1) -> bool:
        """Queued (or running, on a retry) -> running; `batch_tasks` records how many tasks train together."""
        return self._update_if(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING},
                               {"status": TaskStatus.RUNNING.value, "started_at": time.time(),
                                "progress_total": total_steps, "progress_step": 0, "batch_tasks": batch_tasks})

    def claim(self, task_id: str, job_id: str) -> bool:
        """Queued -> running, only if still queued: job `job_id` takes the task into its batch (and
        remembers it, so that a retry of that job takes it again)."""
        if not self._update_if(task_id, {TaskStatus.QUEUED}, {"status": TaskStatus.RUNNING.value,
                                                              "started_at": time.time(), "claimed_by": job_id}):
            return False
        self.r.sadd(f"ipt:claims:{job_id}", task_id)
        self.r.expire(f"ipt:claims:{job_id}", IDEMPOTENCY_TTL_S)
        return True

    def claims(self, job_id: str) -> list[str]:
        """Tasks job `job_id` claimed into its batch that are still running."""
        ids = sorted(i.decode() for i in self.r.smembers(f"ipt:claims:{job_id}"))
        return [i for i in ids if (r := self.get(i)) is not None and r.status is TaskStatus.RUNNING]

    def claimed_by(self, task_id: str) -> str | None:
        value = self.r.hget(self._key(task_id), "claimed_by")
        return value.decode() if value else None

    def set_progress(self, task_id: str, step: int, dev: float | None) -> None:
        self._update_if(task_id, {TaskStatus.RUNNING}, {"progress_step": step, "progress_dev": dev})

    def mark_succeeded(self, task_id: str, z: np.ndarray, dev_score: float, steps: int) -> bool:
        """Store z and finish the task, unless it was cancelled or deleted meanwhile."""
        def write(pipe: Any, key: str) -> None:
            pipe.set(f"{key}:z", np.asarray(z, dtype="<f4").tobytes())
            pipe.hset(key, mapping={"status": TaskStatus.SUCCEEDED.value, "finished_at": time.time(),
                                    "dev_score": dev_score, "steps": steps, "error": ""})
            pipe.hincrby(key, "version", 1)

        return self._transition(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING}, write, final=True)

    def mark_failed(self, task_id: str, code: str, message: str) -> bool:
        return self._update_if(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING},
                               {"status": TaskStatus.FAILED.value, "finished_at": time.time(),
                                "error": json.dumps({"code": code, "message": message[:2000]})})

    def cancel(self, task_id: str) -> bool:
        """Queued or running -> cancelled (a running job notices and stops). False when already final."""
        return self._update_if(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING},
                               {"status": TaskStatus.CANCELLED.value, "finished_at": time.time()})

    def delete(self, task_id: str, owner: str) -> bool:
        record = self.get(task_id, owner)
        if record is None:
            return False
        pipe = self.r.pipeline()
        pipe.delete(self._key(task_id), f"{self._key(task_id)}:z")
        pipe.zrem(f"ipt:tenant:{owner}:tasks", task_id)
        pipe.srem(self._active_key(owner), task_id)
        pipe.execute()
        return True

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in TaskStatus), 0)
        for key in self.r.scan_iter(match="ipt:task:*", count=1000):
            if key.endswith(b":z"):
                continue
            status = self.r.hget(key, "status")
            if status:
                counts[status.decode()] = counts.get(status.decode(), 0) + 1
        return counts
