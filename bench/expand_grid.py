#!/usr/bin/env python
"""Choose ``EXPAND_N`` / ``EXPAND_ALPHA``: αQE over a grid, exact search, on the vectors a service already stores.

Reads every stored vector once (``VectorDBHandler.scan``, with the service's settings: ``DATA_DIR`` /
``DATABASE_URL``, ``VECTOR_DB``...), matches them to the dataset's files by content hash, and for each ``(n, α)``
ranks the collection by exact cosine similarity to the αQE query built exactly as the service builds it
(:func:`app.search.expansion.alpha_qe`, the query image never its own neighbour). Prints one JSON line per grid
point with mAP (AP over the first ``--top-k``, as ``bench/quality.py``) and P@10; ``n = 0`` is the plain search.
Exact search isolates the method from HNSW's approximation; confirm the chosen point through the API with
``bench/quality.py --expand``.

Usage: DATA_DIR=... python bench/expand_grid.py --dataset ../shared/datasets/caltech101_subset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.search.expansion import alpha_qe  # noqa: E402
from app.vectordb import create_handler  # noqa: E402
from bench.quality import average_precision, ground_truth  # noqa: E402


def load_vectors() -> tuple[list[str], np.ndarray]:
    """Ids and ``(N, D)`` float32 vectors of the collection the settings point at (the environment's)."""
    db = create_handler(Settings())
    try:
        info = db.collection_info()
        db.ensure_collection(info.model_id, info.dim)
        ids, vectors = [], []
        for batch in db.scan():
            ids += [r.id for r in batch]
            vectors += [r.vector for r in batch]
    finally:
        db.close()
    return ids, np.stack(vectors).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--n", default="0,1,2,3,5,7,10,15", help="comma-separated neighbour counts")
    parser.add_argument("--alpha", default="0,1,2,3,5,8", help="comma-separated exponents")
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args()

    root = args.dataset.resolve()
    queries = ground_truth(root)
    id_of = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}
    ids, x = load_vectors()
    row = {image_id: i for i, image_id in enumerate(ids)}
    qrows = np.array([row[id_of[q]] for q in queries])
    relevant = [{row[id_of[r]] for r in rel} - {row[id_of[q]]} for q, rel in queries.items()]
    sims = x[qrows] @ x.T  # (Q, N) exact cosine similarities
    sims[np.arange(len(qrows)), qrows] = -np.inf  # the query is never its own neighbour
    order = np.argsort(-sims, axis=1)
    for n in [int(v) for v in args.n.split(",")]:
        for alpha in [float(v) for v in args.alpha.split(",")] if n else [0.0]:
            aps, p10 = [], []
            expanded = np.stack(
                [alpha_qe(x[q], x[order[qi, :n]], sims[qi, order[qi, :n]], alpha) for qi, q in enumerate(qrows)]
            )
            s = expanded @ x.T
            s[np.arange(len(qrows)), qrows] = -np.inf  # results leave the query out, as the service's exclude_self
            ranking = np.argsort(-s, axis=1)[:, : args.top_k]
            for qi in range(len(qrows)):
                flags = [int(i) in relevant[qi] for i in ranking[qi]]
                aps.append(average_precision(flags, len(relevant[qi])))
                p10.append(sum(flags[:10]) / 10)
            line = {"dataset": root.name, "n": n, "alpha": alpha, "mAP": round(float(np.mean(aps)), 4)}
            line["p_at_10"] = round(float(np.mean(p10)), 4)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
