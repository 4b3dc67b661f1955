"""What a browser asks the server for besides the API: ``/`` (to the UI, or the API docs without one) and a favicon."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

FAVICON = Path(__file__).parent / "static" / "favicon.svg"


def site_router(*, ui_enabled: bool) -> APIRouter:
    """``GET /`` redirects to ``/ui/`` (``/docs`` when ``UI_ENABLED=false``); ``GET /favicon.ico`` is an SVG icon."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/" if ui_enabled else "/docs", status_code=307)

    @router.get("/favicon.ico")
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    return router
