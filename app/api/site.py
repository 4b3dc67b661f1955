"""What a browser asks the server for besides the API: ``/`` (to the UI, or the API docs without one), a favicon,
and ``/ui`` (to ``/ui/``, where :mod:`ui.mount` mounts the Gradio UI)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

FAVICON = Path(__file__).parent / "static" / "favicon.svg"
UI_PATH = "/ui"
"""Where the Gradio UI is mounted."""


def site_router(*, ui_enabled: bool) -> APIRouter:
    """``GET /`` redirects to ``/ui/`` (``/docs`` when ``UI_ENABLED=false``); ``GET /favicon.ico`` is an SVG icon;
    with the UI, ``GET /ui`` redirects to ``/ui/`` (Gradio's page loads its files by relative URL)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/" if ui_enabled else "/docs", status_code=307)

    @router.get("/favicon.ico")
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    if ui_enabled:

        @router.get(UI_PATH)
        def ui_slash() -> RedirectResponse:
            return RedirectResponse(f"{UI_PATH}/", status_code=307)

    return router
