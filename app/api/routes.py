"""The REST endpoints. Sync handlers on purpose: FastAPI runs them in its thread pool, where the model and the
database driver may block without stalling the event loop."""

from __future__ import annotations

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.errors import status_for
from app.api.originals import original_response
from app.api.params import TopKQuery, one_value, top_k_from_form
from app.api.schemas import (
    BatchIndexItem,
    BatchIndexResponse,
    CombinedSearchRequest,
    DeleteResponse,
    ErrorResponse,
    ExistsRequest,
    ExistsResponse,
    IndexResponse,
    QueryItem,
    SearchResponse,
    SearchResult,
    StatsResponse,
    TextSearchRequest,
    VectorSearchRequest,
)
from app.api.search_params import SearchParamsForm, SearchParamsQuery
from app.api.security import cache_headers, image_url, require_write
from app.api.uploads import UploadRoute
from app.health import HealthReport
from app.imaging.prepare import check_upload_size
from app.search.query import QueryTerm
from app.service import SearchService
from app.vectordb.base import SearchHit

router = APIRouter(route_class=UploadRoute)
#: Every route that changes the collection. Its dependency checks the API key (app/api/security.py), so a write
#: route added here cannot forget it; it is included into ``router`` at the end of this module.
write_router = APIRouter(
    route_class=UploadRoute,
    dependencies=[Depends(require_write)],
    responses={
        401: {"model": ErrorResponse, "description": "API_KEY is set and the request has no valid key."},
        403: {"model": ErrorResponse, "description": "No API_KEY on a non-loopback HOST: writes are disabled."},
    },
)

# Types the stdlib's table may lack on slim images.
for _ext, _type in {
    ".heic": "image/heic",
    ".heif": "image/heif",
    ".avif": "image/avif",
    ".webp": "image/webp",
    ".jxl": "image/jxl",
    ".qoi": "image/qoi",
}.items():
    mimetypes.add_type(_type, _ext)

_ERRORS = {
    400: {"model": ErrorResponse, "description": "Bad request (e.g. text search without a text model)."},
    404: {"model": ErrorResponse, "description": "Unknown image id."},
    413: {"model": ErrorResponse, "description": "Upload or image dimensions over the limit."},
    415: {"model": ErrorResponse, "description": "Not an image format the service decodes."},
    422: {"model": ErrorResponse, "description": "Corrupt or truncated image, or invalid parameters."},
    503: {
        "model": ErrorResponse,
        "description": "Vector database or object store unavailable, or busy decoding (Retry-After).",
    },
    507: {"model": ErrorResponse, "description": "The image store is full (nothing was stored)."},
}


def get_service(request: Request) -> SearchService:
    """The service the lifespan created (FastAPI dependency)."""
    return request.app.state.service


Service = Annotated[SearchService, Depends(get_service)]


def _read_upload(file: UploadFile, service: SearchService) -> bytes:
    # One byte over the limit is enough to refuse; the rest of a huge upload is never held in memory.
    limit = service.settings.max_upload_bytes
    data = file.file.read(limit + 1)
    check_upload_size(len(data), limit)
    return data


def _top_k(top_k: int | None, service: SearchService) -> int:
    return service.resolve_top_k(top_k)


def _results(request: Request, hits: list[SearchHit], offset: int = 0) -> SearchResponse:
    return SearchResponse(
        results=[
            SearchResult(
                rank=offset + rank,
                id=h.id,
                score=round(h.score, 6),
                filename=h.metadata.filename,
                format=h.metadata.format,
                width=h.metadata.width,
                height=h.metadata.height,
                bytes=h.metadata.bytes,
                indexed_at=h.metadata.indexed_at,
                taken_at=h.metadata.taken_at,
                image_url=image_url(request, h.id),
            )
            for rank, h in enumerate(hits, start=1)
        ]
    )


@write_router.post(
    "/index_image",
    response_model=IndexResponse,
    status_code=201,
    responses={200: {"model": IndexResponse, "description": "The same bytes were already indexed."}, **_ERRORS},
    summary="Index one image",
)
def index_image(
    service: Service,
    response: Response,
    file: Annotated[UploadFile, File(description="The image file (JPEG, PNG, HEIC, AVIF, WebP, GIF, TIFF...).")],
    filename: Annotated[str | None, Form(description="Name to store instead of the upload's file name.")] = None,
) -> IndexResponse:
    """Decode, embed and store an image. Idempotent: re-uploading the same bytes answers ``status: exists``."""
    result = service.index_image(_read_upload(file, service), filename or file.filename)
    if result.status == "exists":
        response.status_code = 200
    return IndexResponse(id=result.id, status=result.status)


@write_router.post(
    "/index_images",
    response_model=BatchIndexResponse,
    responses={
        413: {"model": ErrorResponse, "description": "More than MAX_BATCH_FILES files, or over MAX_BATCH_MB."},
        422: _ERRORS[422],
        503: _ERRORS[503],
    },
    summary="Index several images in one request",
)
def index_images(
    service: Service,
    files: Annotated[list[UploadFile], File(description="The image files, at most MAX_BATCH_FILES.")],
    filenames: Annotated[
        list[str] | None,
        Form(description="Names to store instead of the parts' file names: none, or one per file, in order."),
    ] = None,
) -> BatchIndexResponse:
    """Decode, embed (one model call) and store several images (one database write); per-file results.

    A file that cannot be indexed gets ``status: error`` with its reason, without failing the others. A database
    failure fails the whole request (``503``) and stores none of its files.
    """
    settings = service.settings
    if len(files) > settings.max_batch_files:
        raise HTTPException(
            413, f"{len(files)} files in one request; the limit is {settings.max_batch_files} (MAX_BATCH_FILES)."
        )
    if filenames and len(filenames) != len(files):
        raise HTTPException(422, f"{len(filenames)} filenames for {len(files)} files: give one per file, or none.")
    names = filenames or [f.filename for f in files]
    # Each file is bounded by the request's limit (checked by the middleware); one over MAX_UPLOAD_MB is refused
    # on its own by the service, with its real SHA-256.
    uploads = [(f.file.read(settings.max_batch_bytes + 1), name) for f, name in zip(files, names, strict=True)]
    return BatchIndexResponse(
        results=[
            BatchIndexItem(
                filename=r.filename,
                id=r.id,
                status=r.status,
                detail=None if r.error is None else str(r.error),
                code=None if r.error is None else status_for(r.error),
            )
            for r in service.index_images(uploads)
        ]
    )


@router.post("/images/exists", response_model=ExistsResponse, responses=_ERRORS, summary="Which ids are indexed")
def images_exist(service: Service, body: ExistsRequest) -> ExistsResponse:
    """Look up a batch of image ids (SHA-256 of the file bytes); used by ``bulk_index.py`` to resume."""
    return ExistsResponse(existing=sorted(service.existing_ids(body.ids)))


@router.post("/search_image", response_model=SearchResponse, responses=_ERRORS, summary="Search by example image")
def search_image(
    request: Request,
    service: Service,
    file: Annotated[UploadFile, File(description="The query image.")],
    params: SearchParamsForm,
    top_k: Annotated[int | None, Depends(top_k_from_form)] = None,
) -> SearchResponse:
    """The indexed images most similar to the uploaded one, best first, scored by cosine similarity. An upload
    whose bytes are indexed is left out of its own results unless ``exclude_self=false``."""
    k, options = _top_k(top_k, service), params.options()
    return _results(request, service.search_image(_read_upload(file, service), k, options), options.offset)


@router.post("/search_text", response_model=SearchResponse, responses=_ERRORS, summary="Search by description")
def search_text(
    request: Request, service: Service, body: TextSearchRequest, params: SearchParamsQuery, top_k: TopKQuery = None
) -> SearchResponse:
    """The indexed images that best match a text description. Needs a CLIP model (400 otherwise)."""
    k, options = _top_k(one_value("top_k", top_k, body.top_k), service), params.options(body)
    return _results(request, service.search_text(body.query, k, options), options.offset)


@router.post("/search_vector", response_model=SearchResponse, responses=_ERRORS, summary="Search by embedding")
def search_vector(
    request: Request, service: Service, body: VectorSearchRequest, params: SearchParamsQuery, top_k: TopKQuery = None
) -> SearchResponse:
    """The indexed images nearest to an embedding you computed yourself with the collection's model (same model
    id and dimension as ``GET /stats``). 422 for a wrong length, NaN/infinite values or an all-zero vector."""
    k, options = _top_k(one_value("top_k", top_k, body.top_k), service), params.options(body)
    return _results(request, service.search_vector(body.vector, k, options), options.offset)


def _term(item: QueryItem) -> QueryTerm:
    return QueryTerm(image_id=item.image_id, text=item.text, vector=item.vector, weight=item.weight)


@router.post("/search", response_model=SearchResponse, responses=_ERRORS, summary="Combined and negative search")
def search_combined(
    request: Request, service: Service, body: CombinedSearchRequest, params: SearchParamsQuery, top_k: TopKQuery = None
) -> SearchResponse:
    """Search by several stored images, texts and vectors at once, each with a weight, minus negative terms: the
    weighted sum of the L2-normalised positive embeddings minus the weighted negative ones, renormalised. 400 for a
    text term without a text model, 404 for an unknown image id, 422 when the terms cancel out."""
    k, options = _top_k(one_value("top_k", top_k, body.top_k), service), params.options(body)
    positive, negative = [_term(i) for i in body.positive], [_term(i) for i in body.negative]
    hits = service.search_combined(positive, negative, k, options)
    return _results(request, hits, options.offset)


@router.get("/image/{image_id}/similar", response_model=SearchResponse, responses=_ERRORS, summary="More like this")
def similar_images(
    request: Request,
    service: Service,
    image_id: str,
    params: SearchParamsQuery,
    top_k: TopKQuery = None,
) -> SearchResponse:
    """The indexed images most similar to a stored one, by its stored vector; the image itself is left out."""
    options = params.options()
    return _results(request, service.similar(image_id, _top_k(top_k, service), options), options.offset)


@router.get(
    "/image/{image_id}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"image/*": {}}, "description": "The original file."},
        206: {"content": {"image/*": {}}, "description": "The byte range asked for (Range: bytes=a-b)."},
        304: {"description": "If-None-Match named this image's ETag: unchanged (originals never change)."},
        404: _ERRORS[404],
        416: {"description": "The range lies past the end of the file."},
        503: {"model": ErrorResponse, "description": "The object store holding the originals does not answer."},
    },
    summary="Download an original",
)
def get_image(request: Request, service: Service, image_id: str) -> Response:
    """The original file as uploaded, with its content type, streamed from the image store (file or object
    storage). ``ETag`` is the image id; ``Range`` (one range) answers 206; ``If-None-Match`` 304; cached for a
    year (content-addressed), privately when reads need a key."""
    return original_response(request, service, image_id)


# HEAD answers the same headers without the body; a route of its own, since one route with both methods would give
# the OpenAPI spec two operations with one id.
router.add_api_route("/image/{image_id}", get_image, methods=["HEAD"], include_in_schema=False, name="head_image")


@router.get(
    "/image/{image_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."}, 404: _ERRORS[404]},
    summary="JPEG thumbnail of an image",
)
def get_thumbnail(
    request: Request, service: Service, image_id: str, size: Annotated[int, Query(ge=16, le=1024)] = 256
) -> Response:
    """A JPEG at most ``size`` pixels on its longer side: any stored format, viewable in every browser."""
    return Response(service.thumbnail(image_id, size), media_type="image/jpeg", headers=cache_headers(request, 86_400))


@router.post(
    "/preview",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG preview."}, **_ERRORS},
    summary="JPEG preview of an uploaded image",
)
def preview_upload(
    service: Service,
    file: Annotated[UploadFile, File(description="Any image the service decodes (HEIC, TIFF, JPEG XL...).")],
    size: Annotated[int, Query(ge=16, le=1024, description="Longest side of the JPEG, pixels.")] = 512,
) -> Response:
    """A JPEG of the uploaded image, at most ``size`` pixels on its longer side, EXIF orientation applied; nothing is
    stored. The web UI shows query images with it, since browsers cannot show HEIC, TIFF or JPEG XL."""
    jpeg = service.preview(_read_upload(file, service), size)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@write_router.delete("/image/{image_id}", response_model=DeleteResponse, responses=_ERRORS, summary="Delete an image")
def delete_image(service: Service, image_id: str) -> DeleteResponse:
    """Remove the image's vector and its stored original."""
    service.delete_image(image_id)
    return DeleteResponse(id=image_id, status="deleted")


@router.get(
    "/health",
    response_model=HealthReport,
    responses={503: {"model": HealthReport, "description": "The database is unavailable."}},
    summary="Liveness and dependencies",
)
def health(service: Service) -> JSONResponse:
    """``200`` when the database answers (also with ``storage: low``), ``503`` otherwise; names what is down."""
    report = service.health()
    return JSONResponse(status_code=503 if report.status == "unavailable" else 200, content=report.model_dump())


@router.get("/stats", response_model=StatsResponse, responses={503: _ERRORS[503]}, summary="Collection statistics")
def stats(request: Request, service: Service) -> StatsResponse:
    """Number of indexed images, the model and its dimension, the backend, the query-embedding cache, and per route
    its request count and p50/p95 latency over its last 1000 requests against SLA_P95_MS."""
    metrics = request.app.state.metrics
    return StatsResponse(**service.stats().model_dump(), sla_p95_ms=metrics.sla_p95_ms, routes=metrics.route_stats())


router.include_router(write_router)
