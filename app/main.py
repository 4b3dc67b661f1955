"""The ASGI application ``app.main:app``: REST API, OpenAPI docs at ``/docs`` and the Gradio UI at ``/ui``.

Everything stateful (model, database pool, image store) is created in :func:`lifespan` and kept on ``app.state``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

import app as app_package
from app.api.errors import install_error_handlers
from app.api.routes import router
from app.config import Settings
from app.embedders.base import Embedder

log = logging.getLogger("app")


def _build_service(settings: Settings, embedder: Embedder | None):
    """Load the model, connect the database and check they match; blocking, so run off the event loop."""
    from app.batching import DynamicBatcher
    from app.embedders import load_embedder
    from app.service import SearchService
    from app.storage import ImageStore
    from app.vectordb import create_handler

    if embedder is None and settings.embedder != "none":
        embedder = load_embedder(settings)
    db = create_handler(settings)
    try:
        if embedder is None:  # EMBEDDER=none: stand in for whichever model filled the collection
            from app.embedders.none import VectorOnlyEmbedder

            info = db.collection_info()
            if info is None:
                raise RuntimeError(
                    "EMBEDDER=none serves an existing collection, but the database has none yet: index images "
                    "first with a model (EMBEDDER=auto, clip or efficientnet)."
                )
            embedder = VectorOnlyEmbedder(info.model_id, info.dim)
        db.ensure_collection(embedder.model_id, embedder.dim)
    except BaseException:
        db.close()
        raise
    batcher = DynamicBatcher(
        embedder.embed_images, max_batch=settings.embed_batch_size, max_wait_s=settings.batch_wait_ms / 1000
    )
    service = SearchService(settings, embedder, db, ImageStore(settings.resolved_image_dir), batcher)
    log.info(
        "Ready: model %s (dim %d, %s), backend %s, %d images",
        embedder.model_id,
        embedder.dim,
        embedder.device,
        db.backend_name,
        db.count(),
    )
    return service


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None) -> FastAPI:
    """Build the FastAPI app.

    Args:
        settings: configuration; read from the environment when ``None``.
        embedder: an already loaded model to use instead of loading one from the settings (lets tests share one).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(_build_service, settings, embedder)
        app.state.service = service
        try:
            yield
        finally:
            if service.batcher is not None:
                service.batcher.close()  # finishes the embed calls already queued
            service.db.close()

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

    if settings.ui_enabled:
        import gradio as gr

        from ui.app import build_ui

        app = gr.mount_gradio_app(app, build_ui(lambda: app.state.service, settings=settings), path="/ui")
    return app


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=Settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


_configure_logging()
app = create_app()
