"""What every command-line client of the REST API shares: where the API is, its key, and how errors are read.

``--api`` defaults to ``$IMAGE_SEARCH_API`` (else ``http://localhost:8000``), ``--api-key`` to
``$IMAGE_SEARCH_API_KEY``; the key goes out as ``Authorization: Bearer <key>``. :func:`request` retries what is worth
retrying; indexing is idempotent (content-addressed), so repeating a request whose answer was lost is harmless.
"""

from __future__ import annotations

import argparse
import os
import time

import httpx

RETRY_STATUSES = frozenset({502, 503, 504})
"""The database or a proxy in front is briefly unavailable: worth retrying."""


def add_api_arguments(parser: argparse.ArgumentParser, *, key_help: str) -> None:
    """Add ``--api``, ``--api-key`` and ``--timeout`` (seconds per answer, default 120) to ``parser``."""
    parser.add_argument(
        "--api",
        default=os.environ.get("IMAGE_SEARCH_API", "http://localhost:8000"),
        help="base URL of the service (default: $IMAGE_SEARCH_API or http://localhost:8000)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IMAGE_SEARCH_API_KEY") or None,
        help=f"the server's API_KEY, sent as Authorization: Bearer; {key_help} (default: $IMAGE_SEARCH_API_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for each answer; the first may load the model (default: 120)",
    )


def make_client(args: argparse.Namespace, *, connections: int = 2) -> httpx.Client:
    """An ``httpx.Client`` for ``args.api`` with the key's header, ``args.timeout`` (10 s to connect) and at most
    ``connections`` connections."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(
        base_url=args.api.rstrip("/"),
        timeout=httpx.Timeout(args.timeout, connect=10.0),
        limits=httpx.Limits(max_connections=connections),
        headers=headers,
    )


def request(client: httpx.Client, method: str, url: str, retries: int = 0, **kwargs) -> httpx.Response:
    """Send a request, retrying transport errors and 502/503/504 ``retries`` times with exponential backoff
    (0.5 s doubling, at most 10 s). The last transport error is re-raised; the last response is returned whatever
    its status."""
    for attempt in range(retries + 1):
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError:
            if attempt == retries:
                raise
        else:
            if response.status_code not in RETRY_STATUSES or attempt == retries:
                return response
        time.sleep(min(0.5 * 2**attempt, 10.0))
    raise AssertionError("unreachable")


def error_detail(response: httpx.Response) -> str:
    """The ``detail`` of the API's JSON errors, or the start of whatever else came back (e.g. from a proxy)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        detail = response.text.strip()[:200] or response.reason_phrase
    return detail if isinstance(detail, str) else str(detail)
