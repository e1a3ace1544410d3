"""Task records and task vectors in Redis: the one store module the API and the workers share.

Per task only small metadata and the d_I vector z (raw bytes) are stored; never the examples, never a
soft prompt. Keys:
    ipt:task:{id}            hash: owner, name, kind, status, labels, timings, scores, progress, version;
                             a succeeded task keeps only what its API view needs (memory per task is a
                             target: see benchmarks/store_bench.py)
    ipt:task:{id}:z          raw little-endian z: float16 (2 * d_I bytes, the default) or float32
                             (4 * d_I bytes); the length tells which
    ipt:events:{id}          stream of the task's events (service/task_events.py; expires a week after the end)
    ipt:tenant:{owner}:tasks sorted set of the owner's task ids by creation time
    ipt:tenant:{owner}:active set of the owner's task ids that may still be queued or running (pruned
                             when counted, so a final or deleted task leaves it at the next count)
    ipt:idem:{sha256(owner, key)} "{task id}:{sha256 of the request}" created under an Idempotency-Key (24 h;
                             a value written before requests were fingerprinted is the task id alone)
    ipt:stats:tasks_by_status hash status -> number of tasks, kept in step with every transition (so /metrics
                             never scans the keyspace); rebuilt atomically when it lacks its `_counted` mark
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

from service import task_events

IDEMPOTENCY_TTL_S = 24 * 3600

STATUS_COUNTS_KEY = "ipt:stats:tasks_by_status"
"""Hash: status -> number of stored tasks in it (plus `_counted`, set by the rebuild)."""

DROPPED_ON_SUCCESS = ("progress_step", "progress_dev", "progress_history", "error", "claimed_by")
"""Hash fields only a queued or running task needs; a succeeded task drops them (~60 bytes per task)."""

MAX_HISTORY = 100
"""Dev evaluations a running task's progress keeps (the newest)."""

VECTOR_DTYPES = {"float16": "<f2", "float32": "<f4"}
"""How z may be stored: float16 halves the largest part of a task's memory (see `encode_vector`)."""

FLOAT16_MAX = 65504.0

_RECOUNT_SCRIPT = """
local counts = {}
local cursor = "0"
repeat
  local reply = redis.call("SCAN", cursor, "MATCH", "ipt:task:*", "COUNT", 1000)
  cursor = reply[1]
  for _, key in ipairs(reply[2]) do
    if string.sub(key, -2) ~= ":z" then
      local status = redis.call("HGET", key, "status")
      if status then counts[status] = (counts[status] or 0) + 1 end
    end
  end
until cursor == "0"
redis.call("DEL", KEYS[1])
for status, n in pairs(counts) do redis.call("HSET", KEYS[1], status, n) end
redis.call("HSET", KEYS[1], "_counted", 1)
return 1
"""


def now_s() -> float:
    """Wall-clock time rounded to the millisecond, as stored (shorter hash values than full precision)."""
    return round(time.time(), 3)


def encode_vector(z: np.ndarray, dtype: str = "float16") -> bytes:
    """z [d_I] as stored: little-endian `dtype`. float16 keeps 11 significant bits (relative error <= 2^-11,
    far below what changes a prediction: see tests/engine/test_real_model.py); a z that float16 cannot hold
    (beyond +-65504) is stored as float32."""
    z = np.asarray(z, dtype=np.float32).reshape(-1)
    if dtype == "float16" and np.all(np.abs(z) <= FLOAT16_MAX):
        return z.astype("<f2").tobytes()
    if dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector dtype must be one of {sorted(VECTOR_DTYPES)}, got {dtype!r}")
    return z.astype("<f4").tobytes()


def decode_vector(raw: bytes, d_intrinsic: int) -> np.ndarray:
    """Stored bytes -> z as float32 [d_I]; float16 or float32, told apart by the length."""
    if len(raw) == 2 * d_intrinsic:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if len(raw) == 4 * d_intrinsic:
        return np.frombuffer(raw, dtype="<f4").copy()
    raise ValueError(f"a stored vector of {len(raw)} bytes fits neither float16 nor float32 at d_I = {d_intrinsic}")


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
    progress_history: list[dict[str, float | None]] = field(default_factory=list)
    bare_dev_score: float | None = None  # the bare model's dev score, measured when training starts
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
            # a succeeded task dropped its progress fields: it ended at its last step with its best dev score
            progress_step=int(d.get("progress_step") or d.get("steps") or 0),
            progress_total=int(d.get("progress_total", 0)),
            progress_dev=opt_float("progress_dev") if "progress_dev" in d else opt_float("dev_score"),
            progress_history=json.loads(d["progress_history"]) if d.get("progress_history") else [],
            bare_dev_score=opt_float("bare_dev_score"),
            error=json.loads(d["error"]) if d.get("error") else None, version=int(d.get("version", 0)),
        )


@dataclass(frozen=True)
class Neighbour:
    """A task near another one in the intrinsic subspace (TaskStore.nearest)."""

    id: str
    name: str
    cosine: float


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key already used by this owner for a request with another body."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


def _idem_value(raw: bytes) -> tuple[str, str | None]:
    """(task id, request fingerprint or None) of a stored Idempotency-Key value."""
    task_id, _, fingerprint = raw.decode().partition(":")
    return task_id, fingerprint or None


class TaskStore:
    """Task metadata and vectors over one Redis connection (decode_responses must be off).

    `vector_dtype` is how vectors this store writes are kept ("float16" or "float32"); it reads either."""

    def __init__(self, client: redis.Redis, vector_dtype: str = "float16") -> None:
        if vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector dtype must be one of {sorted(VECTOR_DTYPES)}, got {vector_dtype!r}")
        self.r = client
        self.vector_dtype = vector_dtype

    @staticmethod
    def _key(task_id: str) -> str:
        return f"ipt:task:{task_id}"

    # ------------------------------------------------------------------------------------- create, read
    def create(self, owner: str, name: str, kind: str, labels: list[str] | None, d_intrinsic: int,
               artifact_id: str, idempotency_key: str | None = None,
               fingerprint: str = "") -> tuple[TaskRecord, bool]:
        """Create a queued task; returns (record, created). With an Idempotency-Key already used by this
        owner, returns the task created then and created=False, or raises IdempotencyKeyReused when that
        request's `fingerprint` (a digest of its body) differs from this one's."""
        task_id = uuid.uuid4().hex
        now = now_s()
        mapping = {"owner": owner, "name": name, "kind": kind, "status": TaskStatus.QUEUED.value,
                   "labels": json.dumps(labels) if labels else "", "d_intrinsic": d_intrinsic,
                   "artifact_id": artifact_id, "created_at": now, "version": 0}
        pipe = self.r.pipeline()
        pipe.hset(self._key(task_id), mapping=mapping)
        pipe.zadd(f"ipt:tenant:{owner}:tasks", {task_id: now})
        pipe.sadd(self._active_key(owner), task_id)
        pipe.hincrby(STATUS_COUNTS_KEY, TaskStatus.QUEUED.value, 1)
        task_events.record(pipe, task_id, "created", name=name, kind=kind, labels=labels, d_intrinsic=d_intrinsic)
        task_events.record(pipe, task_id, "queued")
        pipe.execute()
        if idempotency_key:
            # the task exists before the key points at it, so a concurrent request never sees a dangling key
            idem = self._idempotency_key(owner, idempotency_key)
            value = f"{task_id}:{fingerprint}"
            if not self.r.set(idem, value, nx=True, ex=IDEMPOTENCY_TTL_S):
                existing = self.r.get(idem)
                earlier_id, earlier_fingerprint = _idem_value(existing) if existing else ("", None)
                earlier = self.get(earlier_id, owner) if earlier_id else None
                if earlier is not None:
                    self.delete(task_id, owner)
                    if earlier_fingerprint is not None and earlier_fingerprint != fingerprint:
                        raise IdempotencyKeyReused(earlier.id)
                    return earlier, False
                self.r.set(idem, value, ex=IDEMPOTENCY_TTL_S)  # the earlier task was deleted
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

    def idempotent_task(self, owner: str, idempotency_key: str,
                        fingerprint: str = "") -> TaskRecord | None:
        """The owner's task created earlier under this Idempotency-Key, if it still exists; raises
        IdempotencyKeyReused when that request's fingerprint differs from `fingerprint`."""
        existing = self.r.get(self._idempotency_key(owner, idempotency_key))
        if not existing:
            return None
        task_id, earlier_fingerprint = _idem_value(existing)
        record = self.get(task_id, owner)
        if record is not None and earlier_fingerprint is not None and earlier_fingerprint != fingerprint:
            raise IdempotencyKeyReused(record.id)
        return record

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

    def get_many(self, task_ids: list[str], owner: str) -> dict[str, TaskRecord]:
        """The owner's tasks among `task_ids`, read in one round trip (missing and other owners' left out)."""
        pipe = self.r.pipeline()
        for task_id in task_ids:
            pipe.hgetall(self._key(task_id))
        records = (TaskRecord.from_hash(i, h) for i, h in zip(task_ids, pipe.execute(), strict=True) if h)
        return {r.id: r for r in records if r.owner == owner}

    def list(self, owner: str, offset: int, limit: int) -> tuple[list[TaskRecord], int]:
        key = f"ipt:tenant:{owner}:tasks"
        ids = [i.decode() for i in self.r.zrevrange(key, offset, offset + limit - 1)]
        found = self.get_many(ids, owner)
        return [found[i] for i in ids if i in found], int(self.r.zcard(key))

    def vector(self, task_id: str) -> tuple[np.ndarray, int] | None:
        """(z as float32 [d_I], version) of a trained task."""
        pipe = self.r.pipeline()
        pipe.get(f"{self._key(task_id)}:z")
        pipe.hmget(self._key(task_id), "version", "d_intrinsic")
        raw, (version, d_intrinsic) = pipe.execute()
        if raw is None or version is None or d_intrinsic is None:
            return None
        return decode_vector(raw, int(d_intrinsic)), int(version)

    def vectors(self, owner: str) -> dict[str, np.ndarray]:
        """Every trained vector of an owner (for similarity search), as float32 [d_I]."""
        ids = [i.decode() for i in self.r.zrange(f"ipt:tenant:{owner}:tasks", 0, -1)]
        pipe = self.r.pipeline()
        for i in ids:
            pipe.get(f"{self._key(i)}:z")
            pipe.hget(self._key(i), "d_intrinsic")
        out = pipe.execute()
        return {i: decode_vector(raw, int(d)) for i, raw, d in zip(ids, out[0::2], out[1::2], strict=True)
                if raw and d}

    def nearest(self, owner: str, task_id: str, k: int) -> list[Neighbour] | None:
        """The owner's k trained tasks nearest to `task_id` by cosine similarity of their vectors, most similar
        first (ties: the larger id first), read from the store in one round trip; None when `task_id` has no
        vector. Vectors of another shape (another subspace) are left out."""
        ids = [i.decode() for i in self.r.zrange(f"ipt:tenant:{owner}:tasks", 0, -1)]
        pipe = self.r.pipeline()
        for i in ids:
            pipe.get(f"{self._key(i)}:z")
            pipe.hmget(self._key(i), "d_intrinsic", "name", "owner")
        out = pipe.execute()
        vectors: dict[str, np.ndarray] = {}
        heads: dict[str, tuple[bytes | None, bytes | None]] = {}
        for i, raw, (d, name, task_owner) in zip(ids, out[0::2], out[1::2], strict=True):
            heads[i] = (name, task_owner)
            if raw and d:
                vectors[i] = decode_vector(raw, int(d))
        query = vectors.pop(task_id, None)
        if query is None:
            return None
        scored = []
        for other, v in vectors.items():
            if v.shape != query.shape:
                continue
            denom = float(np.linalg.norm(query) * np.linalg.norm(v)) or 1.0
            scored.append((float(query @ v) / denom, other))
        scored.sort(reverse=True)
        found = []
        for cosine, other in scored[:k]:
            name, task_owner = heads[other]
            if name is not None and task_owner is not None and task_owner.decode() == owner:
                found.append(Neighbour(other, name.decode(), cosine))
        return found

    # ---------------------------------------------------------------------------------- state changes
    def _update_if(self, task_id: str, allowed: set[TaskStatus], mapping: dict[str, Any],
                   event: tuple[str, dict[str, Any]] | None = None) -> bool:
        """Apply `mapping` only when the task exists and is in one of `allowed` states (atomically)."""
        to = TaskStatus(mapping["status"]) if "status" in mapping else None
        return self._transition(task_id, allowed, lambda pipe, key: pipe.hset(
            key, mapping={k: ("" if v is None else v) for k, v in mapping.items()}), to=to, event=event)

    def _transition(self, task_id: str, allowed: set[TaskStatus], write: Callable[[Any, str], Any],
                    to: TaskStatus | None = None, event: tuple[str, dict[str, Any]] | None = None) -> bool:
        """Run `write(pipeline, key)` in a transaction, only while the task is in an `allowed` state
        (optimistic locking with WATCH: a concurrent change retries the check). A change of status to `to`
        moves the task between the status counters; a final `to` also takes it out of its owner's active set.
        `event` (type, data) is appended to the task's events in the same transaction."""
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
                    if event is not None:
                        task_events.record(pipe, task_id, event[0], **event[1])
                    if to is not None and to.value != status.decode():
                        pipe.hincrby(STATUS_COUNTS_KEY, status.decode(), -1)
                        pipe.hincrby(STATUS_COUNTS_KEY, to.value, 1)
                    if to is not None and to.is_final and owner is not None:
                        pipe.srem(self._active_key(owner.decode()), task_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def mark_running(self, task_id: str, total_steps: int) -> bool:
        """Queued (or running, on a retry) -> running."""
        return self._update_if(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING},
                               {"status": TaskStatus.RUNNING.value, "started_at": now_s(),
                                "progress_total": total_steps, "progress_step": 0},
                               event=("started", {"total_steps": total_steps}))

    def claim(self, task_id: str, job_id: str) -> bool:
        """Queued -> running, only if still queued: job `job_id` takes the task into its batch (and
        remembers it, so that a retry of that job takes it again)."""
        if not self._update_if(task_id, {TaskStatus.QUEUED}, {"status": TaskStatus.RUNNING.value,
                                                              "started_at": now_s(), "claimed_by": job_id},
                               event=("started", {})):
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

    def set_progress(self, task_id: str, step: int, dev: float | None,
                     entry: dict[str, float | None] | None = None) -> None:
        """A running task's latest step and dev score; `entry` (one dev evaluation: step, train_loss, dev_loss,
        dev, norm, seconds) is appended to its history (the last MAX_HISTORY kept). The task's one worker is
        its only writer, so reading and rewriting the history cannot lose another writer's entry."""
        fields: dict[str, Any] = {"progress_step": step, "progress_dev": dev}
        event: tuple[str, dict[str, Any]] | None = None
        if entry is not None:
            old = self.r.hget(self._key(task_id), "progress_history")
            history = json.loads(old) if old else []
            point = {k: (round(float(v), 6) if v is not None else None) for k, v in entry.items()}
            history.append(point)
            fields["progress_history"] = json.dumps(history[-MAX_HISTORY:])
            event = ("evaluation", point)
        self._update_if(task_id, {TaskStatus.RUNNING}, fields, event=event)

    def set_bare_dev_score(self, task_id: str, score: float) -> None:
        """The bare model's dev score of a running task (kept after it succeeds: one float)."""
        self._update_if(task_id, {TaskStatus.RUNNING}, {"bare_dev_score": round(float(score), 6)})

    def mark_succeeded(self, task_id: str, z: np.ndarray, dev_score: float, steps: int) -> bool:
        """Store z [d_I] (as `vector_dtype`) and finish the task, unless it was cancelled or deleted meanwhile.
        The fields only a running task needs go (see DROPPED_ON_SUCCESS)."""
        encoded = encode_vector(z, self.vector_dtype)

        def write(pipe: Any, key: str) -> None:
            pipe.set(f"{key}:z", encoded)
            pipe.hset(key, mapping={"status": TaskStatus.SUCCEEDED.value, "finished_at": now_s(),
                                    "dev_score": round(float(dev_score), 6), "steps": steps})
            pipe.hdel(key, *DROPPED_ON_SUCCESS)
            pipe.hincrby(key, "version", 1)

        return self._transition(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING}, write, to=TaskStatus.SUCCEEDED,
                                event=("succeeded", {"dev_score": round(float(dev_score), 6), "steps": steps}))

    def mark_imported(self, task_id: str, z: np.ndarray, dev_score: float | None = None,
                      bare_dev_score: float | None = None) -> bool:
        """A queued task whose z came from an imported prompt (no IST ran) becomes `succeeded` at once; its dev
        scores are set when examples gave a dev split. False if the task was cancelled or deleted meanwhile."""
        encoded = encode_vector(z, self.vector_dtype)
        fields: dict[str, Any] = {"status": TaskStatus.SUCCEEDED.value, "finished_at": now_s(), "steps": 0}
        if dev_score is not None:
            fields["dev_score"] = round(float(dev_score), 6)
        if bare_dev_score is not None:
            fields["bare_dev_score"] = round(float(bare_dev_score), 6)

        def write(pipe: Any, key: str) -> None:
            pipe.set(f"{key}:z", encoded)
            pipe.hset(key, mapping=fields)
            pipe.hdel(key, *DROPPED_ON_SUCCESS)
            pipe.hincrby(key, "version", 1)

        return self._transition(task_id, {TaskStatus.QUEUED}, write, to=TaskStatus.SUCCEEDED,
                                event=("succeeded", {"imported": True, "dev_score": fields.get("dev_score"),
                                                     "steps": 0}))

    def mark_failed(self, task_id: str, code: str, message: str) -> bool:
        return self._update_if(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING},
                               {"status": TaskStatus.FAILED.value, "finished_at": now_s(),
                                "error": json.dumps({"code": code, "message": message[:2000]})},
                               event=("failed", {"code": code, "message": message[:2000]}))

    def cancel(self, task_id: str) -> bool:
        """Queued or running -> cancelled (a running job notices and stops). False when already final."""
        return self._update_if(task_id, {TaskStatus.QUEUED, TaskStatus.RUNNING},
                               {"status": TaskStatus.CANCELLED.value, "finished_at": now_s()},
                               event=("cancelled", {}))

    def delete(self, task_id: str, owner: str) -> bool:
        """Delete the owner's task (record, vector, index entries); False when it is not theirs or gone."""
        key = self._key(task_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # the status counters must lose the status the task has when it goes
                    status, stored_owner = pipe.hmget(key, "status", "owner")
                    if status is None or stored_owner is None or stored_owner.decode() != owner:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.delete(key, f"{key}:z", task_events.events_key(task_id))
                    pipe.zrem(f"ipt:tenant:{owner}:tasks", task_id)
                    pipe.srem(self._active_key(owner), task_id)
                    pipe.hincrby(STATUS_COUNTS_KEY, status.decode(), -1)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def count_by_status(self) -> dict[str, int]:
        """Stored tasks by status, from the counters (one HGETALL). Counters written before they were kept
        (an older store) or lost are rebuilt first, atomically, by one scan of the tasks."""
        raw = self.r.hgetall(STATUS_COUNTS_KEY)
        if b"_counted" not in raw:
            self.recount_by_status()
            raw = self.r.hgetall(STATUS_COUNTS_KEY)
        counts = dict.fromkeys((s.value for s in TaskStatus), 0)
        counts.update({k.decode(): int(v) for k, v in raw.items() if k != b"_counted"})
        return counts

    def recount_by_status(self) -> None:
        """Rebuild the status counters from the tasks themselves, in one Lua script (so no transition lands
        half-counted); it blocks Redis for one scan of the keyspace (~0.1 s per 100k tasks)."""
        self.r.eval(_RECOUNT_SCRIPT, 1, STATUS_COUNTS_KEY)
