"""Search parameters that a client may send in the query string or in the body (form field or JSON member).

Clients were written against both conventions (``POST /search_image?top_k=20`` and ``-F top_k=20``), so every
search parameter is read from both; the same value twice is fine, two different values are a ``422``.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Form, HTTPException, Query

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
