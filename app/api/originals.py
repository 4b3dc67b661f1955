"""``GET /image/{id}``: the original as a stream, from whichever store holds it, with byte ranges and validators.

- ``ETag`` is the image id in quotes (the SHA-256 of the bytes): the same on every replica and every store, and it
  never changes, so ``If-None-Match`` answers ``304`` and ``Cache-Control`` says ``immutable``;
- ``Range: bytes=a-b`` (one range: ``a-b``, ``a-`` or ``-n``) answers ``206`` with ``Content-Range``; a range
  past the end ``416``; several ranges, or a malformed header, the whole file (allowed by RFC 9110); ``If-Range``
  with another validator, the whole file;
- the body is streamed in chunks (:data:`app.storage.base.CHUNK_BYTES`), never held whole in memory; ``HEAD``
  answers the same headers without it.
"""

from __future__ import annotations

import mimetypes
import re
from email.utils import formatdate

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from app.api.security import cache_headers
from app.service import SearchService
from app.storage.base import ObjectInfo

__all__ = ["MAX_AGE_S", "original_response", "parse_range"]

#: originals are addressed by their content: a URL's bytes never change (``immutable``, a year); ``public`` or
#: ``private`` as :func:`app.api.security.cache_headers` decides (private when reads need a key)
MAX_AGE_S = 31_536_000
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """The byte range ``(start, end)`` (end exclusive) a ``Range`` header asks of a ``size``-byte file.

    ``None``: send the whole file (no header, several ranges, or a malformed one); ``"unsatisfiable"``: nothing of
    the file is in the range (answer 416).
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None  # malformed: ignored
    if start >= size:
        return "unsatisfiable"
    return start, end


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def original_response(request: Request, service: SearchService, image_id: str) -> Response:
    """The response to ``GET`` / ``HEAD /image/{image_id}``.

    Raises :class:`app.errors.ImageNotFoundError` (404) and :class:`app.errors.StorageUnavailableError` (503).
    """
    cache = cache_headers(request, MAX_AGE_S, immutable=True)
    range_header = request.headers.get("range")
    if request.method == "GET" and not range_header and not request.headers.get("if-none-match"):
        # The common case in one request to the store: the stream carries the size and name.
        stream = service.open_original(image_id)
        status, headers, media_type = _headers(stream.info, None, cache)
        return StreamingResponse(iter(stream), status_code=status, headers=headers, media_type=media_type)
    info = service.original_info(image_id)
    if _etag_matches(request.headers.get("if-none-match"), f'"{info.image_id}"'):
        return Response(status_code=304, headers=_headers(info, None, cache)[1] | {"Content-Length": "0"})
    wanted = parse_range(range_header, info.size)
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != f'"{info.image_id}"':
        wanted = None  # the client's copy is another one: send it whole
    status, headers, media_type = _headers(info, wanted, cache)
    if status == 416 or request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    start, end = (0, info.size) if wanted is None else wanted
    stream = service.open_original(image_id, start, end)
    return StreamingResponse(iter(stream), status_code=status, headers=headers, media_type=media_type)


def _headers(
    info: ObjectInfo, wanted: tuple[int, int] | None | str, cache: dict[str, str]
) -> tuple[int, dict[str, str], str]:
    """Status, headers and content type of an answer of ``wanted`` (see :func:`parse_range`) of ``info``;
    ``cache``: its ``Cache-Control`` (and ``Vary``) headers."""
    headers = {
        **cache,
        "ETag": f'"{info.image_id}"',
        "Accept-Ranges": "bytes",
        "Last-Modified": formatdate(info.mtime, usegmt=True),
    }
    media_type = mimetypes.guess_type(info.name)[0] or "application/octet-stream"
    if wanted == "unsatisfiable":
        return 416, {**headers, "Content-Range": f"bytes */{info.size}", "Content-Length": "0"}, media_type
    if wanted is None:
        return 200, {**headers, "Content-Length": str(info.size)}, media_type
    start, end = wanted
    headers.update({"Content-Length": str(end - start), "Content-Range": f"bytes {start}-{end - 1}/{info.size}"})
    return 206, headers, media_type
