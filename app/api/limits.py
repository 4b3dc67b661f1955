"""Request body limits that hold while the body streams, also for chunked uploads without a ``Content-Length``.

One owner for the upload-size rule at the HTTP layer: ``POST /index_images`` and the web UI's upload route (the
files chosen in its Add tab arrive in one request) may carry ``MAX_BATCH_MB``, every other request
``MAX_UPLOAD_MB``, each plus :data:`MULTIPART_SLACK_BYTES` for the multipart framing. The service still holds each
image to ``MAX_UPLOAD_MB`` on its own: a file over it is refused with the reason, the others of the batch go on.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.api.site import UI_PATH
from app.config import Settings

#: Allowance over the image limit for multipart boundaries, part headers and form fields, in bytes.
MULTIPART_SLACK_BYTES = 1_000_000

#: The routes whose whole body may be MAX_BATCH_MB instead of MAX_UPLOAD_MB: the REST batch, and Gradio's upload
#: route under the UI's mount (``/ui/gradio_api/upload``), where a browser sends every file of one choice at once.
BATCH_PATH = "/index_images"
UI_UPLOAD_PATH = f"{UI_PATH}/gradio_api/upload"


def body_limit(settings: Settings, path: str) -> tuple[int, str]:
    """Most body bytes a request to ``path`` may send, and how to name that limit in an error message."""
    if path in (BATCH_PATH, UI_UPLOAD_PATH):
        return settings.max_batch_bytes + MULTIPART_SLACK_BYTES, f"{settings.max_batch_mb:g} MB (MAX_BATCH_MB)"
    return settings.max_upload_bytes + MULTIPART_SLACK_BYTES, f"{settings.max_upload_mb:g} MB (MAX_UPLOAD_MB)"


class BodyLimitMiddleware:
    """Answer ``413`` as soon as a request body is known to be over its limit, and stop reading it.

    A pure ASGI middleware that counts the bytes of ``http.request`` messages: a declared ``Content-Length`` over
    the limit is refused before any byte is read; a body that streams past the limit (chunked, or lying about its
    length) is cut off there: the 413 is sent, the application then sees the client as disconnected, and anything
    it tries to answer after that is dropped. So at most the limit plus one chunk is ever read.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = body_limit(self.settings, scope["path"])
        # Connection: close makes uvicorn drop the connection after the answer instead of draining the rest of the
        # body to reuse it, so the client stops sending too.
        too_large = error_response(413, f"The upload is over the limit of {what}.", headers={"Connection": "close"})
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return

        received = 0
        cut_off = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, cut_off
            if cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut_off = True
                    if not response_started:
                        await too_large(scope, receive, send)
                    # The application stops reading as if the client had gone (Starlette raises ClientDisconnect).
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if cut_off:
                return  # the 413 already answered this request
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Add :class:`BodyLimitMiddleware` to ``app``."""
    app.add_middleware(BodyLimitMiddleware, settings=settings)
