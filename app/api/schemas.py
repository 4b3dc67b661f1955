"""Pydantic request and response models; their examples show in the OpenAPI docs at ``/docs``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_EXAMPLE_ID = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class IndexResponse(BaseModel):
    """``status``: ``indexed`` when the image was new, ``exists`` when the same bytes were already indexed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"id": _EXAMPLE_ID, "status": "indexed"}]})
    id: str = Field(description="SHA-256 of the file bytes (64 hex characters).")
    status: Literal["indexed", "exists"]


class SearchResult(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity to the query, higher is more similar (at most 1).")
    filename: str = Field(description="Name given at upload; for bulk indexing, the path relative to the folder.")
    image_url: str = Field(description="URL of the original image (GET /image/{id}).")


class SearchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "id": _EXAMPLE_ID,
                            "score": 0.93,
                            "filename": "holiday/IMG_0042.jpg",
                            "image_url": f"http://localhost:8000/image/{_EXAMPLE_ID}",
                        }
                    ]
                }
            ]
        }
    )
    results: list[SearchResult]


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"query": "a dog on a beach", "top_k": 5}]})
    query: str = Field(min_length=1, max_length=1000, description="What to look for, in words.")
    top_k: int | None = Field(None, ge=1, description="Number of results (default DEFAULT_TOP_K, at most MAX_TOP_K).")


class ExistsRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ids": [_EXAMPLE_ID]}]})
    ids: list[str] = Field(max_length=1000, description="Image ids (SHA-256 hex) to look up, at most 1000.")


class ExistsResponse(BaseModel):
    existing: list[str] = Field(description="The subset of the requested ids that are indexed.")


class DeleteResponse(BaseModel):
    id: str
    status: Literal["deleted"]


class ModelHealth(BaseModel):
    id: str
    dimension: int
    device: str
    supports_text: bool


class HealthResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "database": "ok",
                    "backend": "pgvector",
                    "model": {
                        "id": "efficientnet-lite2:imagenet",
                        "dimension": 1280,
                        "device": "cpu",
                        "supports_text": False,
                    },
                }
            ]
        }
    )
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"]
    backend: str
    model: ModelHealth


class StatsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "count": 273,
                    "model": "efficientnet-lite2:imagenet",
                    "dimension": 1280,
                    "backend": "pgvector",
                    "device": "cpu",
                    "supports_text": False,
                }
            ]
        }
    )
    count: int
    model: str
    dimension: int
    backend: str
    device: str
    supports_text: bool


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in words.")
