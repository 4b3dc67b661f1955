"""Who may call the API: API keys, the secure default on non-loopback hosts, CORS and ``nosniff``.

The rules, all owned here:

- With ``API_KEY`` set (one key, or several separated by commas so keys can be rotated), every write needs
  ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; otherwise ``401`` with ``WWW-Authenticate: Bearer``.
  Writes are the routes of :data:`write_router` in ``app/api/routes.py``, whose router-level dependency
  (:func:`require_write`) a new write route cannot forget.
- ``API_KEY_READS=true`` also protects every other endpoint (``/docs``, ``/metrics``...) except ``/health``, through
  :class:`ReadKeyMiddleware`. The Gradio UI under ``/ui/`` is guarded by Gradio's own login instead (the key is the
  password, :mod:`ui.mount`), which answers ``401`` on every route with data (app config, uploads, files, queue), so
  a browser can show the login form; its writes pass :meth:`AccessPolicy.key_is_valid` / :meth:`write_refusal`.
- Secure by default: with no key and ``HOST`` not a loopback address, writes answer ``403`` naming ``API_KEY``
  (``ALLOW_ANONYMOUS_WRITES=true`` opts out), and start-up logs one WARNING.
- Keys are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, so neither the content nor the
  length of a key leaks through timing) and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Mapping

from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.config import Settings

log = logging.getLogger(__name__)

#: Paths a client may always call, whatever API_KEY_READS says: load balancers and orchestrators probe it.
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})  # "/" only redirects
#: The Gradio UI: guarded by Gradio's login with the key as password, not by headers (see the module docstring).
UI_PREFIX = "/ui"

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="image-search"'}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (HOST, what uvicorn binds) only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; ``None`` without one."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class AccessPolicy:
    """The access rules of one app, built from its settings (``app.state.access``)."""

    def __init__(self, settings: Settings) -> None:
        self._digests = tuple(_digest(k) for k in settings.api_keys)
        self.reads_need_key = settings.api_key_reads
        self.host = settings.host
        self.anonymous_writes_refused = (
            not self._digests and not is_loopback(settings.host) and not settings.allow_anonymous_writes
        )

    @property
    def has_keys(self) -> bool:
        """Whether API_KEY holds at least one key."""
        return bool(self._digests)

    def key_is_valid(self, key: str | None) -> bool:
        """Whether ``key`` is one of the API keys, compared in constant time against every key (no early exit)."""
        if key is None or not self._digests:
            return False
        presented = _digest(key)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched

    def write_refusal(self) -> str | None:
        """Why an anonymous write is refused (the secure default on a non-loopback HOST), or ``None``."""
        if not self.anonymous_writes_refused:
            return None
        return (
            f"Writes are disabled: the server listens on {self.host}, which is not a loopback address, and no API_KEY "
            "is set. Set API_KEY (then send Authorization: Bearer <key>), or ALLOW_ANONYMOUS_WRITES=true to accept "
            "anonymous writes."
        )

    def check(self, headers: Mapping[str, str], *, write: bool) -> None:
        """Raise unless the request may go on.

        Raises:
            HTTPException: ``401`` (with ``WWW-Authenticate``) when a key is required and missing or wrong; ``403``
                for a write without any key configured on a non-loopback HOST.
        """
        if self.has_keys:
            if write or self.reads_need_key:
                key = presented_key(headers)
                if key is None:
                    raise HTTPException(
                        401,
                        "An API key is required: send Authorization: Bearer <key> or X-API-Key: <key>.",
                        headers=_CHALLENGE,
                    )
                if not self.key_is_valid(key):
                    raise HTTPException(401, "The API key is not valid.", headers=_CHALLENGE)
        elif write and (refusal := self.write_refusal()):
            raise HTTPException(403, refusal)


def require_write(request: Request) -> None:
    """FastAPI dependency of every write route (``write_router``): 401/403 unless the request may write."""
    request.app.state.access.check(request.headers, write=True)


class ReadKeyMiddleware:
    """With API_KEY_READS, answer 401 to any request without a valid key, except PUBLIC_PATHS and the Gradio UI
    (behind its own login).

    A middleware rather than a dependency so that it also covers the routes FastAPI adds itself (``/docs``,
    ``/openapi.json``) and any route added later.
    """

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and scope["method"] != "OPTIONS"  # CORS preflights carry no credentials by design
            and path not in PUBLIC_PATHS
            and path != UI_PREFIX
            and not path.startswith(UI_PREFIX + "/")
        ):
            try:
                self.policy.check(Headers(scope=scope), write=False)
            except HTTPException as exc:
                response = error_response(exc.status_code, exc.detail, headers=exc.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class NoSniffMiddleware:
    """Add ``X-Content-Type-Options: nosniff`` to every response, so browsers never guess a content type (an
    uploaded "image" that is really HTML must not run as a page)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def install_security(app: FastAPI, settings: Settings) -> AccessPolicy:
    """Apply the access rules to ``app``: ``app.state.access``, the read-key check, CORS and ``nosniff``.

    Call after the other middlewares whose responses should get CORS and ``nosniff`` headers (Starlette runs the
    middleware added last first). Logs one WARNING when anonymous writes are refused by default.
    """
    policy = AccessPolicy(settings)
    app.state.access = policy
    if policy.reads_need_key:
        app.add_middleware(ReadKeyMiddleware, policy=policy)
    if origins := settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(NoSniffMiddleware)
    if policy.anonymous_writes_refused:
        log.warning(
            "HOST=%s is not a loopback address and no API_KEY is set: writes answer 403. Set API_KEY, or "
            "ALLOW_ANONYMOUS_WRITES=true to accept anonymous writes.",
            settings.host,
        )
    return policy
