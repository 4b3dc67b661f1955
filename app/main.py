"""The ASGI application ``app.main:app``: REST API, OpenAPI docs at ``/docs`` and the Gradio UI at ``/ui/``.

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

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

import app as app_package
from app.api.errors import install_error_handlers
from app.api.jobs import router as jobs_router
from app.api.libraries import router as libraries_router
from app.api.limits import install_limits
from app.api.metrics import install_metrics
from app.api.params import no_repeated_query_parameters
from app.api.ratelimit import install_rate_limit
from app.api.routes import router
from app.api.security import install_security
from app.api.site import site_router
from app.config import Settings
from app.imaging.admission import MALLOC_ARENAS, configure_malloc

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
    ui_gate = None
    if settings.ui_enabled:
        from ui.mount import UiGate  # imports no Gradio

        ui_gate = UiGate()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.service import SearchService

        service = await run_in_threadpool(SearchService.open, settings, embedder, app.state.metrics)
        app.state.service = service
        ui = None
        try:
            if ui_gate is not None:
                # Gradio is imported and the UI built once the API has answered its first request (/health,
                # typically), a request to /ui came or a second passed (ui.mount); requests to /ui wait in the gate.
                from ui.mount import UiStarter

                ui = UiStarter(app, ui_gate, settings, app.state.access, lambda: app.state.service)
                ui.start()
            yield
        finally:
            try:
                if ui is not None:
                    await ui.stop()
            finally:
                service.close()

    # fastapi-offline serves Swagger UI's and ReDoc's JavaScript and CSS from the installed package: /docs and
    # /redoc work on machines with no internet access (FastAPI's own pages load them from a CDN).
    app = FastAPIOffline(
        favicon_url="/favicon.ico",
        title="Image similarity search",
        version=app_package.__version__,
        description="Index images and find similar ones by example image or, with a CLIP model, by text.",
        lifespan=lifespan,
        dependencies=[Depends(no_repeated_query_parameters)],  # every API route: ?top_k=3&top_k=50 is a 422
    )
    app.state.settings = settings

    install_error_handlers(app)
    install_limits(app, settings)
    install_rate_limit(app, settings)  # inside the security checks: refused hosts and origins are not counted
    install_security(app, settings)  # after install_limits: its 413s get CORS and nosniff headers
    if ui_gate is not None:
        from ui.mount import FirstAnswer

        app.add_middleware(FirstAnswer, gate=ui_gate)  # the UI is built once the API has answered (ui.mount)
    install_metrics(app, settings)  # last: outermost, so it times and counts every answer
    app.include_router(router)
    app.include_router(jobs_router)  # POST /jobs/neighbours, GET /jobs/{id}, GET /duplicates
    app.include_router(libraries_router)  # photo libraries indexed in place: /libraries...
    app.include_router(site_router(ui_enabled=settings.ui_enabled))
    if ui_gate is not None:
        from app.api.site import UI_PATH

        app.mount(UI_PATH, ui_gate)  # the Gradio UI, once the lifespan has built it (ui.mount)
    return app


def configure_logging(settings: Settings) -> None:
    """Log to stderr at ``LOG_LEVEL`` unless the host process (uvicorn, a test runner) configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def __getattr__(name: str) -> FastAPI:
    """``app.main:app``, built from the environment on first access and kept (what uvicorn and Docker import)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Before the server's threads allocate: two malloc arenas instead of glibc's eight per core (issue #27: over
    # bursts of large decodes the process crept about 300 MB higher with the default, and peaked higher;
    # docs/benchmarks.md, "glibc arenas"). MALLOC_ARENA_MAX in the environment wins.
    configure_malloc(MALLOC_ARENAS)
    settings = Settings()
    configure_logging(settings)
    application = globals()["app"] = create_app(settings)
    return application
