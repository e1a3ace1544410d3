"""The IST job contract (service/ist_jobs.py) without Redis: what a job carries from the API to the worker."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ipt_engine.ist_optimizers import ISTOptimizer, ISTSettings
from service.ist_jobs import TRAIN_FUNCTION, InvalidTrainingSettings, ISTJob, ist_settings
from service.routes.tasks import training_settings
from service.schemas import TaskCreate, TrainingSettings
from service.settings import Settings

TASK = {"name": "sentiment", "kind": "classification", "train": [], "dev": [], "test": [], "labels": ["a", "b"]}


def _non_default(name: str, value: Any) -> Any:
    """A valid value of a training field that differs from its default."""
    if name == "optimizer":
        return next(o.value for o in ISTOptimizer if o.value != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    raise AssertionError(f"add a non-default value for the new training field {name!r} ({type(value).__name__})")


def test_every_api_training_field_reaches_the_workers_settings() -> None:
    """Each field of the API's training object, set to a value other than its default, arrives in the IST
    settings the worker trains with (through the queue's positional arguments): a field added to the API and
    not carried into the worker's settings fails here."""
    defaults = TrainingSettings().model_dump()
    for name, value in defaults.items():
        body = TaskCreate(name="t", train=[{"input": "x", "output": "y"}],
                          training={name: _non_default(name, value)})
        job = ISTJob.create("a" * 32, TASK, training_settings(body), Settings(max_ist_steps=10**6))
        received = ISTJob.from_args(job.args())  # what workers.jobs.train_task gets
        carried = getattr(received.training, name)
        expected = body.training.model_dump()[name]
        assert (carried.value if isinstance(carried, ISTOptimizer) else carried) == expected, name
        assert carried != getattr(ISTSettings(), name), f"{name} kept the engine's default"


def test_the_api_defaults_are_the_engines() -> None:
    assert ISTSettings(**TrainingSettings().model_dump()) == ISTSettings()


def test_a_training_setting_unknown_to_the_engine_is_refused_not_dropped() -> None:
    with pytest.raises(InvalidTrainingSettings, match="new_knob"):
        ist_settings({"optimizer": "adamw", "new_knob": 3})
    with pytest.raises(InvalidTrainingSettings):
        ist_settings({"optimizer": "sgd"})
    with pytest.raises(InvalidTrainingSettings):
        ISTJob.from_args(("a" * 32, TASK, {"max_steps": 0}))


def test_a_job_enqueued_by_an_earlier_release_still_parses() -> None:
    """Earlier releases put the API's training dump on the queue (no max_new_tokens) or, before optimisers
    could be chosen, nothing: both read back as the engine's settings."""
    assert ISTJob.from_args(("a" * 32, TASK, TrainingSettings().model_dump())).training == ISTSettings()
    assert ISTJob.from_args(("a" * 32, TASK, {})).training == ISTSettings()
    with pytest.raises(ValueError, match="not an IST job"):
        ISTJob.from_args(("a" * 32, TASK))


def test_max_steps_is_capped_by_the_service() -> None:
    job = ISTJob.create("a" * 32, TASK, ISTSettings(max_steps=500), Settings(max_ist_steps=50))
    assert job.training.max_steps == 50 and job.args()[2]["max_steps"] == 50
    assert job.to_train_config().max_steps == 50


def test_batching_peers_share_settings_and_differ_in_name() -> None:
    own = ISTJob("a" * 32, TASK, ISTSettings())
    other = ISTJob("b" * 32, {**TASK, "name": "other"}, ISTSettings())
    assert own.batches_with(other) and other.batches_with(own)
    assert not own.batches_with(own)
    assert not own.batches_with(dataclasses.replace(other, task={**TASK}))  # same name
    assert not own.batches_with(dataclasses.replace(other, training=ISTSettings(max_iterations=3)))


class _FakeJob:
    def __init__(self, func_name: str, args: tuple[Any, ...]) -> None:
        self.func_name, self.args = func_name, args


def test_only_ist_jobs_are_read_from_the_queue() -> None:
    args = ("a" * 32, TASK, ISTSettings().to_dict())
    assert ISTJob.of(_FakeJob(TRAIN_FUNCTION, args)) == ISTJob("a" * 32, TASK, ISTSettings())  # type: ignore[arg-type]
    assert ISTJob.of(_FakeJob("other.function", args)) is None  # type: ignore[arg-type]
    assert ISTJob.of(_FakeJob(TRAIN_FUNCTION, args[:2])) is None  # type: ignore[arg-type]
    assert ISTJob.of(None) is None


def test_a_job_with_its_own_start_travels_and_trains_alone() -> None:
    """The start z (an imported prompt's) is a fourth positional argument on the queue; such a job reads back
    with it and never batches, and a malformed start is not an IST job."""
    plain = ISTJob("a" * 32, {"name": "a"}, ISTSettings())
    started = ISTJob("b" * 32, {"name": "b"}, ISTSettings(), start_z=(0.5, -1.0))
    assert len(plain.args()) == 3 and started.args()[3] == [0.5, -1.0]
    assert ISTJob.from_args(started.args()) == started and ISTJob.from_args(plain.args()) == plain
    assert plain.batches_with(ISTJob("c" * 32, {"name": "c"}, ISTSettings()))
    assert not plain.batches_with(started) and not started.batches_with(plain)
    with pytest.raises(ValueError, match="start z"):
        ISTJob.from_args(("d" * 32, {}, {}, ["x"]))
