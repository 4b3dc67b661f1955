#!/usr/bin/env python
"""Choose ``DBA_N`` / ``DBA_ALPHA`` / ``DBA_DEPTH``: DBA over a grid, exact search, on the vectors a service stores.

Reads every stored vector once (``VectorDBHandler.scan`` with the service's settings: ``DATA_DIR`` /
``DATABASE_URL``...), builds the exact k-nearest-neighbour graph with numpy, the DBA vectors with
:func:`app.neighbours.dba.dba_matrix` (the formula the job uses) and scores, for every query of the dataset (the query
left out of its own neighbours and results, as ``bench/quality.py`` does):

- ``base``: plain ranking by cosine to the original vectors;
- ``expand``: αQE with ``--expand-n``/``--expand-alpha`` over the original vectors (what ``expand=true`` does now);
- ``dba``: the first ``depth`` results of the plain search re-ranked by cosine to their DBA vectors;
- ``dba+expand``: the service's order: re-rank as ``dba``, build the αQE query from the first ``EXPAND_N`` re-ranked
  results' DBA vectors, search again and re-rank (Radenović et al., TPAMI 2019: αQE on a DBA'd database);
- ``dba+expand_orig``: the αQE query built from the original vectors, then re-ranked by DBA (the cheaper variant).

Prints one JSON line per grid point with P@10 and mAP (AP over the first ``--top-k``); ``depth = 0`` means every
stored image is re-ranked. Exact search isolates the method from HNSW; confirm through the API with
``bench/quality.py --dba``.

Usage: DATA_DIR=... python bench/dba_grid.py --dataset ../shared/datasets/caltech101_subset
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.neighbours.dba import dba_matrix  # noqa: E402
from app.search.expansion import alpha_qe  # noqa: E402
from bench.expand_grid import load_vectors  # noqa: E402
from bench.quality import average_precision, ground_truth  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--n", default="0,1,2,3,5,7,10", help="comma-separated DBA neighbour counts")
    parser.add_argument("--alpha", default="0,1,3,5", help="comma-separated DBA exponents")
    parser.add_argument("--depth", default="100,200,0", help="comma-separated candidate depths (0 = all)")
    parser.add_argument("--expand-n", type=int, default=2)
    parser.add_argument("--expand-alpha", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args()

    root = args.dataset.resolve()
    queries = ground_truth(root)
    id_of = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}
    ids, x = load_vectors()
    row = {image_id: i for i, image_id in enumerate(ids)}
    qrows = np.array([row[id_of[q]] for q in queries])
    relevant = [{row[id_of[r]] for r in rel} - {row[id_of[q]]} for q, rel in queries.items()]
    n_max = max(int(v) for v in args.n.split(","))

    gram = x @ x.T
    np.fill_diagonal(gram, -np.inf)  # a vector is never its own neighbour
    nbr = np.argsort(-gram, axis=1)[:, : max(n_max, 1)]
    nbr_s = np.take_along_axis(gram, nbr, axis=1)

    def evaluate(rankings: list[np.ndarray]) -> dict:
        aps, p10 = [], []
        for ranked, rel in zip(rankings, relevant, strict=True):
            flags = [int(r) in rel for r in ranked[: args.top_k]]
            aps.append(average_precision(flags, len(rel)))
            p10.append(sum(flags[:10]) / 10)
        return {"p_at_10": round(float(np.mean(p10)), 4), "mAP": round(float(np.mean(aps)), 4)}

    def search(q: np.ndarray, qrow: int, depth: int, d: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Candidates of ``q`` by the original vectors (``depth`` of them, 0 = all), re-ranked by ``d`` if given;
        the query's own row left out. Returns (rows, scores) best first."""
        s = x @ q
        s[qrow] = -np.inf
        order = np.argsort(-s)[:-1]
        if depth:
            order = order[:depth]
        if d is None:
            return order, s[order]
        s2 = d[order] @ q
        o2 = np.argsort(-s2, kind="stable")
        return order[o2], s2[o2]

    def expand_orig(qrow: int) -> np.ndarray:
        q = x[qrow]
        rows, scores = search(q, qrow, args.expand_n, None)
        return alpha_qe(q, x[rows], scores, args.expand_alpha)

    base = evaluate([search(x[r], r, 0, None)[0] for r in qrows])
    print(json.dumps({"dataset": root.name, "method": "base", **base}), flush=True)
    expanded = {r: expand_orig(r) for r in qrows}
    print(
        json.dumps(
            {"dataset": root.name, "method": "expand", **evaluate([search(expanded[r], r, 0, None)[0] for r in qrows])}
        ),
        flush=True,
    )
    for n in (int(v) for v in args.n.split(",")):
        for alpha in (float(v) for v in args.alpha.split(",")):
            if n == 0 and alpha:
                continue
            d = dba_matrix(x, nbr, nbr_s, n, alpha)
            for depth in (int(v) for v in args.depth.split(",")):
                plain = evaluate([search(x[r], r, depth, d)[0] for r in qrows])
                both_orig = evaluate([search(expanded[r], r, depth, d)[0] for r in qrows])
                ranks = []
                for r in qrows:
                    rows, scores = search(x[r], r, depth, d)
                    q2 = alpha_qe(x[r], d[rows[: args.expand_n]], scores[: args.expand_n], args.expand_alpha)
                    ranks.append(search(q2, r, depth, d)[0])
                both = evaluate(ranks)
                line = {"dataset": root.name, "n": n, "alpha": alpha, "depth": depth}
                print(
                    json.dumps(
                        {
                            **line,
                            "dba": plain,
                            "dba+expand": both,
                            "dba+expand_orig": both_orig,
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
