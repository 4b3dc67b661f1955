"""List groups of near-duplicate images through the running service's REST API (``GET /duplicates``).

    python scripts/find_duplicates.py --build                 # build the neighbour graph first, with progress
    python scripts/find_duplicates.py --threshold 0.95 --csv duplicates.csv
    group  size  score          id            filename
        1     3  0.9612-0.9901  3f1a9c0b2d4e  holiday/IMG_0042.jpg
                                9d2e01a7c3b5  export/IMG_0042.webp

Groups are connected components of the image pairs whose cosine similarity is at least ``--threshold`` (default: the
server's ``DUPLICATE_THRESHOLD``) in the neighbour graph the server built last; ``--build`` starts that job
(``POST /jobs/neighbours``, which needs the API key when the server sets one) and waits for it. ``--csv FILE`` writes
one row per image (group, size, id, filename, min_score, max_score), ``--json FILE`` the groups as the API returns
them; ``-`` is standard output. Exit status: 0 on success, 1 when the server reports an error (e.g. no graph built
yet), 2 for usage errors or an unreachable API.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import TextIO

import httpx

from app.cli.client import add_api_arguments, error_detail, make_client, request

SHORT_ID = 12
PAGE = 1000  # groups per GET /duplicates (the server's most)


class ApiError(Exception):
    """The server answered with an error; the message says what it said."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="List groups of near-duplicate images from the service's neighbour graph.",
        epilog="Exit status: 0 ok, 1 the server reported an error, 2 usage error or API unreachable.",
    )
    parser.add_argument("--threshold", type=float, default=None, help="cosine similarity (default: the server's)")
    parser.add_argument("--build", action="store_true", help="build the neighbour graph first and wait for it")
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE", help="write the groups as CSV ('-': stdout)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write JSON ('-': stdout)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks with --build")
    add_api_arguments(parser, key_help="needed for --build when the server sets API_KEY")
    args = parser.parse_args(argv)
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        parser.error("--threshold is a cosine similarity in [-1, 1]")
    return args


def _check(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise ApiError(f"{response.status_code} {error_detail(response)}")
    return response.json()


def build(client: httpx.Client, poll_s: float, out: TextIO = sys.stderr) -> dict:
    """Start (or join) the neighbour-graph job and wait until it completes, printing progress to ``out``.

    Returns the completed job; raises :class:`ApiError` when the server refuses or the job fails.
    """
    job = _check(request(client, "POST", "/jobs/neighbours", retries=3))
    last = None
    while job["state"] != "completed":
        if job["state"] == "failed":
            raise ApiError(f"the neighbour-graph job {job['id']} failed: {job['error']}")
        line = f"job {job['id']}: {job['state']}, {job['phase']} {job['done']}/{job['total']}"
        if line != last:
            print(line, file=out, flush=True)
            last = line
        time.sleep(poll_s)
        job = _check(request(client, "GET", f"/jobs/{job['id']}", retries=3))
    print(f"job {job['id']}: completed, {job['done']} images", file=out, flush=True)
    return job


def fetch_all(client: httpx.Client, threshold: float | None) -> dict:
    """Every group (paging through ``GET /duplicates``), as one response: ``groups``, ``threshold``,
    ``graph_built_at``, ``total``."""
    params: dict[str, str] = {} if threshold is None else {"threshold": str(threshold)}
    body = _check(request(client, "GET", "/duplicates", retries=3, params={**params, "limit": str(PAGE)}))
    while len(body["groups"]) < body["total"]:
        more = {**params, "offset": str(len(body["groups"])), "limit": str(PAGE)}
        page = _check(request(client, "GET", "/duplicates", retries=3, params=more))
        if not page["groups"]:
            break  # the graph changed under us: keep what we have
        body["groups"] += page["groups"]
    return body


def format_table(groups: list[dict]) -> str:
    """Plain-text table: group number, size, score range, then one short id and filename per line."""
    lines = [f"{'group':>5}  {'size':>4}  {'score':<13}  {'id':<{SHORT_ID}}  filename"]
    for n, g in enumerate(groups, 1):
        scores = f"{g['min_score']:.4f}-{g['max_score']:.4f}"
        for i, (image_id, name) in enumerate(zip(g["ids"], g["filenames"], strict=True)):
            head = f"{n:>5}  {len(g['ids']):>4}  {scores:<13}" if i == 0 else " " * 26
            lines.append(f"{head}  {image_id[:SHORT_ID]:<{SHORT_ID}}  {name}")
    return "\n".join(lines)


def write_csv(groups: list[dict], out: TextIO) -> None:
    """One row per image: group (1-based), size, id, filename, min_score, max_score."""
    writer = csv.writer(out)
    writer.writerow(["group", "size", "id", "filename", "min_score", "max_score"])
    for n, g in enumerate(groups, 1):
        for image_id, name in zip(g["ids"], g["filenames"], strict=True):
            writer.writerow([n, len(g["ids"]), image_id, name, g["min_score"], g["max_score"]])


def _open(path: Path):
    if str(path) == "-":
        return _Stdout()
    return path.open("w", newline="", encoding="utf-8")


class _Stdout:
    def __enter__(self) -> TextIO:
        return sys.stdout

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    api = args.api.rstrip("/")
    try:
        with make_client(args) as client:
            if args.build:
                build(client, args.poll)
            body = fetch_all(client, args.threshold)
    except httpx.TransportError as exc:
        print(f"error: cannot reach the API at {api} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    except ApiError as exc:
        hint = " (run with --build to build the neighbour graph)" if str(exc).startswith("409") else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    groups = body["groups"]
    try:
        if args.csv is not None:
            with _open(args.csv) as f:
                write_csv(groups, f)
        if args.json is not None:
            with _open(args.json) as f:
                json.dump(body, f, indent=2)
                f.write("\n")
    except OSError as exc:
        print(f"error: cannot write: {exc}", file=sys.stderr)
        return 2
    if args.csv is None and args.json is None:
        if groups:
            print(format_table(groups))
        print(
            f"{len(groups)} groups of near-duplicates at threshold {body['threshold']} "
            f"(graph built {body['graph_built_at']})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
