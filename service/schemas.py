"""Request and response bodies (pydantic v2). Unknown fields are rejected with a 422 naming them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["classification", "multiple_choice", "generation"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExampleIn(Strict):
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    options: list[str] | None = None


class TrainingSettings(Strict):
    """IST settings a caller may tune, within safe bounds."""

    learning_rate: float = Field(1.0, gt=0, le=10)
    max_steps: int = Field(200, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=64)
    eval_every: int = Field(10, ge=1, le=1000)
    patience: int = Field(5, ge=1, le=100)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class TaskCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: Kind | None = None
    train: list[ExampleIn] = Field(min_length=1)
    dev: list[ExampleIn] | None = None
    labels: list[str] | None = None
    training: TrainingSettings = Field(default_factory=TrainingSettings)


class Progress(BaseModel):
    step: int
    total: int
    dev_score: float | None


class ErrorInfo(BaseModel):
    code: str
    message: str


class TaskOut(BaseModel):
    id: str
    name: str
    kind: str
    status: str
    labels: list[str] | None
    d_intrinsic: int
    progress: Progress
    dev_score: float | None
    steps: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: ErrorInfo | None


class TaskList(BaseModel):
    tasks: list[TaskOut]
    total: int
    offset: int
    limit: int


class PredictRequest(Strict):
    inputs: list[str] = Field(min_length=1)
    options: list[list[str]] | None = Field(None, description="per-input options (multiple choice tasks)")


class PredictionOut(BaseModel):
    output: str
    probabilities: dict[str, float] | None = None


class PredictResponse(BaseModel):
    task_id: str
    predictions: list[PredictionOut]


class SimilarTask(BaseModel):
    id: str
    name: str
    cosine: float


class SimilarResponse(BaseModel):
    task_id: str
    similar: list[SimilarTask]
