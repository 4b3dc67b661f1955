"""Background jobs and near-duplicates: ``POST /jobs/neighbours``, ``GET /jobs/{id}``, ``GET /duplicates``.

A module of its own beside :mod:`app.api.routes` (included by :func:`app.main.create_app`). Starting a job changes
data, so it sits on a router with the same key check as every write route (:func:`app.api.security.require_write`);
the two reads do not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.routes import Service
from app.api.schemas import ErrorResponse
from app.api.security import require_write
from app.neighbours.jobs import MAX_DUPLICATES_LIMIT
from app.neighbours.store import JobRecord

_EXAMPLE_ID = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class JobResponse(BaseModel):
    """A background job and its progress (``GET /jobs/{id}``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 3,
                    "kind": "neighbours",
                    "state": "running",
                    "phase": "graph",
                    "done": 41200,
                    "total": 100000,
                    "progress": 0.412,
                    "k": 15,
                    "dba": False,
                    "created_at": "2026-11-28T12:00:00Z",
                    "started_at": "2026-11-28T12:00:00Z",
                    "finished_at": None,
                    "error": None,
                }
            ]
        }
    )
    id: int = Field(description="Job id, for GET /jobs/{id}.")
    kind: Literal["neighbours"] = Field(description="What the job builds: the k-nearest-neighbour graph.")
    state: Literal["queued", "running", "interrupted", "failed", "completed"] = Field(
        description="interrupted: the service stopped during it; it resumes when the service starts again. failed: "
        "see error; POST /jobs/neighbours resumes it. completed: its graph is served."
    )
    phase: Literal["graph", "dba", "done"] = Field(
        description="graph: searching each image's neighbours; dba: computing DBA vectors (DBA=true); done."
    )
    done: int = Field(description="Images finished in this phase.")
    total: int = Field(description="Images to do in this phase (the collection's size when it started).")
    progress: float = Field(description="done / total, 0..1 (1 when completed).")
    k: int = Field(description="Neighbours per image (NEIGHBOURS_K when the job was created).")
    dba: bool = Field(description="Whether the job computes DBA vectors (DBA was true when it was created).")
    created_at: datetime
    started_at: datetime | None = Field(description="Latest (re)start, UTC.")
    finished_at: datetime | None
    error: str | None = Field(description="Why a failed job stopped.")

    @classmethod
    def of(cls, job: JobRecord) -> JobResponse:
        """The response for a stored job."""
        progress = 1.0 if job.state == "completed" else (min(1.0, job.done / job.total) if job.total else 0.0)
        return cls(
            id=job.id,
            kind=job.kind,
            state=job.state,
            phase=job.phase,
            done=job.done,
            total=job.total,
            progress=round(progress, 4),
            k=job.k,
            dba=job.dba_n is not None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            error=job.error,
        )


class DuplicateGroupItem(BaseModel):
    """One group of near-duplicates, connected by graph edges at or above the threshold."""

    ids: list[str] = Field(description="Image ids (SHA-256), at least two, sorted.")
    filenames: list[str] = Field(description="Stored filename of each id, in the same order.")
    min_score: float = Field(description="Lowest cosine similarity among the edges that joined the group.")
    max_score: float = Field(description="Highest cosine similarity among them.")


class DuplicatesResponse(BaseModel):
    """``GET /duplicates``: one page of near-duplicate groups, largest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "groups": [
                        {
                            "ids": [_EXAMPLE_ID, "0" * 64],
                            "filenames": ["trips/IMG_0042.jpg", "export/IMG_0042.webp"],
                            "min_score": 0.9861,
                            "max_score": 0.9861,
                        }
                    ],
                    "threshold": 0.92,
                    "total": 1,
                    "graph_built_at": "2026-11-28T12:04:10Z",
                }
            ]
        }
    )
    groups: list[DuplicateGroupItem]
    threshold: float = Field(description="The cosine threshold used (DUPLICATE_THRESHOLD unless given).")
    total: int = Field(description="Groups at this threshold in all (page with offset and limit).")
    graph_built_at: datetime = Field(description="When the neighbour graph was completed; newer images are not in it.")


router = APIRouter(tags=["jobs"])
write_router = APIRouter(
    tags=["jobs"],
    dependencies=[Depends(require_write)],
    responses={
        401: {"model": ErrorResponse, "description": "API_KEY is set and the request has no valid key."},
        403: {"model": ErrorResponse, "description": "No API_KEY on a non-loopback HOST: writes are disabled."},
    },
)


@write_router.post(
    "/jobs/neighbours",
    response_model=JobResponse,
    status_code=202,
    responses={200: {"model": JobResponse, "description": "A graph job was already running: that job."}},
    summary="Build the neighbour graph",
)
def start_neighbours_job(service: Service, response: Response) -> JobResponse:
    """Start the background job that finds every image's NEIGHBOURS_K nearest neighbours (and, with DBA=true, its
    DBA vector). One job at a time: while one runs, this answers ``200`` with it. An interrupted or failed job is
    resumed where it stopped. Follow it with ``GET /jobs/{id}``; the previous graph is served until it completes."""
    job, started = service.neighbours.start()
    if not started:
        response.status_code = 200
    return JobResponse.of(job)


@router.get(
    "/jobs/{job_id}",
    response_model=JobResponse,
    responses={404: {"model": ErrorResponse, "description": "No job with this id."}},
    summary="Job progress",
)
def get_job(service: Service, job_id: int) -> JobResponse:
    """State and progress of a background job."""
    return JobResponse.of(service.neighbours.job(job_id))


@router.get(
    "/duplicates",
    response_model=DuplicatesResponse,
    responses={
        409: {"model": ErrorResponse, "description": "No neighbour graph yet: POST /jobs/neighbours first."},
        422: {"model": ErrorResponse, "description": "Invalid parameters."},
        503: {"model": ErrorResponse, "description": "Vector database unavailable."},
    },
    summary="Near-duplicate groups",
)
def duplicates(
    service: Service,
    threshold: Annotated[
        float | None, Query(ge=-1, le=1, description="Cosine similarity; default DUPLICATE_THRESHOLD.")
    ] = None,
    offset: Annotated[int, Query(ge=0, description="Groups skipped before the page.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_DUPLICATES_LIMIT, description="Groups in the page.")] = 100,
) -> DuplicatesResponse:
    """Groups of near-duplicate images from the last completed neighbour graph: connected components of the image
    pairs whose cosine similarity is at least ``threshold``, largest groups first. Images deleted since the graph
    was built are left out; images indexed since are not in it (run the job again)."""
    page = service.neighbours.duplicates(threshold, offset, limit)
    return DuplicatesResponse(
        groups=[
            DuplicateGroupItem(ids=list(g.ids), filenames=names, min_score=g.min_score, max_score=g.max_score)
            for g, names in page.groups
        ],
        threshold=page.threshold,
        total=page.total,
        graph_built_at=page.graph_built_at,
    )


router.include_router(write_router)
