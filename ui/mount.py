"""Mounting the Gradio UI at ``/ui`` with ``gr.mount_gradio_app``, built while the service opens.

Importing Gradio takes about as long as loading the model and opening the database on a 2-core machine (2-4 s,
most of it Gradio's own imports: its components, pandas), and nothing in the REST API needs it. So
:func:`start_import` begins that import on a thread as soon as the app is created (before the server even starts),
the lifespan runs :func:`build_and_mount` on a worker thread next to ``SearchService.open`` and waits for both:
start-up costs the longer of the two, not their sum, and ``/health`` answers once both are ready.
``UI_ENABLED=false`` never imports Gradio.

``gr.mount_gradio_app`` normally wraps the parent app's lifespan to start Gradio's queue; mounted from inside the
running lifespan, that wrapper would never run, so :func:`gradio_lifespan` runs the same start-up steps itself.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.routing import Mount

from app.api.site import UI_PATH

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.api.security import AccessPolicy
    from app.config import Settings
    from app.service import SearchService

LOGIN_MESSAGE = "Log in with the service's API key as the password (any user name)."
"""What Gradio's login page says when API_KEY_READS=true."""


def _quiet_gradio() -> None:
    # Gradio reads these when it is imported and when it serves; the service never wants them on.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def start_import() -> threading.Thread:
    """Import Gradio and :mod:`ui.app` on a daemon thread, now; :func:`build_and_mount` then finds them imported
    (Python's import lock makes it wait for an import still running). Returns the thread."""
    _quiet_gradio()
    thread = threading.Thread(target=importlib.import_module, args=("ui.app",), name="gradio-import", daemon=True)
    thread.start()
    return thread


def build_and_mount(
    app: FastAPI, settings: Settings, access: AccessPolicy, get_service: Callable[[], SearchService]
) -> FastAPI:
    """Import Gradio, build the UI and mount it at ``/ui`` of ``app``; returns Gradio's own (sub-)app. Blocking.

    - ``API_KEY_READS=true``: every Gradio route (page, config, uploads, files, queue) sits behind Gradio's login,
      whose password is the API key (any user name). Otherwise the page is open and writes ask for the key in a
      key box, checked on the server (:meth:`ui.context.UiContext.may_write`).
    - Gradio's upload limit is ``MAX_UPLOAD_MB``; no server-side rendering (no Node.js; and gradio-app/gradio#11008).
    - No analytics, no update check, no fonts or scripts from outside the service (:func:`ui.assets.theme`).
    """
    _quiet_gradio()
    import gradio as gr

    from ui.app import build_ui
    from ui.assets import CSS, PASTE_JS, theme

    blocks = build_ui(get_service, settings, access)
    login = (
        {"auth": lambda _user, password: access.key_is_valid(password), "auth_message": LOGIN_MESSAGE}
        if access.has_keys and access.reads_need_key
        else {}
    )
    parent_lifespan = app.router.lifespan_context
    gr.mount_gradio_app(
        app,
        blocks,
        path=UI_PATH,
        max_file_size=settings.max_upload_bytes,
        ssr_mode=False,
        footer_links=["api"],
        run_history=False,
        mcp_server=False,
        theme=theme(),
        css=CSS,
        js=PASTE_JS,
        **login,
    )
    app.router.lifespan_context = parent_lifespan  # see gradio_lifespan
    return next(r.app for r in app.routes if isinstance(r, Mount) and r.path == UI_PATH)


@asynccontextmanager
async def gradio_lifespan(gradio_app: FastAPI) -> AsyncIterator[None]:
    """Gradio's start-up and shutdown, as ``gr.mount_gradio_app``'s lifespan wrapper runs them (its queue, its
    file cache cleaner)."""
    async with gradio_app.router.lifespan_context(gradio_app):
        blocks = gradio_app.get_blocks()
        blocks.run_startup_events()
        await blocks.run_extra_startup_events()
        yield
