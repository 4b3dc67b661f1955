#!/usr/bin/env python
"""Load test of a running server: N concurrent clients, a search-only phase, then a mixed search/index phase.

Phase ``search``: every client sends ``POST /search_image`` back to back for ``--search-seconds`` (default 60).
Phase ``mixed``: each request is a search with probability 0.7 and a ``POST /index_image`` of a photo not yet sent
otherwise, for ``--mixed-seconds`` (default 60); writes carry the API key (``--api-key``, default
``$IMAGE_SEARCH_API_KEY``). Query and index images are real photos from ``caltech101_subset`` (2,020 JPEGs), split
into disjoint pools; query images cycle, so repeated ones come from the server's query cache as they would in use.

Prints one JSON line: per phase its duration, requests/s and, per kind, count, errors and p50/p95/p99 latency (ms);
the total error count (any transport error or status other than 200/201); and, with ``--pid``, the server process'
RSS (MB) before and after. The images it indexed are deleted again at the end unless ``--keep``.

Usage: python bench/load.py --api http://localhost:8000 --api-key KEY [--clients 16] [--pid SERVER_PID]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101_subset"
SEARCH_SHARE = 0.7


def rss_mb(pid: int | None) -> float | None:
    """Resident set size of process ``pid`` in MB (10^6 bytes) from /proc, or None without a pid."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return None


def percentiles(samples_ms: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms (inclusive quantiles); None for fewer than two samples."""
    if len(samples_ms) < 2:
        value = round(samples_ms[0], 1) if samples_ms else None
        return {"p50_ms": value, "p95_ms": value, "p99_ms": value}
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1), "p99_ms": round(q[98], 1)}


@dataclass
class Phase:
    """Latencies (ms) and error counts by request kind for one phase."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {"search": [], "index": []})
    errors: dict[str, int] = field(default_factory=lambda: {"search": 0, "index": 0})
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        total = sum(len(v) for v in self.latencies.values())
        out: dict = {"seconds": round(self.seconds, 1), "requests": total, "rps": round(total / self.seconds, 1)}
        for kind, samples in self.latencies.items():
            if samples or self.errors[kind]:
                out[kind] = {"n": len(samples), "errors": self.errors[kind], **percentiles(samples)}
        if self.error_samples:
            out["error_samples"] = self.error_samples[:5]
        return out


class Load:
    def __init__(self, client: httpx.AsyncClient, queries: list[Path], to_index: list[Path], top_k: int) -> None:
        self.client = client
        self.queries = [(p.name, p.read_bytes()) for p in queries]
        self.to_index = list(to_index)
        self.top_k = top_k
        self.indexed_ids: list[str] = []
        self._next_query = 0

    def _query(self) -> tuple[str, bytes]:
        item = self.queries[self._next_query % len(self.queries)]
        self._next_query += 1
        return item

    async def _request(self, phase: Phase, kind: str) -> None:
        if kind == "index" and self.to_index:
            path = self.to_index.pop()
            name, data, url = path.name, path.read_bytes(), "/index_image"
        else:
            kind = "search"
            (name, data), url = self._query(), "/search_image"
        start = time.perf_counter()
        try:
            params = {"top_k": self.top_k} if kind == "search" else None
            r = await self.client.post(url, files={"file": (name, data)}, params=params)
            ok = r.status_code in (200, 201)
            reason = f"{kind} {r.status_code} {r.text[:120]}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"{kind} {type(exc).__name__}: {exc}"
        elapsed_ms = (time.perf_counter() - start) * 1000
        if ok:
            phase.latencies[kind].append(elapsed_ms)
            if kind == "index" and r.json()["status"] == "indexed":
                self.indexed_ids.append(r.json()["id"])
        else:
            phase.errors[kind] += 1
            phase.error_samples.append(reason)

    async def run_phase(self, clients: int, seconds: float, search_share: float, rng: random.Random) -> Phase:
        phase = Phase()
        deadline = time.monotonic() + seconds

        async def one_client() -> None:
            while time.monotonic() < deadline:
                kind = "search" if rng.random() < search_share else "index"
                await self._request(phase, kind)

        start = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        phase.seconds = time.monotonic() - start
        return phase


async def main_async(args: argparse.Namespace) -> dict:
    files = sorted((args.dataset / "images").rglob("*.jpg"))
    rng = random.Random(args.seed)
    rng.shuffle(files)
    queries, to_index = files[: args.queries], files[args.queries :]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=args.api, headers=headers, timeout=120, limits=limits) as client:
        (await client.get("/health")).raise_for_status()
        load = Load(client, queries, to_index, args.top_k)
        rss_before = rss_mb(args.pid)
        search = await load.run_phase(args.clients, args.search_seconds, 1.0, rng)
        mixed = await load.run_phase(args.clients, args.mixed_seconds, SEARCH_SHARE, rng)
        rss_after = rss_mb(args.pid)
        if not args.keep:
            for image_id in load.indexed_ids:
                await client.delete(f"/image/{image_id}")
    errors = sum(search.errors.values()) + sum(mixed.errors.values())
    return {
        "bench": "load",
        "api": args.api,
        "clients": args.clients,
        "top_k": args.top_k,
        "search": search.summary(),
        "mixed": mixed.summary(),
        "errors": errors,
        "indexed": len(load.indexed_ids),
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default=os.environ.get("IMAGE_SEARCH_API", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("IMAGE_SEARCH_API_KEY") or None)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--search-seconds", type=float, default=60.0)
    parser.add_argument("--mixed-seconds", type=float, default=60.0)
    parser.add_argument("--queries", type=int, default=200, help="distinct query images (default: 200)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--pid", type=int, default=None, help="server process id, for its RSS before and after")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="leave the images it indexed in the collection")
    args = parser.parse_args()
    if args.clients < 1 or args.search_seconds <= 0 or args.mixed_seconds <= 0 or args.queries < 1:
        parser.error("--clients, --queries, --search-seconds and --mixed-seconds must be positive")
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
