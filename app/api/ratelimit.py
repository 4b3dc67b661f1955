"""An optional per-client rate limit on the expensive routes a client may call without a key (``RATE_LIMIT``).

Searches by image, text or vector, ``/preview``, thumbnails, "more like this" and indexing each run a decode, the
model or an index search; with no key needed for reads (the default), one client could keep the server busy for
everyone. With ``RATE_LIMIT`` set (``limits``' notation, e.g. ``120/minute`` or ``10/second;600/hour``), each client
address may call those routes that often, counted together, in a moving window (``limits.MovingWindowRateLimiter``
over its in-memory storage: one process, reset on restart). Over it: ``429`` with ``Retry-After`` (seconds until the
window lets the next request through) and a JSON ``detail``. Requests with a valid API key are not counted. Off by
default.

Behind a reverse proxy every request comes from the proxy's address: run uvicorn with ``--proxy-headers`` and
``--forwarded-allow-ips`` set to the proxy (the Docker image's ``python -m app`` keeps uvicorn's defaults), or limit
at the proxy instead.
"""

from __future__ import annotations

import math
import re
import time

from fastapi import FastAPI
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.api.security import AccessPolicy, presented_key
from app.config import Settings

__all__ = ["EXPENSIVE_PATHS", "RateLimitMiddleware", "install_rate_limit"]

#: The routes counted: each decodes an upload, runs the model or searches the index.
EXPENSIVE_PATHS = re.compile(
    r"^/(search_image|search_text|search_vector|search|preview|index_image|index_images)$"
    r"|^/image/[^/]+/(thumbnail|similar)$"
)


class RateLimitMiddleware:
    """``429`` + ``Retry-After`` once a client address has called :data:`EXPENSIVE_PATHS` more than ``limits``
    allow; requests with a valid key pass uncounted.

    Args:
        app: the application inside.
        limits: the limits, all applied (e.g. per second and per hour).
        policy: the app's key rules (a valid key exempts a request).
    """

    def __init__(self, app: ASGIApp, limits: list[RateLimitItem], policy: AccessPolicy) -> None:
        self.app = app
        self.limits = limits
        self.policy = policy
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and EXPENSIVE_PATHS.match(scope.get("path", "")):
            key = presented_key(Headers(scope=scope))
            if not (key is not None and self.policy.key_is_valid(key)):
                client = (scope.get("client") or ("unknown", 0))[0]
                for item in self.limits:
                    if not self.limiter.hit(item, "expensive", client):
                        reset = self.limiter.get_window_stats(item, "expensive", client).reset_time
                        retry = max(1, math.ceil(reset - time.time()))
                        response = error_response(
                            429,
                            f"Too many requests from {client}: at most {item} for searches, previews, thumbnails "
                            f"and indexing (RATE_LIMIT). Retry in {retry} s, or send an API key.",
                            headers={"Retry-After": str(retry)},
                        )
                        await response(scope, receive, send)
                        return
        await self.app(scope, receive, send)


def install_rate_limit(app: FastAPI, settings: Settings) -> None:
    """Add :class:`RateLimitMiddleware` when ``RATE_LIMIT`` is set (validated by :class:`Settings`). Call before
    ``install_security``, so that requests refused for their Host or origin are not counted."""
    if not settings.rate_limit.strip():
        return
    app.add_middleware(RateLimitMiddleware, limits=parse_many(settings.rate_limit), policy=AccessPolicy(settings))
