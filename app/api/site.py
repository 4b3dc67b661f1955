"""What a browser asks the server for besides the API: ``/`` (to the UI, or the API docs without one), a favicon,
and the web UI at ``/ui/``.

The web UI is a static single-page app (``ui/static/``: HTML, CSS and JavaScript modules, no build step) that calls
this service's own REST API with ``fetch``. Its files carry no data, so they are public even with
``API_KEY_READS=true``; every data call the page makes carries the key the user entered (``X-API-Key``).
``GET /ui/config.json`` tells the page, before it calls anything else, whether it must ask for a key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

import ui

FAVICON = Path(__file__).parent / "static" / "favicon.svg"
UI_DIR = Path(ui.__file__).resolve().parent / "static"
"""The web UI's files (``ui/static/``), served at ``/ui/``."""
UI_PATH = "/ui"

UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
"""Content-Security-Policy of the UI's files: its own scripts and styles only, images from the service or blob: URLs
(what the page makes from fetched bytes). File names and other stored text are shown as text, never as HTML; this
makes sure that even a mistake there could not run a script or send data elsewhere."""


class _UiFiles(StaticFiles):
    """``StaticFiles`` that adds :data:`UI_CSP` and ``no-cache`` (the browser revalidates with the ETag, so a new
    version of the UI is picked up at once after an upgrade, without a build step's hashed file names)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = UI_CSP
        response.headers["Cache-Control"] = "no-cache"
        return response


class UiConfig(BaseModel):
    """``GET /ui/config.json``: what the web UI must know before its first data call. Public, and holds no data."""

    reads_need_key: bool = Field(description="API_KEY_READS: every data call needs the key (the UI asks first).")
    writes_need_key: bool = Field(description="API_KEY is set: adding and deleting images need the key.")
    writes_refused: str | None = Field(description="Why writes are refused for everyone (no key, non-loopback HOST).")
    default_top_k: int = Field(description="DEFAULT_TOP_K: results per page unless the user picks another number.")
    max_top_k: int = Field(description="MAX_TOP_K: the most results one request may ask for.")
    max_upload_mb: float = Field(description="MAX_UPLOAD_MB: the largest file accepted.")
    max_batch_files: int = Field(description="MAX_BATCH_FILES: the most files in one POST /index_images.")
    max_batch_mb: float = Field(description="MAX_BATCH_MB: the most bytes (10^6) in one POST /index_images.")


def site_router(*, ui_enabled: bool) -> APIRouter:
    """``GET /`` redirects to ``/ui/`` (``/docs`` when ``UI_ENABLED=false``); ``GET /favicon.ico`` is an SVG icon;
    with the UI, ``GET /ui`` redirects to ``/ui/`` and ``GET /ui/config.json`` answers a :class:`UiConfig`."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/" if ui_enabled else "/docs", status_code=307)

    @router.get("/favicon.ico")
    def favicon() -> FileResponse:
        return FileResponse(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    if ui_enabled:

        @router.get(UI_PATH)
        def ui_slash() -> RedirectResponse:
            # The page loads its modules by relative URL, which only resolve under /ui/.
            return RedirectResponse(f"{UI_PATH}/", status_code=307)

        @router.get(f"{UI_PATH}/config.json")
        def ui_config(request: Request) -> UiConfig:
            settings, access = request.app.state.settings, request.app.state.access
            return UiConfig(
                reads_need_key=access.has_keys and access.reads_need_key,
                writes_need_key=access.has_keys,
                writes_refused=access.write_refusal(),
                default_top_k=min(settings.default_top_k, settings.max_top_k),
                max_top_k=settings.max_top_k,
                max_upload_mb=settings.max_upload_mb,
                max_batch_files=settings.max_batch_files,
                max_batch_mb=settings.max_batch_mb,
            )

    return router


def mount_ui(app: FastAPI) -> None:
    """Serve ``ui/static/`` at ``/ui/`` (``index.html`` for ``/ui/``); call after :func:`site_router` is included,
    so that ``/ui/config.json`` is routed before the static files."""
    app.mount(UI_PATH, _UiFiles(directory=UI_DIR, html=True), name="ui")
