"""Task portability routes: GET /tasks/{id}/export (a zip of a PEFT prompt-tuning adapter or of plain
embeddings) and POST /tasks/import (a PEFT prompt-tuning adapter in as a task, with or without examples).

The routes join service/routes/tasks.py's router (prefix /tasks), which imports this module: an included
router of its own would be served under /tasks too, but its requests would be counted in the metrics under
its own relative paths. The tensor work is in service/portability.py."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from typing import Annotated

from fastapi import HTTPException, Query, Request, Response, status

from ipt_engine.errors import InvalidTaskError
from ipt_engine.ist_optimizers import ISTSettings
from ipt_engine.portability import AdapterMismatchError
from ipt_engine.tasks import TaskKind
from service import ist_jobs, portability
from service.deps import RuntimeDep, SettingsDep, StoreDep, TenantDep, limit_creates
from service.errors import error_responses
from service.routes.tasks import TaskId, _build_task, _check_limits, _owned, _too_large, router, task_out
from service.schemas import DevComparison, ImportReport, TaskCreate, TaskImport, TaskImportOut
from service.task_store import TaskStatus

log = logging.getLogger(__name__)

ZIP_RESPONSE = {200: {"content": {"application/zip": {}}, "description": (
    "a zip of the export directory. peft: adapter_config.json + adapter_model.safetensors (loads with "
    "PeftModel.from_pretrained on the same base model), ipt_format.json (the input format) and README.md (a "
    "recipe); embeddings: soft_prompt.safetensors ([n, d] in `dtype`), ipt_format.json and README.md (recipes "
    "for transformers inputs_embeds and vLLM prompt_embeds)")}}


@router.get("/{task_id}/export", response_class=Response,
            responses={**ZIP_RESPONSE, **error_responses(401, 404, 409, 422, 503)})
def export_task(store: StoreDep, tenant: TenantDep, runtime: RuntimeDep,
                format: Annotated[portability.ExportFormat, Query(description="peft or embeddings")],
                task_id: str = TaskId,
                dtype: Annotated[portability.EmbeddingsDtype, Query(
                    description="embeddings only: the dtype of soft_prompt.safetensors")] = "float32") -> Response:
    """The task's soft prompt Proj_b(z) (fp32) as a zip, to use outside this service. 409 until it is trained."""
    record = _owned(store, tenant, task_id)
    stored = store.vector(task_id)
    if record.status is not TaskStatus.SUCCEEDED or stored is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id!r} is {record.status.value}: it has no "
                                                      "trained vector to export yet")
    if record.artifact_id != runtime.artifact_id:
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id!r} was trained in another subspace "
                            f"({record.artifact_id}); this service cannot decode its vector")
    try:
        archive = portability.export_archive(runtime, task_id, record.name, record.kind, record.labels, stored[0],
                                             format, dtype)
    except portability.ExportRefused as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return Response(archive.content, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{archive.filename}"'})


@router.post("/import", status_code=status.HTTP_201_CREATED, response_model=TaskImportOut,
             responses=error_responses(400, 401, 409, 413, 422, 429, 503))
def import_task(body: TaskImport, request: Request, response: Response, settings: SettingsDep, store: StoreDep,
                tenant: TenantDep, runtime: RuntimeDep) -> TaskImportOut:
    """A task from a PEFT prompt-tuning adapter trained elsewhere: z is the least-squares fit of the adapter's
    prompt in this subspace (only z is stored), and the task is `succeeded` at once. `fit.relative_error` says
    how much of the prompt the subspace does not reconstruct. With examples, `fit.dev` compares the dev scores
    of the imported prompt and of its z (and the bare model's); without, classification needs `labels`.

    An adapter for another backbone, another n or d, or of another type than PROMPT_TUNING is a 422 naming what
    differs."""
    task = None
    labels = body.labels
    if body.train:
        create = TaskCreate(name=body.name, kind=body.kind, train=body.train, dev=body.dev, labels=body.labels)
        _check_limits(create, settings)
        task = _build_task(create)
        kind = task.kind
        labels = list(task.labels) if task.labels else None
    else:
        if body.dev:
            raise HTTPException(422, "'dev' examples need 'train' examples beside them")
        kind = TaskKind(body.kind) if body.kind else (TaskKind.CLASSIFICATION if labels else None)
        if kind is None:
            raise HTTPException(422, "without examples, give 'kind' (and 'labels' for a classification task)")
        if kind is TaskKind.CLASSIFICATION and not labels:
            raise HTTPException(422, "a classification task imported without examples needs 'labels'")
        if labels is not None and kind is not TaskKind.CLASSIFICATION:
            raise HTTPException(422, f"'labels' are for classification tasks; this task is {kind.value}")
        if labels and max(len(label) for label in labels) > settings.max_text_chars:
            raise _too_large(f"a label exceeds the limit of {settings.max_text_chars} characters")
    if labels and len(labels) > settings.max_options:
        raise _too_large(f"{len(labels)} labels exceed the limit of {settings.max_options} options per task")
    if labels and len(set(labels)) != len(labels):
        raise HTTPException(422, "'labels' must be distinct")
    if body.tune and task is None:
        raise HTTPException(422, "'tune' needs 'train' examples to learn from")
    limit = portability.max_weights_bytes(runtime)
    if len(body.adapter.weights) > limit * 4 // 3 + 4:
        raise _too_large(f"adapter weights of {len(body.adapter.weights)} base64 characters exceed the "
                         f"{limit} bytes a prompt of this subspace can take")
    try:
        weights = base64.b64decode(body.adapter.weights, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "adapter.weights must be base64 (of adapter_model.safetensors)") from None
    try:
        imported = portability.fit_adapter(runtime, body.adapter.config, weights)
        dev = portability.dev_scores(runtime, task, imported) if task is not None else None
    except (AdapterMismatchError, InvalidTaskError) as exc:
        raise HTTPException(422, str(exc)[:1000]) from None
    limit_creates(request, tenant, store)  # only an import that will create a task counts
    record, _ = store.create(tenant, body.name, kind.value, labels, runtime.subspace.config.d_intrinsic,
                             runtime.artifact_id)
    if body.tune and task is not None:
        # IST from the imported z, as a job of its own (it does not batch with others)
        job = ist_jobs.ISTJob.create(record.id, task.to_dict(), ISTSettings(), settings)
        ist_jobs.enqueue(store.r, settings, dataclasses.replace(job, start_z=tuple(float(v) for v in imported.z)))
    elif not portability.store_imported(store, record.id, imported.z, dev):
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {record.id!r} was deleted while it was imported")
    done = store.get(record.id)
    assert done is not None
    response.headers["Location"] = f"/tasks/{record.id}"
    note = None
    if imported.relative_error > portability.POOR_FIT:
        note = (f"the subspace reconstructs the prompt poorly (relative error {imported.relative_error:.2f}): "
                "predictions will differ from the adapter's" + (", compare fit.dev" if dev else
                                                                  "; import it with examples to measure how much"))
    return TaskImportOut(task=task_out(done), fit=ImportReport(
        relative_error=imported.relative_error, iterations=imported.iterations, note=note,
        dev=DevComparison(imported_prompt=dev.imported_prompt, vector=dev.vector, bare_model=dev.bare,
                          examples=dev.examples) if dev else None))

