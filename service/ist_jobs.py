"""The IST job contract, the one place the API and the workers agree on: what a job carries (`ISTJob`), how it
is enqueued, how a queued job is deleted, and which queued jobs may train together in one batch.

A job's examples travel in its payload only (never in the task store); RQ deletes the job, and so the examples,
when it ends (result_ttl=0, short failure_ttl). On the queue a job is the RQ function `TRAIN_FUNCTION` called
with three positional arguments, (task id, Task.to_dict(), IST settings as a dict): `ISTJob.args()` writes them
and `ISTJob.from_args()` reads them back, so jobs enqueued by an earlier release still run and batch.

The worker side (workers/jobs.py) names the functions here by string only: this module imports nothing of
`workers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rq import Callback, Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from ipt_engine.ist_optimizers import ISTSettings
from ipt_engine.training import TrainConfig
from service.settings import Settings
from service.task_store import TaskStore

TRAIN_FUNCTION = "workers.jobs.train_task"
"""The RQ function that trains a job's task (and the peers it claims)."""
FAILURE_CALLBACK = "workers.jobs.on_job_failure"
"""Called by RQ when a job fails (also when its worker died): marks the task failed once no retry is left."""
FAILURE_TTL_S = 60
"""How long RQ keeps a failed job (and so its examples)."""
OLDEST_JOBS_LOOKED_AT = 50
"""How many jobs from the head of the queue the backlog age looks at (RQ pops from the head)."""


class InvalidTrainingSettings(ValueError):
    """A job's training settings that the engine does not know or refuses (never retried)."""


def ist_settings(training: dict[str, Any]) -> ISTSettings:
    """The engine's IST settings from a job's `training` dict. Every key must be a field of ISTSettings: a
    setting the API accepts and the engine does not know raises instead of being dropped (a job enqueued
    before a setting existed has no key for it and gets the engine's default)."""
    known = {f.name for f in dataclasses.fields(ISTSettings)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise InvalidTrainingSettings(f"training settings {unknown} are unknown to this worker's engine")
    try:
        return ISTSettings(**training)
    except (TypeError, ValueError) as exc:
        raise InvalidTrainingSettings(f"invalid training settings: {exc}") from None


@dataclass(frozen=True)
class ISTJob:
    """One IST job: the task to learn (Task.to_dict(): its train and dev examples) and how to train it."""

    task_id: str
    task: dict[str, Any]
    training: ISTSettings
    start_z: tuple[float, ...] | None = None  # where IST starts (e.g. an imported prompt's z); such a job
    # trains alone, by Gauss-Newton from exactly this z (the other optimisers start at z = 0)

    @classmethod
    def create(cls, task_id: str, task: dict[str, Any], training: ISTSettings | dict[str, Any],
               settings: Settings) -> ISTJob:
        """A new job, its step budget capped by the service's `max_ist_steps`."""
        config = training if isinstance(training, ISTSettings) else ist_settings(training)
        config = dataclasses.replace(config, max_steps=min(config.max_steps, settings.max_ist_steps))
        return cls(task_id, task, config)

    def args(self) -> tuple[Any, ...]:
        """The job's positional arguments on the queue (see the module docstring); a fourth, the start z as a
        list of floats, only when the job has one."""
        base = (self.task_id, self.task, self.training.to_dict())
        return (*base, list(self.start_z)) if self.start_z is not None else base

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> ISTJob:
        """The job behind a queue entry's positional arguments; InvalidTrainingSettings (a ValueError) when its
        settings are not the engine's, ValueError when the arguments are not an IST job's at all."""
        if len(args) not in (3, 4) or not isinstance(args[0], str) or not isinstance(args[1], dict) \
                or not isinstance(args[2], dict):
            raise ValueError("not an IST job: expected (task id, task dict, training dict[, start z])")
        start = args[3] if len(args) == 4 else None
        if start is not None and not (isinstance(start, list) and all(isinstance(v, int | float) for v in start)):
            raise ValueError("not an IST job: its start z must be a list of numbers")
        return cls(args[0], args[1], ist_settings(args[2]), tuple(float(v) for v in start) if start else None)

    @classmethod
    def of(cls, job: Job | None) -> ISTJob | None:
        """The IST job an RQ job carries; None for another kind of job or one whose payload does not parse."""
        if job is None or job.func_name != TRAIN_FUNCTION:
            return None
        try:
            return cls.from_args(job.args)
        except ValueError:
            return None

    @property
    def name(self) -> str:
        return str(self.task.get("name", ""))

    def to_train_config(self) -> TrainConfig:
        """The engine's training loop settings (the AdamW optimiser's; the full-batch ones use `training`)."""
        return self.training.adamw_config()

    def batches_with(self, other: ISTJob) -> bool:
        """Whether `other` may train in this job's batch: the same training settings (one run trains with one
        set) and another task name (one run needs distinct names; two tenants may use the same one)."""
        return (other.task_id != self.task_id and other.training == self.training and other.name != self.name
                and self.start_z is None and other.start_z is None)  # a job with its own start trains alone


def enqueue(connection: Any, settings: Settings, job: ISTJob) -> Job:
    """Put the job on the IST queue (job id = task id), with the service's timeout and retries."""
    queue = Queue(settings.queue_name, connection=connection)
    return queue.enqueue(TRAIN_FUNCTION, *job.args(), job_id=job.task_id, job_timeout=settings.job_timeout_s,
                         result_ttl=0, failure_ttl=FAILURE_TTL_S,
                         description=f"IST of task {job.task_id}",  # never log the examples
                         on_failure=Callback(FAILURE_CALLBACK),
                         retry=Retry(max=settings.job_retries) if settings.job_retries else None)


def delete_queued_job(connection: Any, job_id: str) -> None:
    """Delete a job that has not started (its payload, the examples, goes with it); nothing when it is gone,
    also when a worker ends and removes it between our fetch and our status read (a cancel raced a 500)."""
    try:
        job = Job.fetch(job_id, connection=connection)
        status = job.get_status()
    except (NoSuchJobError, InvalidJobOperation):
        return
    if status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
        job.delete()


def is_running(connection: Any, job_id: str) -> bool:
    """Whether the job is being worked on now."""
    try:
        return Job.fetch(job_id, connection=connection).get_status() == JobStatus.STARTED
    except (NoSuchJobError, InvalidJobOperation):  # gone, or went between the fetch and the status read
        return False


def fetch(connection: Any, job_id: str) -> ISTJob | None:
    """The IST job with this id, None when it is gone or not an IST job."""
    try:
        return ISTJob.of(Job.fetch(job_id, connection=connection))
    except NoSuchJobError:
        return None


def queued(connection: Any, queue_name: str, limit: int) -> list[ISTJob]:
    """Up to `limit` IST jobs from the head of the queue, in queue order."""
    queue = Queue(queue_name, connection=connection)
    jobs = (ISTJob.of(job) for job in Job.fetch_many(queue.get_job_ids(0, limit), connection=connection))
    return [job for job in jobs if job is not None]


def queue_length(connection: Any, queue_name: str) -> int:
    """Jobs on the IST queue (claimed ones included: they leave it when their batch ends)."""
    return Queue(queue_name, connection=connection).count


def oldest_waiting_age_s(store: TaskStore, queue_name: str) -> float:
    """Seconds since the oldest job still waiting in the queue was enqueued; 0 when none waits. A queued job
    whose task another job already trains in its batch (claimed) is not waiting and is left out. Looks at the
    first OLDEST_JOBS_LOOKED_AT jobs only."""
    queue = Queue(queue_name, connection=store.r)
    jobs = Job.fetch_many(queue.get_job_ids(0, OLDEST_JOBS_LOOKED_AT - 1), connection=store.r)
    enqueued = [job.enqueued_at for job in jobs
                if job is not None and job.enqueued_at is not None and store.claimed_by(job.id) in (None, job.id)]
    if not enqueued:
        return 0.0
    return max(0.0, (datetime.now(UTC) - min(enqueued)).total_seconds())
