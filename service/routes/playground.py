"""The playground page at / (the API's own static files: no CDN, no build step) and the task map it draws."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from service.deps import StoreDep, TenantDep
from service.errors import error_responses
from service.safe_text import clean_text
from service.task_map import pca_2d

router = APIRouter()
STATIC_DIR = files("service") / "static"


@router.get("/", include_in_schema=False)
def playground() -> FileResponse:
    return FileResponse(str(STATIC_DIR / "index.html"), media_type="text/html")


@router.get("/map", tags=["tasks"], responses=error_responses(401, 503))
async def task_map(store: StoreDep, tenant: TenantDep) -> dict[str, object]:
    """The caller's trained tasks on a plane: the first two principal components of their vectors, with each
    task's name and kind, and the share of the vectors' variance each axis explains."""
    vectors = await run_in_threadpool(store.vectors, tenant)
    points, explained = pca_2d(vectors)
    records = await run_in_threadpool(store.get_many, [p.id for p in points], tenant)
    return {"explained_variance": explained,
            "tasks": [{"id": p.id, "x": p.x, "y": p.y, "name": clean_text(r.name), "kind": r.kind}
                      for p in points if (r := records.get(p.id)) is not None]}
