"""The ASGI application ``app.main:app``: REST API, OpenAPI docs at ``/docs`` and the Gradio UI at ``/ui``.

:func:`create_app` is the application factory; tests and embedders of the service call it. ``app`` itself is built
on first access (PEP 562 module ``__getattr__``), so importing this module for the factory builds nothing. Everything
stateful (model, database pool, image store) is created by the lifespan, as one
:class:`app.service.SearchService` on ``app.state.service``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import app as app_package
from app.api.errors import install_error_handlers
from app.api.routes import router
from app.config import Settings

if TYPE_CHECKING:
    from app.embedders.base import Embedder

log = logging.getLogger("app")


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: configuration; read from the environment when ``None``.
        embedder: an already loaded model to use instead of loading one from the settings (lets tests share one).
    """
    settings = settings or Settings()
    ui = None
    if settings.ui_enabled:
        from ui.mount import DeferredUI

        def build_ui() -> tuple[object, dict]:
            from ui.app import build_ui

            return build_ui(lambda: app.state.service, settings=settings), {}

        ui = DeferredUI(build_ui)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.service import SearchService

        if ui is not None:
            ui.start()  # built on a worker thread while the service opens: /health does not wait for it
        try:
            service = await run_in_threadpool(SearchService.open, settings, embedder)
        except BaseException:
            if ui is not None:
                await ui.stop()
            raise
        app.state.service = service
        try:
            yield
        finally:
            if ui is not None:
                await ui.stop()
            service.close()

    app = FastAPI(
        title="Image similarity search",
        version=app_package.__version__,
        description="Index images and find similar ones by example image or, with a CLIP model, by text.",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.middleware("http")
    async def _reject_oversized_uploads(request: Request, call_next):
        # Refuse before the body is read; multipart overhead gets 1 MB of slack over the image limit. A batch
        # upload has its own, larger limit for all its files together (each file is still held to MAX_UPLOAD_MB).
        length = request.headers.get("content-length")
        if request.url.path == "/index_images":
            limit, what = settings.max_batch_bytes, f"{settings.max_batch_mb:g} MB (MAX_BATCH_MB)"
        else:
            limit, what = settings.max_upload_bytes, f"{settings.max_upload_mb:g} MB (MAX_UPLOAD_MB)"
        if length and length.isdigit() and int(length) > limit + 1_000_000:
            return JSONResponse(status_code=413, content={"detail": f"The upload is over the limit of {what}."})
        return await call_next(request)

    install_error_handlers(app)
    app.include_router(router)

    if ui is not None:
        app.mount(ui.path, ui)
    return app


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``LOG_LEVEL`` unless the host process (uvicorn, a test runner) configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def __getattr__(name: str) -> FastAPI:
    """``app.main:app``, built from the environment on first access and kept (what uvicorn and Docker import)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    settings = Settings()
    configure_logging(settings)
    application = globals()["app"] = create_app(settings)
    return application
