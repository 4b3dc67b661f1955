#!/usr/bin/env python
"""Retrieval quality through the API: mAP, P@10, recall@1/5/10 and top-1, as one JSON line.

Indexes every image of the dataset (skipping what the server already has), then runs each query through
``POST /search_image`` and scores the ranking with the query itself excluded. Results are matched to dataset files
by content hash, so it does not matter under which filename they were indexed. The ground truth is either
``queries.json`` (``instance_small``: 190 queries and their relevant images) or ``labels.csv`` (``path,label``,
e.g. ``caltech101_subset``: every image is a query and the others of its label are relevant; images labelled
``BACKGROUND_Google``, a class of unrelated clutter, stay in the index but are never queries). ``--expand`` asks
for query expansion (``expand=true``: αQE with the server's ``EXPAND_N`` / ``EXPAND_ALPHA``). ``--dba`` builds the
neighbour graph after indexing (``POST /jobs/neighbours``, then ``GET /jobs/{id}`` until it completes) and checks
that it carries DBA vectors: the server must run with ``DBA=true``, which then re-ranks every search (so measure the
baseline and ``--expand`` alone on a server with ``DBA=false``).

Definitions (per query, then averaged over queries):
- AP: average precision over the ranking returned (top_k results, the query removed); relevant images missing
  from it count as not retrieved (AP@top_k).
- recall@k: |relevant in the first k| / |relevant|.
- top-1: 1 if the first result is relevant, else 0.
- P@10: |relevant in the first 10| / 10.

Usage: python bench/quality.py --api http://localhost:8000 --dataset ../shared/datasets/instance_small [--expand]
[--dba]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path

import httpx


def average_precision(ranked_relevance: list[bool], n_relevant: int) -> float:
    """AP of one ranking: mean of precision@i at each relevant position i, divided by all relevant items."""
    hits, total = 0, 0.0
    for i, rel in enumerate(ranked_relevance, start=1):
        if rel:
            hits += 1
            total += hits / i
    return total / n_relevant if n_relevant else 0.0


#: caltech101's clutter class: not an object category, so never a query (its images stay in the index).
BACKGROUND_LABEL = "BACKGROUND_Google"


def ground_truth(root: Path) -> dict[str, list[str]]:
    """``{query path: [relevant paths]}`` (paths relative to ``root``) from ``queries.json`` or ``labels.csv``."""
    if (root / "queries.json").is_file():
        return json.loads((root / "queries.json").read_text())
    with (root / "labels.csv").open(newline="") as f:
        labels = {row["path"]: row["label"] for row in csv.DictReader(f)}
    by_label: dict[str, list[str]] = {}
    for path, label in labels.items():
        by_label.setdefault(label, []).append(path)
    return {
        path: [other for other in by_label[label] if other != path]
        for path, label in labels.items()
        if label != BACKGROUND_LABEL
    }


def build_graph(client: httpx.Client, poll_s: float = 1.0, timeout_s: float = 3600) -> dict:
    """Start the neighbour-graph job (``POST /jobs/neighbours``) and wait until it completes; returns the job.

    Raises ``RuntimeError`` when it fails or does not finish within ``timeout_s``, and when the server is not
    running with ``DBA=true`` (the job then builds no DBA vectors).
    """
    job = client.post("/jobs/neighbours").raise_for_status().json()
    deadline = time.monotonic() + timeout_s
    while job["state"] != "completed":
        if job["state"] in ("failed", "interrupted") or time.monotonic() > deadline:
            raise RuntimeError(f"the neighbour-graph job did not complete: {job}")
        time.sleep(poll_s)
        job = client.get(f"/jobs/{job['id']}").raise_for_status().json()
    if not job["dba"]:
        raise RuntimeError("the graph has no DBA vectors: start the server with DBA=true")
    return job


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://localhost:8000")
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/instance_small"))
    parser.add_argument("--top-k", type=int, default=100, help="results per query (the server's MAX_TOP_K at most)")
    parser.add_argument("--expand", action="store_true", help="query expansion (expand=true)")
    parser.add_argument(
        "--dba", action="store_true", help="build the neighbour graph first (the server must run with DBA=true)"
    )
    args = parser.parse_args()

    root = args.dataset.resolve()
    queries = ground_truth(root)
    files = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    rel_of = {p: p.relative_to(root).as_posix() for p in files}
    paths_by_id: dict[str, set[str]] = {}
    id_of: dict[str, str] = {}
    for p in files:
        image_id = hashlib.sha256(p.read_bytes()).hexdigest()
        id_of[rel_of[p]] = image_id
        paths_by_id.setdefault(image_id, set()).add(rel_of[p])

    with httpx.Client(base_url=args.api, timeout=120) as client:
        existing: set[str] = set()
        all_ids = sorted(paths_by_id)
        for start in range(0, len(all_ids), 1000):  # POST /images/exists takes at most 1000 ids
            r = client.post("/images/exists", json={"ids": all_ids[start : start + 1000]}).raise_for_status()
            existing.update(r.json()["existing"])
        t0 = time.perf_counter()
        failed = []
        for p in files:
            if id_of[rel_of[p]] in existing:
                continue
            r = client.post("/index_image", files={"file": (p.name, p.read_bytes())}, data={"filename": rel_of[p]})
            if r.status_code >= 400:
                failed.append((rel_of[p], r.status_code, r.json().get("detail")))
            existing.add(id_of[rel_of[p]])
        index_s = time.perf_counter() - t0
        graph_s = None
        if args.dba:
            t0 = time.perf_counter()
            build_graph(client)
            graph_s = round(time.perf_counter() - t0, 1)

        aps, top1, p10, recall = [], [], [], {1: [], 5: [], 10: []}
        params = {"expand": "true"} if args.expand else {}
        t0 = time.perf_counter()
        for query, relevant in queries.items():
            data = (root / query).read_bytes()
            r = client.post(
                "/search_image",
                files={"file": (Path(query).name, data)},
                data={"top_k": str(args.top_k)},
                params=params,
            )
            r.raise_for_status()
            ranked = [hit["id"] for hit in r.json()["results"] if hit["id"] != id_of[query]]
            relevant_ids = {id_of[rel] for rel in relevant} - {id_of[query]}
            flags = [i in relevant_ids for i in ranked]
            aps.append(average_precision(flags, len(relevant_ids)))
            top1.append(1.0 if flags[:1] == [True] else 0.0)
            p10.append(sum(flags[:10]) / 10)
            for k in recall:
                recall[k].append(sum(flags[:k]) / len(relevant_ids))
        search_s = time.perf_counter() - t0
        stats = client.get("/stats").json()

    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    result = {
        "benchmark": "quality",
        "dataset": root.name,
        "model": stats["model"],
        "backend": stats["backend"],
        "n_images": len(files),
        "n_queries": len(queries),
        "expand": args.expand,
        "dba": args.dba,
        "mAP": mean(aps),
        "p_at_10": mean(p10),
        "recall_at_1": mean(recall[1]),
        "recall_at_5": mean(recall[5]),
        "recall_at_10": mean(recall[10]),
        "top1": mean(top1),
        "index_failures": len(failed),
        "index_s": round(index_s, 1),
        "graph_s": graph_s,
        "search_s": round(search_s, 1),
    }
    for f in failed:
        print(f"index failure: {f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
