"""Multipart parsing that treats a file part without a file name as an upload.

Some clients (httpx among them) leave the ``filename`` parameter out of a part's ``Content-Disposition`` when the
file name is empty. Starlette then parses the part as a text field: FastAPI answered "Expected UploadFile, received:
<class 'str'>", and parts over 1 MB were refused as oversized fields. :class:`UploadRoute` (FastAPI's documented
extension point, ``APIRouter(route_class=...)``) parses the parts named like a ``File()`` parameter of the route as
files whatever their header says, with an empty file name.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi import params as fastapi_params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette._utils import AwaitableOrContextManager, AwaitableOrContextManagerWrapper
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser


def file_fields(dependant: Dependant) -> frozenset[str]:
    """Names of the form fields that a route (with its dependencies) declares as ``File()``."""
    names = {f.alias for f in dependant.body_params if isinstance(f.field_info, fastapi_params.File)}
    for sub in dependant.dependencies:
        names |= file_fields(sub)
    return frozenset(names)


class _FilePartsParser(MultiPartParser):
    """Starlette's parser, with a part named in ``file_fields`` always parsed as a file."""

    def __init__(self, *args: Any, file_fields: frozenset[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._file_fields = file_fields

    def on_headers_finished(self) -> None:
        disposition = self._current_part.content_disposition
        if disposition is not None:
            _, options = parse_options_header(disposition)
            name = options.get(b"name", b"").decode("latin-1")
            if b"filename" not in options and name in self._file_fields:
                self._current_part.content_disposition = disposition + b'; filename=""'
        super().on_headers_finished()


class _UploadRequest(Request):
    file_fields: frozenset[str] = frozenset()

    def form(
        self, *, max_files: int | float = 1000, max_fields: int | float = 1000, max_part_size: int = 1024 * 1024
    ) -> AwaitableOrContextManager[FormData]:
        content_type, _ = parse_options_header(self.headers.get("Content-Type", ""))
        if content_type != b"multipart/form-data" or not self.file_fields or self._form is not None:
            return super().form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
        return AwaitableOrContextManagerWrapper(self._parse(max_files, max_fields, max_part_size))

    async def _parse(self, max_files: int | float, max_fields: int | float, max_part_size: int) -> FormData:
        try:
            async with aclosing(self.stream()) as stream:
                parser = _FilePartsParser(
                    self.headers,
                    stream,
                    max_files=max_files,
                    max_fields=max_fields,
                    max_part_size=max_part_size,
                    file_fields=self.file_fields,
                )
                self._form = await parser.parse()
        except MultiPartException as exc:  # as Starlette's own form parsing answers it
            raise HTTPException(status_code=400, detail=exc.message) from exc
        return self._form


class UploadRoute(APIRoute):
    """An ``APIRoute`` whose ``File()`` parameters accept parts without a file name (``route_class=UploadRoute``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        fields = file_fields(self.dependant)
        if not fields:
            return handler

        async def upload_handler(request: Request) -> Response:
            upload_request = _UploadRequest(request.scope, request.receive)
            upload_request.file_fields = fields
            return await handler(upload_request)

        return upload_handler
