"""Mounting the Gradio UI at ``/ui`` without putting it on the start-up path.

Importing Gradio and building the Blocks takes several seconds (longer than loading the model and opening the
database on a 2-core machine), and nothing in the REST API needs it. :class:`DeferredUI` is mounted at ``/ui`` in
place of Gradio's app: the lifespan calls :meth:`DeferredUI.start` first, the UI is built on a worker thread while
the service opens, and ``/health`` answers as soon as the service is ready. A request to ``/ui`` that arrives before
the UI is built waits for it (at most :data:`READY_TIMEOUT_S`); Gradio's own start-up events run in the server's
event loop once the build is done, as ``gr.mount_gradio_app`` would run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
"""How long a request to ``/ui`` waits for the UI to be built before it gets a 503."""


class DeferredUI:
    """An ASGI app for ``/ui`` that builds the Gradio UI off the start-up path and then serves it.

    Args:
        build: called on a worker thread; returns ``(gradio Blocks, keyword arguments for gr.mount_gradio_app)``.
        path: where the UI is mounted in the main app (``/ui``).
    """

    def __init__(self, build: Callable[[], tuple[Any, dict[str, Any]]], path: str = "/ui") -> None:
        self._build = build
        self.path = path
        self.blocks: Any = None  # the gr.Blocks, once built
        self._host: ASGIApp | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stack = contextlib.AsyncExitStack()

    def start(self) -> None:
        """Start building the UI in the background; call from the lifespan, in the event loop."""
        self._ready = asyncio.Event()  # bound to the running loop (TestClient runs one loop per client)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            host = await run_in_threadpool(self._make_host)
            # Gradio's start-up events (its queue) run inside the host app's lifespan, in this event loop.
            await self._stack.enter_async_context(host.router.lifespan_context(host))
            self._host = host
        except Exception as exc:  # noqa: BLE001 - reported to every /ui request; the API keeps working
            log.exception("The web UI could not be built")
            self._error = exc
        finally:
            self._ready.set()

    def _make_host(self) -> FastAPI:
        import gradio as gr

        blocks, kwargs = self._build()
        self.blocks = blocks
        # A host app of its own, with Gradio mounted at the same path as in the main app, so that Gradio sees
        # exactly the scope (path, root_path) it would see mounted there directly.
        host = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        return gr.mount_gradio_app(host, blocks, path=self.path, **kwargs)

    async def stop(self) -> None:
        """Stop Gradio (its lifespan) if it was started; cancel a build still running."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._stack.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # the main app's lifespan drives ours; nothing to do here
            return
        if self._host is None and self._error is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), READY_TIMEOUT_S)
        if self._host is None:
            detail = "The web UI is still starting; try again in a few seconds."
            if self._error is not None:
                detail = "The web UI could not start; see the server log. The REST API works."
            if scope["type"] == "http":
                response = JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})
                await response(scope, receive, send)
            return
        # Mount added our path to root_path; the host routes the full path itself.
        root = scope.get("root_path", "")
        outer = {**scope, "root_path": root[: -len(self.path)] if root.endswith(self.path) else root}
        await self._host(outer, receive, send)
