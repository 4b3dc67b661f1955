"""Every error leaves the API as JSON ``{"detail": ...}`` with a status that fits."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.errors import (
    CorruptImageError,
    DatabaseUnavailableError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidParameterError,
    InvalidVectorError,
    NoModelError,
    NoTextTowerError,
    ServiceError,
    UnsupportedFormatError,
)

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    UnsupportedFormatError: 415,
    ImageTooLargeError: 413,
    CorruptImageError: 422,
    NoTextTowerError: 400,
    NoModelError: 400,
    InvalidVectorError: 422,
    InvalidParameterError: 422,
    ImageNotFoundError: 404,
    DatabaseUnavailableError: 503,
}


def status_for(exc: ServiceError) -> int:
    """HTTP status of a domain error (most specific class wins; unknown ones are 500)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn domain errors and unexpected exceptions into JSON responses."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(status_code=status_for(exc), content={"detail": str(exc)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": "Internal server error; see the server log."})
