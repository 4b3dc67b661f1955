"""Mounting the Gradio UI at ``/ui`` with ``gr.mount_gradio_app``, built once the API serves.

Importing Gradio and building the page takes about as long as loading the model and opening the database on a
2-core machine (2-4 s, most of it Gradio's own imports: its components, pandas), and nothing in the REST API needs
it. So the lifespan opens the service first (``/health`` answers then), and only then imports and builds the UI on
a worker thread (:class:`UiStarter`). Meanwhile :class:`UiGate`, mounted at ``/ui`` when the app is created, holds
each request until the UI is built and then hands it on; it answers ``503`` with ``Retry-After`` only when the
build takes over :data:`UI_WAIT_S` or failed. So ``/ui/`` never answers 404 or 500 while the UI is being built.
``UI_ENABLED=false`` never imports Gradio.

Each instance keeps the files Gradio handles (uploads, and the thumbnails, previews and originals of
:mod:`ui.files`) in a folder of its own, ``<DATA_DIR>/ui-files`` (:func:`ui_files_folder`), and Gradio serves and
accepts only files in it: two services on one host never read each other's files through their UIs.

``gr.mount_gradio_app`` normally wraps the parent app's lifespan to start Gradio's queue; mounted from inside the
running lifespan, that wrapper would never run, so :func:`gradio_lifespan` runs the same start-up steps itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.site import UI_PATH

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.api.security import AccessPolicy
    from app.config import Settings
    from app.service import SearchService

log = logging.getLogger(__name__)

#: How long a request to ``/ui`` waits for the UI being built before it is answered 503, seconds. The build takes
#: 2-4 s on a 2-core machine; a browser's request waits that long instead of failing.
UI_WAIT_S = 30.0
#: What a 503 of :class:`UiGate` asks the client to wait before trying again, seconds.
UI_RETRY_AFTER_S = 2
#: Files of the UI's folder older than this are deleted at start-up (Gradio's delete_cache removes only the files
#: the running process made): an hour, as delete_cache's age in :func:`ui.app.build_ui`.
STALE_UI_FILE_S = 3600

LOGIN_MESSAGE = "Log in with the service's API key as the password (any user name)."
"""What Gradio's login page says when API_KEY_READS=true."""

#: Gradio routes (below /ui) the login page itself loads before anyone logged in: the page shell, its scripts,
#: styles and icons (no data), and the login and logout forms. Every other route waits for a login
#: (:class:`LoginGate`).
LOGIN_PAGE_PATHS = frozenset(
    {"", "/", "/login", "/login/", "/logout", "/theme.css", "/favicon.ico", "/robots.txt", "/manifest.json"}
)
LOGIN_PAGE_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


class LoginGate:
    """With API_KEY_READS, the Gradio app's outermost middleware: every route but :data:`LOGIN_PAGE_PATHS` /
    :data:`LOGIN_PAGE_PREFIXES` answers ``401`` (JSON ``detail``; a WebSocket is closed) without a session of
    Gradio's login, whose password is the API key.

    Gradio's own ``login_check`` guards the routes with data, not the others (the heartbeat event stream,
    ``reset``, ``cancel``, ``app_id``, ``user``, ``token``, ``startup-events``, ``stream/...``): no data leaks
    there, but an event stream held open per anonymous client is a resource anyone could hold. Deny by default, so
    a route a later Gradio adds is covered too.

    Args:
        app: the Gradio app inside.
        gradio_app: the same Gradio app (``tokens`` and ``cookie_id``: who logged in).
    """

    def __init__(self, app, gradio_app) -> None:  # noqa: ANN001 - ASGI app, Gradio's App
        self.app = app
        self.gradio_app = gradio_app

    def _logged_in(self, scope) -> bool:  # noqa: ANN001
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cookie_id = self.gradio_app.cookie_id
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return token is not None and self.gradio_app.tokens.get(token) is not None

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] in ("http", "websocket"):
            path, root = scope.get("path", ""), scope.get("root_path", "")
            route = path[len(root) :] if root and path.startswith(root) else path
            logged_in = self._logged_in(scope)
            if not (route in LOGIN_PAGE_PATHS or route.startswith(LOGIN_PAGE_PREFIXES) or logged_in):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": "log in first"})
                    return
                from app.api.errors import error_response

                await error_response(401, "Log in first: " + LOGIN_MESSAGE)(scope, receive, send)
                return
            if scope["type"] == "http" and route in ("", "/") and not logged_in:
                send = _titled(send)
        await self.app(scope, receive, send)


#: The login page's title: Gradio 6.31 serves its login page without one (its page title comes from the app's
#: config, which a visitor who has not logged in is not sent), and a page needs one (axe-core's document-title).
LOGIN_TITLE = b"<title>Log in - Image similarity search</title>"


def _titled(send):  # noqa: ANN001, ANN202 - ASGI send
    """``send`` with :data:`LOGIN_TITLE` put into the HTML page it sends (after ``<head>``; Content-Length fixed)."""
    held: dict = {}
    body = bytearray()

    async def titled(message) -> None:  # noqa: ANN001
        if message["type"] == "http.response.start":
            held["start"] = message
            return
        if message["type"] != "http.response.body" or "start" not in held:
            await send(message)
            return
        body.extend(message.get("body", b""))
        if message.get("more_body"):
            return
        start = held.pop("start")
        headers = list(start.get("headers", []))
        is_html = any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers)
        data = bytes(body)
        if is_html and b"<title>" not in data:
            data = data.replace(b"<head>", b"<head>" + LOGIN_TITLE, 1)
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(data)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return titled


class UiGate:
    """The ASGI app mounted at ``/ui`` from the start: hands each request to the Gradio app once it is built.

    Before that, an HTTP request waits for the build (at most :data:`UI_WAIT_S`); one that outwaits it, or comes
    after a failed build, is answered ``503`` with ``Retry-After`` and a JSON ``detail``; a WebSocket is closed
    (1013, try again later).
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.failed: str | None = None
        self._ready = threading.Event()

    def ready(self, app: ASGIApp) -> None:
        """The UI is built: every request from now on goes to ``app``."""
        self.app = app
        self._ready.set()

    def fail(self, why: str) -> None:
        """The UI could not be built: requests are answered 503 saying ``why``."""
        self.failed = why
        self._ready.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return  # a mounted app gets no lifespan of its own; UiStarter runs Gradio's
        if self.app is None and self.failed is None:
            deadline = time.monotonic() + UI_WAIT_S
            while not self._ready.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013, "reason": "the web UI is starting"})
            return
        from app.api.errors import error_response

        detail = (
            f"The web UI could not start ({self.failed}); the API works: see /docs."
            if self.failed
            else "The web UI is starting: try again in a moment."
        )
        await error_response(503, detail, headers={"Retry-After": str(UI_RETRY_AFTER_S)})(scope, receive, send)


class UiStarter:
    """Imports Gradio, builds the UI and runs Gradio's start-up and shutdown, in the background of the lifespan, once
    the service is open: :meth:`start` returns at once, :meth:`stop` ends it (waiting for a build still running)."""

    def __init__(
        self,
        app: FastAPI,
        gate: UiGate,
        settings: Settings,
        access: AccessPolicy,
        get_service: Callable[[], SearchService],
    ) -> None:
        self._args = (app, settings, access, get_service)
        self._gate = gate
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start building the UI; requests to ``/ui`` wait for it in :class:`UiGate`."""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        from starlette.concurrency import run_in_threadpool

        try:
            gradio_app = await run_in_threadpool(build_and_mount, *self._args)
        except Exception as exc:  # the API goes on without its UI, which says why
            log.exception("The web UI could not be built")
            self._gate.fail(type(exc).__name__)
            return
        async with gradio_lifespan(gradio_app):
            self._gate.ready(gradio_app)
            await self._stop.wait()

    async def stop(self) -> None:
        """Stop Gradio (its queue, its file cleaner); a build still running is waited for first."""
        self._stop.set()
        if self._task is not None:
            await self._task


def _quiet_gradio() -> None:
    # Gradio reads these when it is imported and when it serves; the service never wants them on.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def ui_files_folder(settings: Settings) -> Path:
    """The folder Gradio keeps this instance's files in: ``GRADIO_TEMP_DIR`` where the environment sets it, else
    ``<DATA_DIR>/ui-files``. Gradio reads it from the environment, once per process, so the first UI built in a
    process sets it (one service per process, as ``python -m app`` and uvicorn run it)."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str((Path(settings.data_dir) / "ui-files").resolve()))
    folder = Path(os.environ["GRADIO_TEMP_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sweep(folder: Path, age_s: float) -> None:
    """Delete the files under ``folder`` older than ``age_s`` seconds (and the folders left empty): what an earlier
    run of the service left, which Gradio does not know about. Runs on a daemon thread; errors are logged."""
    cutoff = time.time() - age_s
    removed = 0
    try:
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            try:
                if path.is_file() and path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError:
                continue  # made or removed meanwhile by a request or another replica
    except OSError as exc:
        log.warning("Could not clean the web UI's folder %s: %s", folder, exc)
    if removed:
        log.info("Deleted %d files older than %.0f s from the web UI's folder %s", removed, age_s, folder)


def build_and_mount(
    app: FastAPI, settings: Settings, access: AccessPolicy, get_service: Callable[[], SearchService]
) -> FastAPI:
    """Import Gradio, build the UI and mount it at ``/ui`` of ``app``; returns Gradio's own (sub-)app, which the
    :class:`UiGate` mounted there hands requests to. Blocking.

    - ``API_KEY_READS=true``: every Gradio route (config, uploads, files, queue, heartbeat...) but the login page's
      own sits behind Gradio's login, whose password is the API key (any user name; :class:`LoginGate`).
      Otherwise the page is open and writes ask for the key in a
      key box, checked on the server (:meth:`ui.context.UiContext.may_write`).
    - Uploads: no per-file limit of Gradio's (it refuses a whole choice of files, in its own units, when one is
      over); the request's body is limited to MAX_BATCH_MB (:mod:`app.api.limits`), and the handlers judge each
      file by MAX_UPLOAD_MB, saying why one is refused. No server-side rendering (no Node.js; gradio-app/gradio#11008).
    - Files: this instance's own folder (:func:`ui_files_folder`); Gradio checks that every file a client names is
      in it (``has_launched``: a mounted app skips that check otherwise, and a script could name any file of the
      server in a call).
    - No analytics, no update check, no fonts or scripts from outside the service (:func:`ui.assets.theme`).
    """
    _quiet_gradio()
    folder = ui_files_folder(settings)
    threading.Thread(target=_sweep, args=(folder, STALE_UI_FILE_S), name="ui-files-sweep", daemon=True).start()
    import gradio as gr

    from ui.app import build_ui
    from ui.assets import CSS, PAGE_JS, theme

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
        ssr_mode=False,
        footer_links=["api"],
        run_history=False,
        mcp_server=False,
        theme=theme(),
        css=CSS,
        js=PAGE_JS,
        **login,
    )
    app.router.lifespan_context = parent_lifespan  # see gradio_lifespan
    # gr.mount_gradio_app appended its own Mount after the UiGate's: requests reach Gradio through the gate.
    mount = next(r for r in reversed(app.routes) if isinstance(r, Mount) and r.path == UI_PATH)
    app.routes.remove(mount)
    gradio_app = mount.app
    # Check the paths clients name (uploads) against the upload folder, as a launched app does
    # (gradio.processing_utils._check_allowed).
    blocks.has_launched = True
    if login:
        gradio_app.add_middleware(LoginGate, gradio_app=gradio_app)
    return gradio_app


@asynccontextmanager
async def gradio_lifespan(gradio_app: FastAPI) -> AsyncIterator[None]:
    """Gradio's start-up and shutdown, as ``gr.mount_gradio_app``'s lifespan wrapper runs them (its queue, its
    file cache cleaner)."""
    async with gradio_app.router.lifespan_context(gradio_app):
        blocks = gradio_app.get_blocks()
        blocks.run_startup_events()
        await blocks.run_extra_startup_events()
        yield
