"""The search options every search endpoint takes beside ``top_k``: ``offset``, ``min_score``, ``exclude_self``,
``expand`` (meaning: :class:`app.search.paging.SearchOptions`) and the filters ``path_prefix``, ``formats``,
``indexed_after``/``indexed_before``, ``taken_after``/``taken_before``, ``min_width``/``min_height`` (meaning:
:class:`app.vectordb.base.SearchFilter`).

Each may come in the query string (every endpoint), in the multipart form (``POST /search_image``) or in the JSON
body (``POST /search_text``, ``/search_vector``, ``/search``); the same value twice is fine, two different values
are a ``422``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Form, Query
from pydantic import BaseModel, Field, Strict, StrictBool, StrictInt, StrictStr

from app.api.params import one_value
from app.errors import InvalidParameterError
from app.search.paging import MAX_OFFSET, SearchOptions
from app.vectordb.base import SearchFilter

_OFFSET = f"Results to skip before this page (0-{MAX_OFFSET}); ranks continue from offset + 1."
_MIN_SCORE = "Leave out results whose cosine similarity to the query is below this (-1 to 1)."
_EXCLUDE_SELF = "Leave the query image out of the results when it is indexed (default true)."
_EXPAND = "Query expansion (αQE with EXPAND_N neighbours, weights similarity^EXPAND_ALPHA); default false."
_PATH_PREFIX = "Only images whose stored file name lies in this folder (e.g. trips/2024), sub-folders included."
_FORMATS = "Only these formats, comma-separated (JPEG,PNG,HEIF...; any letter case)."
_INDEXED_AFTER = "Only images indexed at or after this time (ISO 8601; without a zone: UTC)."
_INDEXED_BEFORE = "Only images indexed before this time (ISO 8601; without a zone: UTC)."
_TAKEN_AFTER = "Only photos taken (EXIF DateTimeOriginal) at or after this time; photos without a date are left out."
_TAKEN_BEFORE = "Only photos taken (EXIF DateTimeOriginal) before this time; photos without a date are left out."
_MIN_WIDTH = "Only images at least this many pixels wide."
_MIN_HEIGHT = "Only images at least this many pixels high."
#: The largest ``min_width``/``min_height`` accepted, pixels; the web UI's filters hold the same bound (ui.query).
MAX_MIN_SIZE = 1_000_000
_MAX_PATH = 1024  # the longest stored file name (app.imaging.prepare.MAX_FILENAME_CHARS)
_MAX_FORMATS = 200  # characters of a format list: every format name the decoder knows fits many times over


@dataclass(frozen=True, slots=True)
class SearchParams:
    """The options as one request gave them; ``None`` where it did not."""

    offset: int | None = None
    min_score: float | None = None
    exclude_self: bool | None = None
    expand: bool | None = None
    path_prefix: str | None = None
    formats: str | None = None
    indexed_after: datetime | None = None
    indexed_before: datetime | None = None
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    min_width: int | None = None
    min_height: int | None = None

    def merged(self, other: SearchParams | SearchOptionsBody | None) -> SearchParams:
        """These values completed by ``other``'s (the body's); raises ``HTTPException`` ``422`` for a parameter
        given twice with different values (:func:`app.api.params.one_value`)."""
        if other is None:
            return self
        values = {f.name: one_value(f.name, getattr(self, f.name), _value(other, f.name)) for f in fields(self)}
        return SearchParams(**values)

    def options(self, body: SearchOptionsBody | None = None) -> SearchOptions:
        """The :class:`SearchOptions` these values (and the body's) ask for, defaults where neither gave one."""
        p = self.merged(body)
        defaults = SearchOptions()
        try:
            # SearchFilter's fields are the filters, under the same names as these parameters.
            filters = SearchFilter.create(**{f.name: getattr(p, f.name) for f in fields(SearchFilter)})
        except ValueError as exc:
            raise InvalidParameterError(f"Invalid filter: {exc}.") from None
        return SearchOptions(
            offset=defaults.offset if p.offset is None else p.offset,
            min_score=p.min_score,
            exclude_self=defaults.exclude_self if p.exclude_self is None else p.exclude_self,
            expand=defaults.expand if p.expand is None else p.expand,
            filters=None if filters.empty else filters,
        )


def _value(other: SearchParams | SearchOptionsBody, name: str):
    # The JSON body may list formats as an array; compared and parsed as the query string's comma-separated form.
    value = getattr(other, name)
    return ",".join(value) if isinstance(value, list) else value


class SearchOptionsBody(BaseModel):
    """The same options as JSON members of a search request body."""

    # Strict, as top_k: JSON numbers and booleans only ("5", 1.0 or "true" are refused rather than converted).
    offset: StrictInt | None = Field(None, ge=0, le=MAX_OFFSET, description=_OFFSET)
    min_score: Annotated[float, Strict()] | None = Field(None, ge=-1, le=1, description=_MIN_SCORE)
    exclude_self: StrictBool | None = Field(None, description=_EXCLUDE_SELF)
    expand: StrictBool | None = Field(None, description=_EXPAND)
    path_prefix: StrictStr | None = Field(None, max_length=_MAX_PATH, description=_PATH_PREFIX)
    formats: StrictStr | list[Annotated[StrictStr, Field(max_length=32)]] | None = Field(
        None, max_length=_MAX_FORMATS, description=_FORMATS + " A JSON array works too."
    )
    indexed_after: datetime | None = Field(None, description=_INDEXED_AFTER)
    indexed_before: datetime | None = Field(None, description=_INDEXED_BEFORE)
    taken_after: datetime | None = Field(None, description=_TAKEN_AFTER)
    taken_before: datetime | None = Field(None, description=_TAKEN_BEFORE)
    min_width: StrictInt | None = Field(None, ge=0, le=MAX_MIN_SIZE, description=_MIN_WIDTH)
    min_height: StrictInt | None = Field(None, ge=0, le=MAX_MIN_SIZE, description=_MIN_HEIGHT)


def search_params_query(
    offset: Annotated[int | None, Query(ge=0, le=MAX_OFFSET, description=_OFFSET)] = None,
    min_score: Annotated[float | None, Query(ge=-1, le=1, description=_MIN_SCORE)] = None,
    exclude_self: Annotated[bool | None, Query(description=_EXCLUDE_SELF)] = None,
    expand: Annotated[bool | None, Query(description=_EXPAND)] = None,
    path_prefix: Annotated[str | None, Query(max_length=_MAX_PATH, description=_PATH_PREFIX)] = None,
    formats: Annotated[str | None, Query(max_length=_MAX_FORMATS, description=_FORMATS)] = None,
    indexed_after: Annotated[datetime | None, Query(description=_INDEXED_AFTER)] = None,
    indexed_before: Annotated[datetime | None, Query(description=_INDEXED_BEFORE)] = None,
    taken_after: Annotated[datetime | None, Query(description=_TAKEN_AFTER)] = None,
    taken_before: Annotated[datetime | None, Query(description=_TAKEN_BEFORE)] = None,
    min_width: Annotated[int | None, Query(ge=0, le=MAX_MIN_SIZE, description=_MIN_WIDTH)] = None,
    min_height: Annotated[int | None, Query(ge=0, le=MAX_MIN_SIZE, description=_MIN_HEIGHT)] = None,
) -> SearchParams:
    """FastAPI dependency: the options from the query string."""
    return SearchParams(
        offset,
        min_score,
        exclude_self,
        expand,
        path_prefix,
        formats,
        indexed_after,
        indexed_before,
        taken_after,
        taken_before,
        min_width,
        min_height,
    )


def search_params_form(
    in_query: Annotated[SearchParams, Depends(search_params_query)],
    offset: Annotated[int | None, Form(alias="offset", ge=0, le=MAX_OFFSET, description=_OFFSET)] = None,
    min_score: Annotated[float | None, Form(alias="min_score", ge=-1, le=1, description=_MIN_SCORE)] = None,
    exclude_self: Annotated[bool | None, Form(alias="exclude_self", description=_EXCLUDE_SELF)] = None,
    expand: Annotated[bool | None, Form(alias="expand", description=_EXPAND)] = None,
    path_prefix: Annotated[
        str | None, Form(alias="path_prefix", max_length=_MAX_PATH, description=_PATH_PREFIX)
    ] = None,
    formats: Annotated[str | None, Form(alias="formats", max_length=_MAX_FORMATS, description=_FORMATS)] = None,
    indexed_after: Annotated[datetime | None, Form(alias="indexed_after", description=_INDEXED_AFTER)] = None,
    indexed_before: Annotated[datetime | None, Form(alias="indexed_before", description=_INDEXED_BEFORE)] = None,
    taken_after: Annotated[datetime | None, Form(alias="taken_after", description=_TAKEN_AFTER)] = None,
    taken_before: Annotated[datetime | None, Form(alias="taken_before", description=_TAKEN_BEFORE)] = None,
    min_width: Annotated[int | None, Form(alias="min_width", ge=0, le=MAX_MIN_SIZE, description=_MIN_WIDTH)] = None,
    min_height: Annotated[int | None, Form(alias="min_height", ge=0, le=MAX_MIN_SIZE, description=_MIN_HEIGHT)] = None,
) -> SearchParams:
    """FastAPI dependency of the multipart search endpoint: the options from the query string or the form."""
    return in_query.merged(
        SearchParams(
            offset,
            min_score,
            exclude_self,
            expand,
            path_prefix,
            formats,
            indexed_after,
            indexed_before,
            taken_after,
            taken_before,
            min_width,
            min_height,
        )
    )


#: The options from the query string (every search endpoint; JSON endpoints add their body's with ``.options(body)``).
SearchParamsQuery = Annotated[SearchParams, Depends(search_params_query)]
#: The options from the query string or the multipart form.
SearchParamsForm = Annotated[SearchParams, Depends(search_params_form)]
