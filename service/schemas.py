"""Request and response bodies (pydantic v2). Unknown fields are rejected with a 422 naming them; so are
text that UTF-8 cannot encode (a lone surrogate) and NaN or infinite numbers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ipt_engine.ist_optimizers import ISTSettings
from service.safe_text import Text

Kind = Literal["classification", "multiple_choice", "generation"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ExampleIn(Strict):
    input: Text = Field(min_length=1)
    output: Text = Field(min_length=1)
    options: list[Text] | None = Field(None, description="multiple-choice tasks only: this example's options")


Optimizer = Literal["gauss_newton", "lbfgs", "adamw"]
_IST = ISTSettings()  # the engine's defaults are the API's


class TrainingSettings(Strict):
    """IST settings a caller may tune, within safe bounds (see ipt_engine.ist_optimizers)."""

    optimizer: Optimizer = Field(_IST.optimizer.value, description=(
        "gauss_newton (default): damped Gauss-Newton steps on all train examples, dev after each iteration; "
        "lbfgs: full-batch L-BFGS; adamw: the paper's mini-batch AdamW (slower, kept for comparison)"))
    max_iterations: int = Field(_IST.max_iterations, ge=1, le=100,
                                description="gauss_newton / lbfgs: passes over the train set")
    patience: int = Field(_IST.patience, ge=1, le=100, description=(
        "iterations (gauss_newton, lbfgs) or dev evaluations (adamw) without a dev improvement before stopping"))
    learning_rate: float = Field(_IST.learning_rate, gt=0, le=10, description="adamw only")
    max_steps: int = Field(_IST.max_steps, ge=1, le=1000, description="adamw only")
    batch_size: int = Field(_IST.batch_size, ge=1, le=64, description="adamw only: examples per step")
    eval_every: int = Field(_IST.eval_every, ge=1, le=1000, description="adamw only: steps between dev evaluations")
    seed: int = Field(_IST.seed, ge=0, le=2**31 - 1, description="adamw only: example sampling")


class TaskCreate(Strict):
    name: Text = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    kind: Kind | None = None
    train: list[ExampleIn] = Field(min_length=1)
    dev: list[ExampleIn] | None = None
    labels: list[Text] | None = Field(None, description="classification tasks only: the label set (default: the "
                                                        "outputs seen)")
    training: TrainingSettings = Field(default_factory=TrainingSettings)


class ProgressPoint(BaseModel):
    """One dev evaluation while the task trains."""

    step: int
    train_loss: float | None
    dev_loss: float | None
    dev_score: float | None
    z_norm: float | None
    seconds: float | None = Field(None, description="since training of this task began")


class Progress(BaseModel):
    step: int
    total: int
    dev_score: float | None
    history: list[ProgressPoint] = Field(default_factory=list,
                                         description="every dev evaluation so far (while queued or running)")


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
    bare_dev_score: float | None = Field(None, description="the dev score of the bare model (no prompt)")
    note: str | None = Field(None, description="set when the learned vector scores no better than the bare model")
    steps: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: ErrorInfo | None
    warning: str | None = Field(None, description="set on creation when no worker is live: the task stays queued "
                                                  "until one starts")


class TaskList(BaseModel):
    tasks: list[TaskOut]
    total: int
    offset: int
    limit: int


class PredictRequest(Strict):
    inputs: list[Text] = Field(min_length=1)
    options: list[list[Text]] | None = Field(None, description="per-input options (multiple choice tasks)")


class PredictionOut(BaseModel):
    output: str = Field(description="the answer: for option tasks the option with the highest `scores` value; for "
                                    "generation tasks the greedy continuation")
    probabilities: dict[str, float] | None = Field(
        None, description="option tasks: the model's belief over the options, the probability of each option's "
                          "whole token sequence (EOS included) renormalised over the options, i.e. the softmax of "
                          "each option's total log-likelihood; sums to 1")
    scores: dict[str, float] | None = Field(
        None, description="option tasks: the ranking score of each option, its mean log-likelihood per token "
                          "(length-normalised, so a long option is not penalised for its length); `output` is "
                          "the best of these, which can differ from the most probable option when lengths differ")


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


class AdapterIn(Strict):
    """A PEFT prompt-tuning adapter directory's two files."""

    config: dict[str, Any] = Field(description="the object of adapter_config.json (peft_type PROMPT_TUNING, "
                                               "task_type CAUSAL_LM, base_model_name_or_path, num_virtual_tokens, "
                                               "token_dim, ...)")
    weights: str = Field(min_length=1, description="adapter_model.safetensors, base64-encoded (tensor "
                                                   "`prompt_embeddings` [num_virtual_tokens, token_dim]); "
                                                   "PEFT's pickled adapter_model.bin is not accepted")


class TaskImport(Strict):
    """A task from a PEFT prompt-tuning adapter, with or without examples."""

    name: Text = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$", description=(
        "the task name: it is part of every input's format ('{name}: {input}'), so give the one the prompt was "
        "trained with (an export's ipt_format.json has it as task_name)"))
    kind: Kind | None = Field(None, description="default: inferred from the examples, else classification when "
                                                "labels are given")
    labels: list[Text] | None = Field(None, description="classification tasks: the label set (required without "
                                                        "examples)")
    train: list[ExampleIn] | None = Field(None, description="optional examples: with them the import reports "
                                                            "dev scores of the imported prompt vs its z")
    dev: list[ExampleIn] | None = Field(None, description="dev examples (default: a quarter of train)")
    adapter: AdapterIn
    tune: bool = Field(False, description=(
        "with train examples: go on with IST (the service's default, Gauss-Newton) from the imported prompt's z; "
        "the task is then queued and trains like a new one, and keeps the z with the lowest dev loss"))


class DevComparison(BaseModel):
    """Dev scores of the imported prompt against the z that now stands for it (with examples only)."""

    imported_prompt: float = Field(description="the adapter's own prompt")
    vector: float = Field(description="Proj_b(z), the prompt the task now predicts with (its dev_score)")
    bare_model: float = Field(description="the model without a prompt")
    examples: int = Field(description="dev examples scored")


class ImportReport(BaseModel):
    relative_error: float = Field(description="|Proj_b(z) - P| / |P| (Frobenius) for the imported prompt P: how "
                                              "much of the prompt the subspace does not reconstruct (0 = all)")
    iterations: int = Field(description="Levenberg-Marquardt iterations of the least-squares fit of z")
    dev: DevComparison | None = Field(None, description="with examples: dev scores of the prompt vs its z")
    note: str | None = Field(None, description="set when the subspace reconstructs the prompt poorly")


class TaskImportOut(BaseModel):
    task: TaskOut = Field(description="the new task, `succeeded` at once (only z is stored), or `queued` for IST "
                                      "from that z with `tune`")
    fit: ImportReport
