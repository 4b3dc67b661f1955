"""Find indexed images through the running service's REST API: like a local image file, like a stored image
(``--id``), matching a description (``--text``, CLIP models), or a combination with terms to avoid
(``--negative-text``).

    python scripts/find_similar.py photo.jpg --api http://localhost:8000 --top-k 5
    rank    score  id            filename
       1   0.9731  3f1a9c0b2d4e  holiday/IMG_0042.jpg

One query term alone uses ``POST /search_image``, ``GET /image/{id}/similar`` or ``POST /search_text``; several
terms, or any ``--negative-text``, use ``POST /search`` (an IMAGE file then counts by its id, so it must be
indexed). ``--offset``, ``--min-score``, ``--expand`` and the filters (``--folder``, ``--formats``,
``--taken-after``/``--taken-before``, ``--indexed-after``/``--indexed-before``, ``--min-width``/``--min-height``) go
along as query parameters.
Ids are shown as their first 12 hex characters (``--json`` gives the full ids and the image URLs).
Exit status: 0 on success, 1 when the server reports an error, 2 for usage errors or an unreachable API.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import webbrowser
from pathlib import Path

import httpx

from app.cli.client import add_api_arguments, error_detail, make_client

SHORT_ID = 12  # like a short git hash: unique enough to tell results apart, short enough for a terminal


def format_table(results: list[dict]) -> str:
    """The results as a plain-text table: rank, score (4 decimals), short id, filename."""
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<{SHORT_ID}}  filename"]
    for rank, hit in enumerate(results, 1):
        rank = hit.get("rank", rank)  # the server's rank continues past --offset
        lines.append(f"{rank:>4}  {hit['score']:>7.4f}  {hit['id'][:SHORT_ID]:<{SHORT_ID}}  {hit['filename']}")
    return "\n".join(lines)


# (flag, API parameter, help): passed through unchanged; the server checks and explains bad values.
_FILTER_FLAGS = [
    ("--folder", "path_prefix", "only images stored under this folder (the relative path given at indexing)"),
    ("--formats", "formats", "only these formats, comma-separated (e.g. JPEG,HEIF)"),
    ("--taken-after", "taken_after", "only photos taken at or after this date/time (ISO 8601, EXIF date)"),
    ("--taken-before", "taken_before", "only photos taken before this date/time (ISO 8601, EXIF date)"),
    ("--indexed-after", "indexed_after", "only images indexed at or after this date/time (ISO 8601)"),
    ("--indexed-before", "indexed_before", "only images indexed before this date/time (ISO 8601)"),
    ("--min-width", "min_width", "only images at least this many pixels wide"),
    ("--min-height", "min_height", "only images at least this many pixels high"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Search the image index with an example image, a stored image, or a description.",
        epilog="Exit status: 0 ok, 1 the server reported an error, 2 usage error or API unreachable.",
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", nargs="?", help="the query image file")
    parser.add_argument("--id", action="append", default=[], help="a stored image's id (repeatable): more like it")
    parser.add_argument("--text", action="append", default=[], help="a description to match (repeatable; CLIP)")
    parser.add_argument(
        "--negative-text", action="append", default=[], help="a description to move away from (repeatable; CLIP)"
    )
    parser.add_argument("--offset", type=int, default=None, help="results to skip first (paging, 0-1000)")
    parser.add_argument("--min-score", type=float, default=None, help="leave out results below this cosine score")
    parser.add_argument("--expand", action="store_true", help="query expansion (αQE) before ranking")
    filters = parser.add_argument_group("filters (only images that pass all given filters are returned)")
    for flag, param, help_text in _FILTER_FLAGS:
        metavar = {"path_prefix": "FOLDER", "formats": "LIST"}.get(param, "PX" if param.startswith("min") else "WHEN")
        filters.add_argument(flag, dest=param, default=None, metavar=metavar, help=help_text)
    add_api_arguments(parser, key_help="needed when the server sets API_KEY_READS")
    parser.add_argument("--top-k", type=int, default=None, help="number of results (default: the server's, 5)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON response")
    parser.add_argument("--open", action="store_true", help="open each match's image URL in the web browser")
    args = parser.parse_args(argv)
    if args.image is None and not args.id and not args.text:
        parser.error("give a query: IMAGE, --id or --text")
    if args.image is not None and not args.image.is_file():
        parser.error(f"no such file: {args.image}")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def build_request(args: argparse.Namespace, image_bytes: bytes | None) -> dict:
    """The keyword arguments of ``httpx.Client.request`` (method, url path, params, files/data/json) for ``args``."""
    params = {}
    if args.offset is not None:
        params["offset"] = str(args.offset)
    if args.min_score is not None:
        params["min_score"] = str(args.min_score)
    if args.expand:
        params["expand"] = "true"
    for _, param, _ in _FILTER_FLAGS:
        if getattr(args, param) is not None:
            params[param] = getattr(args, param)
    n_terms = (image_bytes is not None) + len(args.id) + len(args.text)
    if n_terms == 1 and not args.negative_text:
        if image_bytes is not None:
            form = {} if args.top_k is None else {"top_k": str(args.top_k)}
            files = {"file": (args.image.name, image_bytes)}
            return {"method": "POST", "url": "/search_image", "params": params, "files": files, "data": form}
        if args.id:
            params.update({} if args.top_k is None else {"top_k": str(args.top_k)})
            return {"method": "GET", "url": f"/image/{args.id[0]}/similar", "params": params}
        body = {"query": args.text[0], "top_k": args.top_k}
        return {"method": "POST", "url": "/search_text", "params": params, "json": body}
    positive = [{"image_id": hashlib.sha256(image_bytes).hexdigest()}] if image_bytes is not None else []
    positive += [{"image_id": i} for i in args.id] + [{"text": t} for t in args.text]
    body = {"positive": positive, "negative": [{"text": t} for t in args.negative_text], "top_k": args.top_k}
    return {"method": "POST", "url": "/search", "params": params, "json": body}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    api = args.api.rstrip("/")
    try:
        data = None if args.image is None else args.image.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    try:
        with make_client(args) as client:
            response = client.request(**build_request(args, data))
    except httpx.TransportError as exc:
        print(f"error: cannot reach the API at {api} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(f"error: {response.status_code} {error_detail(response)}", file=sys.stderr)
        return 1
    body = response.json()
    results = body["results"]

    if args.json:
        print(json.dumps(body, indent=2))
    elif results:
        print(format_table(results))
    else:
        print("no results: the index is empty", file=sys.stderr)

    if args.open:
        for hit in results:
            # webbrowser honours $BROWSER, so a headless box or a test can choose what "open" means.
            if not webbrowser.open(hit["image_url"]):
                print(f"could not open a browser for {hit['image_url']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
