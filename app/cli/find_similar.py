"""Find the indexed images most similar to a local image file, through the running service's REST API.

    python scripts/find_similar.py photo.jpg --api http://localhost:8000 --top-k 5
    rank    score  id            filename
       1   0.9731  3f1a9c0b2d4e  holiday/IMG_0042.jpg

Ids are shown as their first 12 hex characters (``--json`` gives the full ids and the image URLs).
Exit status: 0 on success, 1 when the server reports an error, 2 for usage errors or an unreachable API.
"""

from __future__ import annotations

import argparse
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
        lines.append(f"{rank:>4}  {hit['score']:>7.4f}  {hit['id'][:SHORT_ID]:<{SHORT_ID}}  {hit['filename']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Search the image index with an example image.",
        epilog="Exit status: 0 ok, 1 the server reported an error, 2 usage error or API unreachable.",
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the query image file")
    add_api_arguments(parser, key_help="needed when the server sets API_KEY_READS")
    parser.add_argument("--top-k", type=int, default=None, help="number of results (default: the server's, 5)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON response")
    parser.add_argument("--open", action="store_true", help="open each match's image URL in the web browser")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"no such file: {args.image}")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    api = args.api.rstrip("/")
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    form = {} if args.top_k is None else {"top_k": str(args.top_k)}
    try:
        with make_client(args) as client:
            response = client.post("/search_image", files={"file": (args.image.name, data)}, data=form)
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
