"""Every error leaves the API as JSON ``{"detail": "<one string>"}`` with a status that fits.

Validation errors may add ``"errors"``: at most :data:`MAX_ERRORS` lines of at most :data:`MAX_ERROR_CHARS`
characters. No error body echoes the request's input (FastAPI's default 422 does, so a 40 MB body got a 32 MB
answer); :func:`error_response` builds every error body and caps its size, so none is over 4 KB.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    CorruptImageError,
    DatabaseUnavailableError,
    GraphNotBuiltError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidParameterError,
    InvalidVectorError,
    JobNotFoundError,
    LibraryConflictError,
    LibraryFileChangedError,
    LibraryNotFoundError,
    NoModelError,
    NoTextTowerError,
    ServiceBusyError,
    ServiceError,
    StorageFullError,
    StorageUnavailableError,
    UnsupportedFormatError,
)

log = logging.getLogger(__name__)

#: Longest ``detail`` sent, in characters (service messages quote at most a short part of any input).
MAX_DETAIL_CHARS = 1000
#: Most entries in a validation error's ``errors`` list, and longest entry, in characters.
MAX_ERRORS = 10
MAX_ERROR_CHARS = 200

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    UnsupportedFormatError: 415,
    ImageTooLargeError: 413,
    CorruptImageError: 422,
    NoTextTowerError: 400,
    NoModelError: 400,
    InvalidVectorError: 422,
    InvalidParameterError: 422,
    ImageNotFoundError: 404,
    JobNotFoundError: 404,
    LibraryNotFoundError: 404,
    LibraryConflictError: 409,
    LibraryFileChangedError: 409,
    GraphNotBuiltError: 409,
    DatabaseUnavailableError: 503,
    ServiceBusyError: 503,
    StorageFullError: 507,
    StorageUnavailableError: 503,
}


def status_for(exc: ServiceError) -> int:
    """HTTP status of a domain error (most specific class wins; unknown ones are 500)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(
    status: int, detail: object, *, errors: list[str] | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error body ``{"detail": str}`` (+ ``errors``), with ``detail`` cut to MAX_DETAIL_CHARS."""
    content: dict[str, object] = {"detail": _clip(str(detail), MAX_DETAIL_CHARS)}
    if errors:
        content["errors"] = [_clip(e, MAX_ERROR_CHARS) for e in errors[:MAX_ERRORS]]
    return JSONResponse(status_code=status, content=content, headers=dict(headers) if headers else None)


def describe_validation_error(error: Mapping) -> str:
    """One line for a pydantic/FastAPI error: where (``body.vector.3``) and what, never the offending input."""
    where = ".".join(str(part) for part in error.get("loc", ()))
    return _clip(f"{where}: {error.get('msg', 'invalid value')}", MAX_ERROR_CHARS)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn domain errors, HTTP errors, invalid requests and unexpected exceptions into
    JSON ``{"detail": ...}`` responses."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, DatabaseUnavailableError) and (metrics := getattr(request.app.state, "metrics", None)):
            metrics.count_database_error("request")
        retry = exc.retry_after_s
        headers = None if retry is None else {"Retry-After": str(max(1, math.ceil(retry)))}
        return error_response(status_for(exc), exc, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        lines = [describe_validation_error(e) for e in errors[:MAX_ERRORS]]
        first = lines[0] if lines else "the request does not match the API"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return error_response(422, f"Invalid request: {first}{more}", errors=lines)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        # This answer leaves through Starlette's outermost middleware, past NoSniffMiddleware: add its header here.
        return error_response(
            500, "Internal server error; see the server log.", headers={"X-Content-Type-Options": "nosniff"}
        )
