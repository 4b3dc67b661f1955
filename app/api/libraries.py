"""Photo libraries indexed in place: ``GET/POST /libraries``, ``GET/DELETE /libraries/{name}``,
``POST /libraries/{name}/scan``, ``POST /libraries/{name}/purge``.

Thin routes over :class:`app.library.libraries.Libraries` (``service.libraries``). Creating, scanning, purging and
deleting change data, so they sit on a router with the write routes' key check
(:func:`app.api.security.require_write`); the two reads do not.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.routes import Service
from app.api.schemas import ErrorResponse
from app.api.security import require_write
from app.library.libraries import LibraryStatus

__all__ = ["router"]


def _time(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).replace(microsecond=0)


class LibraryCounts(BaseModel):
    """What a library holds, in files (one image may have several files) and distinct images."""

    files: int = Field(description="Files known (online, offline and failed).")
    online: int = Field(description="Files found by the last scan and searchable.")
    offline: int = Field(
        description="Files missing since a scan: hidden from results, vectors kept; back with no model call if they "
        "return; forgotten after LIBRARY_OFFLINE_GRACE or POST /libraries/{name}/purge."
    )
    failed: int = Field(description="Files that cannot be indexed (not an image, corrupt, over the limits).")
    images: int = Field(description="Distinct images (content hashes) among the files.")


class LibraryResponse(BaseModel):
    """A library, its counts and its scan (``GET /libraries/{name}``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "photos",
                    "roots": ["/photos"],
                    "exclude": ["**/@eaDir/**"],
                    "source": "api",
                    "state": "scanning",
                    "phase": "index",
                    "done": 1200,
                    "total": 5000,
                    "progress": 0.24,
                    "counts": {"files": 18000, "online": 18000, "offline": 0, "failed": 2, "images": 17950},
                    "scan_started_at": "2026-12-07T09:00:00Z",
                    "scan_finished_at": "2026-12-06T09:00:41Z",
                    "last_scan": {"files": 18000, "unchanged": 17990, "new": 10, "indexed": 10},
                    "error": None,
                    "warning": None,
                    "watching": True,
                }
            ]
        }
    )
    name: str
    roots: list[str] = Field(description="Folders indexed in place, as the service sees them.")
    exclude: list[str] = Field(description="The library's own exclusion globs (LIBRARY_EXCLUDE applies as well).")
    source: Literal["api", "env"] = Field(description="Created through the API (or CLI), or from LIBRARY_ROOTS.")
    state: Literal["idle", "scanning", "waiting", "interrupted", "failed"] = Field(
        description="waiting: the database is down and the scan retries; interrupted: the process scanning it died "
        "(the next start or POST .../scan resumes it); failed: see error."
    )
    phase: str = Field(description="The running scan's phase: walk, hash, index, offline, purge (empty when idle).")
    done: int
    total: int
    progress: float = Field(description="done / total of the phase, 0..1.")
    counts: LibraryCounts
    scan_started_at: datetime | None
    scan_finished_at: datetime | None = Field(description="When the last scan completed, UTC.")
    last_scan: dict | None = Field(
        description="What the last completed scan found and did: files, unchanged, new, changed, indexed (model "
        "calls), linked (known bytes at a new path: no model call), back_online, offline, moved_away, purged, "
        "failed, deferred, skipped, images_restored/hidden/removed/renamed, warning, unreadable_dirs, errors, seconds."
    )
    error: str | None = Field(description="Why the last scan failed.")
    warning: str | None = Field(
        description="Why the last scan marked nothing offline (a root missing or mostly empty)."
    )
    watching: bool = Field(description="LIBRARY_WATCH follows this library's folders here.")

    @classmethod
    def of(cls, s: LibraryStatus) -> LibraryResponse:
        """The response for a library's status."""
        return cls(
            name=s.library.name,
            roots=list(s.library.roots),
            exclude=list(s.library.excludes),
            source=s.library.source,
            state=s.state,
            phase=s.phase,
            done=s.done,
            total=s.total,
            progress=round(min(1.0, s.done / s.total), 4) if s.total else 0.0,
            counts=LibraryCounts(**s.counts),
            scan_started_at=_time(s.scan_started_at),
            scan_finished_at=_time(s.scan_finished_at),
            last_scan=s.last_scan,
            error=s.error,
            warning=s.warning,
            watching=s.watching,
        )


class LibraryCreate(BaseModel):
    """A new library (``POST /libraries``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "photos", "roots": ["/photos"], "exclude": ["**/@eaDir/**"]}]},
    )
    name: str = Field(
        min_length=1,
        max_length=48,
        description="1-48 lower-case letters, digits, '_' or '-'; the first folder of "
        "every file's stored filename (filter with path_prefix=<name>/).",
    )
    roots: list[Annotated[str, Field(max_length=4096)]] = Field(
        min_length=1, max_length=16, description="Absolute folders as the service sees them (in Docker: mounted)."
    )
    exclude: list[Annotated[str, Field(max_length=500)]] = Field(
        default_factory=list, max_length=64, description="Globs of files or folders to leave out (** spans folders)."
    )


class PurgeResponse(BaseModel):
    """What ``POST /libraries/{name}/purge`` forgot."""

    files: int = Field(description="Offline files forgotten.")
    images: int = Field(description="Images removed with them (no other file or upload held their bytes).")


class DeleteResponse(BaseModel):
    """What ``DELETE /libraries/{name}`` removed; the library's files are never touched."""

    deleted: str
    images_removed: int = Field(description="Images no other library or upload held.")


_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No library with this name."}}
_BUSY = {409: {"model": ErrorResponse, "description": "A scan of this library is running."}}
router = APIRouter(tags=["libraries"])
write_router = APIRouter(
    tags=["libraries"],
    dependencies=[Depends(require_write)],
    responses={
        401: {"model": ErrorResponse, "description": "API_KEY is set and the request has no valid key."},
        403: {"model": ErrorResponse, "description": "No API_KEY on a non-loopback HOST: writes are disabled."},
        503: {"model": ErrorResponse, "description": "The database does not answer."},
    },
)


@router.get("/libraries", response_model=list[LibraryResponse], summary="Photo libraries")
def list_libraries(service: Service) -> list[LibraryResponse]:
    """Every library indexed in place, with its counts and the state of its scan."""
    return [LibraryResponse.of(s) for s in service.libraries.list()]


@router.get("/libraries/{name}", response_model=LibraryResponse, responses=_NOT_FOUND, summary="One library")
def get_library(service: Service, name: str) -> LibraryResponse:
    """A library's counts and the progress of its scan (from any replica)."""
    return LibraryResponse.of(service.libraries.status(name))


@write_router.post(
    "/libraries",
    response_model=LibraryResponse,
    status_code=201,
    responses={
        409: {"model": ErrorResponse, "description": "A library of this name exists."},
        422: {"model": ErrorResponse, "description": "A bad name, root or pattern, or a root that is not a folder."},
    },
    summary="Create a library",
)
def create_library(service: Service, body: LibraryCreate) -> LibraryResponse:
    """Index the folders ``roots`` in place, under ``name``: nothing is copied; the first scan starts at once
    (follow it with ``GET /libraries/{name}``). Files are found by extension and read once to hash them; the
    images among them are embedded, other files are counted as failed."""
    return LibraryResponse.of(service.libraries.create(body.name, body.roots, body.exclude))


@write_router.post(
    "/libraries/{name}/scan",
    response_model=LibraryResponse,
    status_code=202,
    responses={
        200: {"model": LibraryResponse, "description": "A scan was already running: its progress."},
        **_NOT_FOUND,
    },
    summary="Scan a library",
)
def scan_library(
    service: Service,
    name: str,
    response: Response,
    force: Annotated[
        bool,
        Query(
            description="Mark missing files offline even when more than LIBRARY_MAX_OFFLINE_FRACTION are missing "
            "(they really were deleted)."
        ),
    ] = False,
) -> LibraryResponse:
    """Start a scan: new files are indexed, changed ones read again, moved ones followed with no model call,
    missing ones marked offline. One scan per library at a time, across replicas: while one runs this answers
    ``200`` with its progress."""
    status, started = service.libraries.scan(name, force=force)
    if not started:
        response.status_code = 200
    return LibraryResponse.of(status)


@write_router.post(
    "/libraries/{name}/purge",
    response_model=PurgeResponse,
    responses={**_NOT_FOUND, **_BUSY},
    summary="Forget offline files",
)
def purge_library(service: Service, name: str) -> PurgeResponse:
    """Forget the library's offline files now, instead of after LIBRARY_OFFLINE_GRACE, with their images unless
    another file or an upload holds the same bytes."""
    return PurgeResponse(**service.libraries.purge(name))


@write_router.delete(
    "/libraries/{name}", response_model=DeleteResponse, responses={**_NOT_FOUND, **_BUSY}, summary="Delete a library"
)
def delete_library(service: Service, name: str) -> DeleteResponse:
    """Forget the library: its images leave the collection unless another library or an upload holds the same bytes.
    Its files are never touched."""
    return DeleteResponse(deleted=name, images_removed=service.libraries.delete(name))


router.include_router(write_router)
