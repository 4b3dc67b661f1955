#!/usr/bin/env python
"""Latency of ``/index_image`` and ``/search_image`` through the API: p50/p95 in ms, as one JSON line.

Uses real photos from ``caltech101_subset`` that are not yet indexed, one request at a time:
- index: ``POST /index_image`` of ``--n`` new images (decode + embed + write);
- search_new: ``POST /search_image`` with ``--n`` other images that are not indexed (decode + embed + ANN search);
- search_indexed: ``POST /search_image`` with images already indexed (the stored embedding is reused: ANN only).
The images it indexed are deleted again at the end unless ``--keep``.

Usage: python bench/latency.py --api http://localhost:8000 [--n 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50 and p95 in ms (inclusive method of statistics.quantiles)."""
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://localhost:8000")
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/caltech101_subset"))
    parser.add_argument("--n", type=int, default=50, help="requests per measurement")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="leave the indexed images in the collection")
    args = parser.parse_args()

    files = sorted((args.dataset / "images").rglob("*.jpg"))
    # Spread the picks over all categories so decode sizes and content vary.
    step = max(1, len(files) // (2 * args.n))
    picks = files[::step][: 2 * args.n]
    to_index, to_query = picks[: args.n], picks[args.n :]

    timings: dict[str, list[float]] = {"index": [], "search_new": [], "search_indexed": []}
    indexed_ids: list[str] = []
    with httpx.Client(base_url=args.api, timeout=120) as client:
        client.get("/health").raise_for_status()
        for p in to_index:
            t = time.perf_counter()
            r = client.post("/index_image", files={"file": (p.name, p.read_bytes())})
            timings["index"].append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
            if r.json()["status"] == "indexed":
                indexed_ids.append(r.json()["id"])
        for name, batch in (("search_new", to_query), ("search_indexed", to_index)):
            for p in batch:
                data = p.read_bytes()
                t = time.perf_counter()
                r = client.post("/search_image", files={"file": (p.name, data)}, data={"top_k": str(args.top_k)})
                timings[name].append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
        stats = client.get("/stats").json()
        if not args.keep:
            for image_id in indexed_ids:
                client.delete(f"/image/{image_id}")

    result = {
        "benchmark": "latency",
        "model": stats["model"],
        "backend": stats["backend"],
        "collection_size": stats["count"],
        "n": args.n,
        "top_k": args.top_k,
    }
    for name, samples in timings.items():
        result.update({f"{name}_{k}": v for k, v in percentiles(samples).items()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
