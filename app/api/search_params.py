"""The search options every search endpoint takes beside ``top_k``: ``offset``, ``min_score``, ``exclude_self``,
``expand`` (meaning: :class:`app.search.paging.SearchOptions`).

Each may come in the query string (every endpoint), in the multipart form (``POST /search_image``) or in the JSON
body (``POST /search_text``, ``/search_vector``, ``/search``); the same value twice is fine, two different values
are a ``422``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated

from fastapi import Depends, Form, Query
from pydantic import BaseModel, Field, Strict, StrictBool, StrictInt

from app.api.params import one_value
from app.search.paging import MAX_OFFSET, SearchOptions

_OFFSET = f"Results to skip before this page (0-{MAX_OFFSET}); ranks continue from offset + 1."
_MIN_SCORE = "Leave out results whose cosine similarity to the query is below this (-1 to 1)."
_EXCLUDE_SELF = "Leave the query image out of the results when it is indexed (default true)."
_EXPAND = "Query expansion (αQE with EXPAND_N neighbours, weights similarity^EXPAND_ALPHA); default false."


@dataclass(frozen=True, slots=True)
class SearchParams:
    """The options as one request gave them; ``None`` where it did not."""

    offset: int | None = None
    min_score: float | None = None
    exclude_self: bool | None = None
    expand: bool | None = None

    def merged(self, other: SearchParams | SearchOptionsBody | None) -> SearchParams:
        """These values completed by ``other``'s (the body's); raises ``HTTPException`` ``422`` for a parameter
        given twice with different values (:func:`app.api.params.one_value`)."""
        if other is None:
            return self
        values = {f.name: one_value(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        return SearchParams(**values)

    def options(self, body: SearchOptionsBody | None = None) -> SearchOptions:
        """The :class:`SearchOptions` these values (and the body's) ask for, defaults where neither gave one."""
        p = self.merged(body)
        defaults = SearchOptions()
        return SearchOptions(
            offset=defaults.offset if p.offset is None else p.offset,
            min_score=p.min_score,
            exclude_self=defaults.exclude_self if p.exclude_self is None else p.exclude_self,
            expand=defaults.expand if p.expand is None else p.expand,
        )


class SearchOptionsBody(BaseModel):
    """The same options as JSON members of a search request body."""

    # Strict, as top_k: JSON numbers and booleans only ("5", 1.0 or "true" are refused rather than converted).
    offset: StrictInt | None = Field(None, ge=0, le=MAX_OFFSET, description=_OFFSET)
    min_score: Annotated[float, Strict()] | None = Field(None, ge=-1, le=1, description=_MIN_SCORE)
    exclude_self: StrictBool | None = Field(None, description=_EXCLUDE_SELF)
    expand: StrictBool | None = Field(None, description=_EXPAND)


def search_params_query(
    offset: Annotated[int | None, Query(ge=0, le=MAX_OFFSET, description=_OFFSET)] = None,
    min_score: Annotated[float | None, Query(ge=-1, le=1, description=_MIN_SCORE)] = None,
    exclude_self: Annotated[bool | None, Query(description=_EXCLUDE_SELF)] = None,
    expand: Annotated[bool | None, Query(description=_EXPAND)] = None,
) -> SearchParams:
    """FastAPI dependency: the options from the query string."""
    return SearchParams(offset, min_score, exclude_self, expand)


def search_params_form(
    in_query: Annotated[SearchParams, Depends(search_params_query)],
    offset: Annotated[int | None, Form(alias="offset", ge=0, le=MAX_OFFSET, description=_OFFSET)] = None,
    min_score: Annotated[float | None, Form(alias="min_score", ge=-1, le=1, description=_MIN_SCORE)] = None,
    exclude_self: Annotated[bool | None, Form(alias="exclude_self", description=_EXCLUDE_SELF)] = None,
    expand: Annotated[bool | None, Form(alias="expand", description=_EXPAND)] = None,
) -> SearchParams:
    """FastAPI dependency of the multipart search endpoint: the options from the query string or the form."""
    return in_query.merged(SearchParams(offset, min_score, exclude_self, expand))


#: The options from the query string (every search endpoint; JSON endpoints add their body's with ``.options(body)``).
SearchParamsQuery = Annotated[SearchParams, Depends(search_params_query)]
#: The options from the query string or the multipart form.
SearchParamsForm = Annotated[SearchParams, Depends(search_params_form)]
