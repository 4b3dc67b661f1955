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

    - ``API_KEY_READS=true``: every Gradio route (config, uploads, files, queue, heartbeat...) but the login page's
      own sits behind Gradio's login, whose password is the API key (any user name; :class:`LoginGate`).
      Otherwise the page is open and writes ask for the key in a
      key box, checked on the server (:meth:`ui.context.UiContext.may_write`).
    - Gradio's upload limit is ``MAX_UPLOAD_MB``; no server-side rendering (no Node.js; and gradio-app/gradio#11008).
    - No analytics, no update check, no fonts or scripts from outside the service (:func:`ui.assets.theme`).
    """
    _quiet_gradio()
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
        max_file_size=settings.max_upload_bytes,
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
    gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == UI_PATH)
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
