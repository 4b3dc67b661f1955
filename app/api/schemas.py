"""Pydantic request and response models; their examples show in the OpenAPI docs at ``/docs``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictInt, model_validator

from app.api.search_params import SearchOptionsBody
from app.search.query import MAX_TERMS
from app.stats import ServiceStats

_EXAMPLE_ID = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

#: Most values in a /search_vector vector (the largest model dimension here is 1280).
MAX_VECTOR_VALUES = 16000


def _at_most_max_vector_values(value: object) -> object:
    # Checked before pydantic converts the items: it checks a list's length only after validating every item,
    # which for a 40 MB body means millions of conversions just to refuse it.
    if isinstance(value, list) and len(value) > MAX_VECTOR_VALUES:
        raise ValueError(f"at most {MAX_VECTOR_VALUES} values, got {len(value)}")
    return value


class IndexResponse(BaseModel):
    """``status``: ``indexed`` when the image was new, ``exists`` when the same bytes were already indexed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"id": _EXAMPLE_ID, "status": "indexed"}]})
    id: str = Field(description="SHA-256 of the file bytes (64 hex characters).")
    status: Literal["indexed", "exists"]


class BatchIndexItem(BaseModel):
    """Outcome of one file of ``POST /index_images``."""

    filename: str = Field(description="The stored name (the form field `filenames`, else the part's file name).")
    id: str = Field(description="SHA-256 of the file bytes (64 hex characters), also for files that failed.")
    status: Literal["indexed", "exists", "error"] = Field(
        description="indexed: new; exists: the same bytes were already indexed (or earlier in this batch); "
        "error: this file was refused, the others were not affected."
    )
    detail: str | None = Field(None, description="Why the file was refused (status error only).")
    code: int | None = Field(
        None, description="The HTTP status POST /index_image would answer for this file (413, 415, 422; error only)."
    )


class BatchIndexResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {"filename": "a.jpg", "id": _EXAMPLE_ID, "status": "indexed", "detail": None, "code": None},
                        {
                            "filename": "notes.png",
                            "id": "0" * 64,
                            "status": "error",
                            "detail": "Unrecognised image format: the data matches no supported image type",
                            "code": 415,
                        },
                    ]
                }
            ]
        }
    )
    results: list[BatchIndexItem] = Field(description="One entry per uploaded file, in upload order.")


class SearchResult(BaseModel):
    rank: int = Field(description="Position in the whole ranking, from 1 (offset + 1 for a page's first result).")
    id: str
    score: float = Field(description="Cosine similarity to the query, higher is more similar (at most 1).")
    filename: str = Field(description="Name given at upload; for bulk indexing, the path relative to the folder.")
    format: str = Field(description="Decoded format: JPEG, PNG, HEIF, WEBP...")
    width: int = Field(description="Width in pixels, after EXIF orientation.")
    height: int = Field(description="Height in pixels, after EXIF orientation.")
    bytes: int = Field(description="Size of the original file in bytes.")
    indexed_at: datetime = Field(description="When the image was indexed (UTC).")
    taken_at: datetime | None = Field(
        description="When the photo was taken (EXIF DateTimeOriginal, in UTC; UTC assumed when the file records no "
        "offset); null when the file has no such date."
    )
    image_url: str = Field(
        description="URL of the original image (GET /image/{id}): built from PUBLIC_URL when set, else from the "
        "request's URL when ALLOWED_HOSTS restricts the Host (the loopback default does), else the path alone."
    )


class SearchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "rank": 1,
                            "id": _EXAMPLE_ID,
                            "score": 0.93,
                            "filename": "holiday/IMG_0042.jpg",
                            "format": "JPEG",
                            "width": 4032,
                            "height": 3024,
                            "bytes": 2816512,
                            "indexed_at": "2026-11-28T08:47:43.123456Z",
                            "taken_at": "2024-07-14T16:02:11Z",
                            "image_url": f"http://localhost:8000/image/{_EXAMPLE_ID}",
                        }
                    ]
                }
            ]
        }
    )
    results: list[SearchResult]


class TextSearchRequest(SearchOptionsBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"query": "a dog on a beach", "top_k": 5}]})
    query: str = Field(min_length=1, max_length=1000, description="What to look for, in words.")
    top_k: StrictInt | None = Field(
        None, ge=1, description="Number of results (default DEFAULT_TOP_K, at most MAX_TOP_K)."
    )


class VectorSearchRequest(SearchOptionsBody):
    model_config = ConfigDict(json_schema_extra={"examples": [{"vector": [0.12, -0.03, 0.5], "top_k": 5}]})
    # NaN/Infinity (Python's JSON parser accepts those literals) pass here on purpose: the service refuses them with
    # its own 422, since a validation error would echo the value back and NaN cannot be written as JSON.
    # Strict: numbers only (JSON true/false or "1.5" are refused instead of becoming 1.0 and 1.5).
    vector: Annotated[list[Annotated[float, Strict()]], BeforeValidator(_at_most_max_vector_values)] = Field(
        min_length=1,
        max_length=MAX_VECTOR_VALUES,
        description="An embedding from the collection's model: exactly D values (GET /stats: dimension), any "
        "scale (it is L2-normalised), not all zero.",
    )
    top_k: StrictInt | None = Field(
        None, ge=1, description="Number of results (default DEFAULT_TOP_K, at most MAX_TOP_K)."
    )


class QueryItem(BaseModel):
    """One term of ``POST /search``: exactly one of ``image_id``, ``text``, ``vector``, with an optional weight."""

    image_id: str | None = Field(None, max_length=200, description="A stored image (its SHA-256 id).")
    text: str | None = Field(None, min_length=1, max_length=1000, description="A description (CLIP models only).")
    vector: Annotated[list[Annotated[float, Strict()]], BeforeValidator(_at_most_max_vector_values)] | None = Field(
        None, min_length=1, max_length=MAX_VECTOR_VALUES, description="An embedding of the model, any scale."
    )
    weight: float = Field(1.0, gt=0, le=100, description="How much this term counts (> 0; default 1).")

    @model_validator(mode="after")
    def _exactly_one(self) -> QueryItem:
        if sum(v is not None for v in (self.image_id, self.text, self.vector)) != 1:
            raise ValueError("each item needs exactly one of image_id, text or vector")
        return self


class CombinedSearchRequest(SearchOptionsBody):
    """``POST /search``: the weighted sum of the L2-normalised positive terms minus the negative ones, normalised."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "positive": [{"image_id": _EXAMPLE_ID}, {"text": "golden retriever", "weight": 2}],
                    "negative": [{"text": "fruit"}],
                    "top_k": 10,
                }
            ]
        }
    )
    positive: list[QueryItem] = Field(min_length=1, max_length=MAX_TERMS, description="Terms to look for.")
    negative: list[QueryItem] = Field([], max_length=MAX_TERMS, description="Terms to look away from.")
    top_k: StrictInt | None = Field(
        None, ge=1, description="Number of results (default DEFAULT_TOP_K, at most MAX_TOP_K)."
    )


class ExistsRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ids": [_EXAMPLE_ID]}]})
    ids: list[str] = Field(max_length=1000, description="Image ids (SHA-256 hex) to look up, at most 1000.")


class ExistsResponse(BaseModel):
    existing: list[str] = Field(description="The subset of the requested ids that are indexed.")


class DeleteResponse(BaseModel):
    id: str
    status: Literal["deleted"]


class RouteLatencyResponse(BaseModel):
    """Recent latency of one route (``"METHOD /path/template"``), from the app's request timing."""

    count: int = Field(description="Requests answered since start.")
    window: int = Field(description="How many of the most recent requests p50/p95 are over (at most 1000).")
    p50_ms: float = Field(description="Median latency over the window, ms.")
    p95_ms: float = Field(description="95th percentile latency over the window, ms.")
    meets_sla: bool = Field(description="p95_ms <= SLA_P95_MS.")


class StatsResponse(ServiceStats):
    """``GET /stats``: the service's figures plus the recent latency of each route against SLA_P95_MS."""

    sla_p95_ms: float = Field(description="The latency target routes are held to (SLA_P95_MS), ms.")
    routes: dict[str, RouteLatencyResponse] = Field(
        default_factory=dict, description="Per route, its request count and recent p50/p95 latency."
    )


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in words.")
