"""Who may call the API: API keys, the secure default on non-loopback hosts, CORS and ``nosniff``.

The rules, all owned here:

- With ``API_KEY`` set (one key, or several separated by commas so keys can be rotated), every write needs
  ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; otherwise ``401`` with ``WWW-Authenticate: Bearer``.
  Writes are the routes of :data:`write_router` in ``app/api/routes.py``, whose router-level dependency
  (:func:`require_write`) a new write route cannot forget.
- ``API_KEY_READS=true`` also protects every other endpoint (``/docs``, ``/metrics``...) except ``/health``, through
  :class:`ReadKeyMiddleware`. The Gradio UI under ``/ui/`` is guarded by Gradio's own login instead (the key is the
  password, :mod:`ui.mount`), which answers ``401`` on every route but the login page's own (``ui.mount.LoginGate``:
  app config, uploads, files, queue, heartbeat...), so a browser can show the login form; its writes pass
  :meth:`AccessPolicy.key_is_valid` / :meth:`write_refusal`.
- Secure by default: with no key and ``HOST`` not a loopback address, writes answer ``403`` naming ``API_KEY``
  (``ALLOW_ANONYMOUS_WRITES=true`` opts out), and start-up logs one WARNING.
- Host allow-list (DNS rebinding): a request whose ``Host`` is not one of :func:`allowed_hosts` (``ALLOWED_HOSTS``;
  by default the loopback names while ``HOST`` is a loopback address) answers ``400``, through Starlette's
  ``TrustedHostMiddleware``.
- Cross-origin state changes (CSRF): a ``POST``/``PUT``/``PATCH``/``DELETE`` (or a WebSocket handshake) that a browser
  sends from another origin answers ``403`` unless that origin is allowed (:class:`OriginPolicy`): same origin
  (``Origin`` equal to the request's own, allowed, host or to ``PUBLIC_URL``'s origin, or ``Sec-Fetch-Site:
  same-origin``/``none``), or listed in ``CORS_ORIGINS``. A request carrying a key header passes (a browser sends
  one cross-origin only after a CORS preflight, which only ``CORS_ORIGINS`` pass), as does one with neither
  ``Origin``, ``Referer`` nor ``Sec-Fetch-Site`` (not a browser: curl, scripts, the CLI). Without ``Origin``, the
  origin of ``Referer`` is checked in its place (a ``Referer`` that names no http(s) origin counts as ``null``).
- Keys are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, so neither the content nor the
  length of a key leaks through timing) and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
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


def allowed_hosts(settings: Settings) -> list[str]:
    """The Host names the service answers (lower case, no port): ALLOWED_HOSTS split at commas; when empty, the
    loopback names (``localhost``, ``127.0.0.1``, ``[::1]`` and HOST itself) if HOST is a loopback address, else
    ``["*"]`` (any host: a server bound to all interfaces cannot guess its public names)."""
    hosts = [h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()]
    if hosts:
        return hosts
    if not is_loopback(settings.host):
        return ["*"]
    own = settings.host.strip().lower()
    if ":" in own and not own.startswith("["):
        own = f"[{own}]"  # an IPv6 literal is bracketed in a Host header
    return list(dict.fromkeys(["localhost", "127.0.0.1", "[::1]", own]))


def image_url(request: Request, image_id: str) -> str:
    """URL of ``GET /image/{image_id}`` for a response: from ``PUBLIC_URL`` when set; else from the request's own URL
    when the Host allow-list restricts Host (so only an allowed name can appear, never an attacker's); else the
    path alone (``/image/ID``), since any Host would be copied otherwise."""
    settings: Settings = request.app.state.settings
    if settings.public_url:
        return f"{settings.public_url}{request.app.url_path_for('get_image', image_id=image_id)}"
    if allowed_hosts(settings) != ["*"]:
        return str(request.url_for("get_image", image_id=image_id))
    return str(request.app.url_path_for("get_image", image_id=image_id))


def cache_headers(request: Request, max_age_s: int, *, immutable: bool = False) -> dict[str, str]:
    """``Cache-Control`` (and ``Vary``) for an image response: ``public`` while reads need no key; ``private`` with
    ``Vary: Authorization, X-API-Key`` when API_KEY_READS is on, so no shared cache (proxy, CDN) keeps an answer
    that needed a key and hands it to a client without one. ``max_age_s`` in seconds."""
    value = f"max-age={int(max_age_s)}" + (", immutable" if immutable else "")
    if request.app.state.access.reads_need_key:
        return {"Cache-Control": f"private, {value}", "Vary": "Authorization, X-API-Key"}
    return {"Cache-Control": f"public, {value}"}


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


#: Methods that change state; a browser sends them cross-origin without a preflight as form posts.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of ``url`` in lower case, or ``None`` for ``null`` or anything that is no URL."""
    try:
        parsed = urlsplit(url.strip())
    except ValueError:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return f"{parsed.scheme}://{parsed.netloc}".lower()


class OriginPolicy:
    """Which browser origins may make state-changing requests (see the module docstring); built from the settings.

    Args:
        settings: ``CORS_ORIGINS`` (``*``: any origin) and ``PUBLIC_URL`` name the allowed origins.
    """

    def __init__(self, settings: Settings) -> None:
        origins = {o for o in (_origin_of(o) for o in settings.cors_origin_list) if o}
        if settings.public_origin:
            origins.add(settings.public_origin)
        self.any_origin = "*" in settings.cors_origin_list
        self.origins = frozenset(origins)

    def refusal(self, headers: Headers, method: str) -> str | None:
        """Why this request is refused as a cross-origin state change, or ``None`` when it may go on."""
        if presented_key(headers) is not None:
            return None  # custom headers need a CORS preflight cross-origin; the key itself is checked later
        origin = headers.get("origin")
        named_by = "origin"
        if origin is None and (referer := headers.get("referer")) is not None:
            # No Origin (an older browser, or a client that only sends Referer): the Referer's origin stands in
            # for it, checked the same way (OWASP CSRF cheat sheet, "Verifying origin with standard headers").
            origin, named_by = _origin_of(referer) or "null", "referring page"
        site = (headers.get("sec-fetch-site") or "").strip().lower()
        if origin is None and not site:
            return None  # not sent by a browser
        if site in ("same-origin", "none"):
            return None  # the service's own pages, or a request the user typed
        if origin is not None:
            own = _origin_of(origin)
            host = (headers.get("host") or "").strip().lower()
            # The Host passed the allow-list already, so an Origin naming the same host:port is this service's.
            if own is not None and (self.any_origin or own in self.origins or urlsplit(own).netloc == host):
                return None
        sender = f"the {named_by} {origin[:100]!r}" if origin is not None else f"a {site[:20]} page"
        return (
            f"Cross-origin request refused: {sender} may not send {method} requests to this service. Add the origin "
            "to CORS_ORIGINS, or send the API key in a header."
        )


class OriginMiddleware:
    """Answer ``403`` to state-changing requests (and WebSocket handshakes) from origins :class:`OriginPolicy`
    refuses."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket" or (kind == "http" and scope["method"] in UNSAFE_METHODS):
            refusal = self.policy.refusal(Headers(scope=scope), scope.get("method", "GET"))
            if refusal is not None:
                if kind == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": "cross-origin"})
                    return
                await error_response(403, refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JsonRefusals:
    """A Starlette middleware (``middleware`` built with ``options``) whose own error answers (status >= 400,
    plain text: ``TrustedHostMiddleware``'s "Invalid host header", ``CORSMiddleware``'s "Disallowed CORS origin")
    leave as JSON ``{"detail": ...}`` like every other error of the service; everything else passes unchanged.

    Args:
        app: the application inside.
        middleware: the middleware class; it is given a stand-in for ``app`` that records that the request passed.
        detail: builds the error text from the request's headers and the middleware's own text (default: its text).
        options: the middleware's keyword arguments.
    """

    _PASSED = "image_search.passed"  # scope key: the set of middlewares the request got through

    def __init__(
        self,
        app: ASGIApp,
        middleware: type,
        detail: Callable[[Headers, str], str] | None = None,
        **options: object,
    ) -> None:
        self.app = app
        self.name = middleware.__name__
        self.detail = detail
        self.inner = middleware(self._passed, **options)

    async def _passed(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault(self._PASSED, set()).add(self.name)
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def send_json(message: Message) -> None:
            nonlocal start
            if self.name in scope.get(self._PASSED, ()):
                await send(message)
            elif message["type"] == "http.response.start":
                start = message
                if start["status"] < 400:  # e.g. a preflight's 200
                    await send(message)
            elif start is not None and start["status"] < 400:
                await send(message)
            elif start is not None:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    text = body.decode("utf-8", "replace").strip() or "Refused."
                    if self.detail is not None:
                        text = self.detail(Headers(scope=scope), text)
                    await error_response(start["status"], text)(scope, receive, send)

        await self.inner(scope, receive, send_json)


def _host_refusal(headers: Headers, _: str) -> str:
    return (
        f"Host {headers.get('host', '')[:100]!r} is not served here: set ALLOWED_HOSTS to the names clients use "
        "(DNS rebinding protection)."
    )


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
    """Apply the access rules to ``app``: ``app.state.access``, the read-key check, the cross-origin check, CORS,
    the Host allow-list and ``nosniff`` (outermost first: nosniff, hosts, CORS, origins, read key).

    Call after the other middlewares whose responses should get CORS and ``nosniff`` headers (Starlette runs the
    middleware added last first). Logs one WARNING when anonymous writes are refused by default.
    """
    policy = AccessPolicy(settings)
    app.state.access = policy
    if policy.reads_need_key:
        app.add_middleware(ReadKeyMiddleware, policy=policy)
    app.add_middleware(OriginMiddleware, policy=OriginPolicy(settings))
    if origins := settings.cors_origin_list:
        app.add_middleware(
            JsonRefusals,
            middleware=CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    hosts = allowed_hosts(settings)
    if hosts != ["*"]:
        app.add_middleware(
            JsonRefusals,
            middleware=TrustedHostMiddleware,
            detail=_host_refusal,
            allowed_hosts=hosts,
            www_redirect=False,
        )
    else:
        log.warning(
            "HOST=%s is not a loopback address and ALLOWED_HOSTS is not set: any Host header is answered. Set "
            "ALLOWED_HOSTS to the names clients use (DNS rebinding protection), and PUBLIC_URL.",
            settings.host,
        )
    app.add_middleware(NoSniffMiddleware)
    if policy.anonymous_writes_refused:
        log.warning(
            "HOST=%s is not a loopback address and no API_KEY is set: writes answer 403. Set API_KEY, or "
            "ALLOW_ANONYMOUS_WRITES=true to accept anonymous writes.",
            settings.host,
        )
    return policy
