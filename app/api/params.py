"""Search parameters that a client may send in the query string or in the body (form field or JSON member).

Clients were written against both conventions (``POST /search_image?top_k=20`` and ``-F top_k=20``), so every
search parameter is read from both; the same value twice is fine, two different values are a ``422``.
"""

from __future__ import annotations

import types
import typing
from collections import Counter
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Form, HTTPException, Query, Request

T = TypeVar("T")

_TOP_K_DOC = "Number of results (default DEFAULT_TOP_K, at most MAX_TOP_K); query parameter or body, not both."

#: ``top_k`` as a query parameter (every search endpoint).
TopKQuery = Annotated[int | None, Query(alias="top_k", description=_TOP_K_DOC)]
#: ``top_k`` as a multipart form field.
TopKForm = Annotated[int | None, Form(alias="top_k", description=_TOP_K_DOC)]


def one_value(name: str, in_query: T | None, in_body: T | None) -> T | None:
    """The parameter's value from whichever place gave it (``None`` when neither did).

    Raises:
        HTTPException: ``422`` when both give it with different values.
    """
    if in_query is not None and in_body is not None and in_query != in_body:
        raise HTTPException(
            422,
            f"{name} is given twice with different values ({in_query!s:.20} in the query string, {in_body!s:.20} "
            "in the body): give it once.",
        )
    return in_query if in_query is not None else in_body


def top_k_from_form(top_k_query: TopKQuery = None, top_k_form: TopKForm = None) -> int | None:
    """FastAPI dependency of the multipart search endpoints: ``top_k`` from the query string or the form."""
    return one_value("top_k", top_k_query, top_k_form)


def no_repeated_query_parameters(request: Request) -> None:
    """App-wide FastAPI dependency: ``422`` for a query parameter given more than once (``?top_k=3&top_k=50``), which
    FastAPI would otherwise read as its last value without a word, unless the route declares it as a list.

    Raises:
        HTTPException: ``422`` naming the first repeated parameter.
    """
    items = request.query_params.multi_items()
    if len(items) == len(request.query_params):
        return  # no name twice: the common case costs one comparison
    counts = Counter(name for name, _ in items)
    dependant = getattr(request.scope.get("route"), "dependant", None)
    lists = {f.alias for f in _query_fields(dependant) if _is_list(f.field_info.annotation)}
    for name, n in counts.items():
        if n > 1 and name not in lists:
            raise HTTPException(422, f"The query parameter {name[:40]!r} is given {n} times: give it once.")


def _query_fields(dependant: Any) -> Iterator[Any]:
    """The query-parameter fields of a route's dependency tree (FastAPI's ``Dependant``), sub-dependencies included."""
    if dependant is None:
        return
    yield from dependant.query_params
    for sub in dependant.dependencies:
        yield from _query_fields(sub)


def _is_list(annotation: Any) -> bool:
    """Whether a parameter's type accepts several values (``list[int]``, ``list[str] | None``...)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    if origin is Annotated:
        return _is_list(typing.get_args(annotation)[0])
    return origin in (list, tuple, set, frozenset)
