#!/usr/bin/env python
"""Filtered search on two PostgreSQL databases holding the same rows (or one database under two plan settings),
alternated query by query (issue #29).

    DATABASE_URL=postgresql://.../a python bench/search_scale.py --n 1000000 --filter-selectivity 0.005,0.02 \\
        --filter-kinds folder,format,size,date --no-api ...        # loads the rows, and leaves them there
    psql -c "CREATE DATABASE b TEMPLATE a"; change b (a table setting, an index) ...
    python bench/filtered_ab.py postgresql://.../a postgresql://.../b --n 1000000 \\
        --filter-selectivity 0.005,0.02 --filter-kinds folder,format,size,date

    python bench/filtered_ab.py URL URL --b-set ITERATIVE_EF_PER_RESULT_STRONG=2 ...   # one database, two plans

Two layouts of one table measured one after the other meet different loads on a shared machine; this bench puts
them side by side instead. ``--b-set NAME=VALUE`` (repeatable) sets a constant of :mod:`app.vectordb.pgvector`
(one :func:`search_scale.apply_filter_plan` overrides, e.g. ``ITERATIVE_EF_PER_RESULT_STRONG``,
``EXACT_SEARCH_MAX_ROWS``, ``RERANK_SHARE``) for ``b``'s searches only: it is set before each of them and put
back after. ``--n``, ``--dim``, ``--seed``, ``--clusters``, ``--filter-selectivity``,
``--filter-kinds`` and ``--metadata-order`` must be those ``bench/search_scale.py`` loaded the databases with: the
rows, the queries, the filters and their exact filtered top-10 are generated again from them
(:func:`search_scale.synthetic_data`, :class:`search_scale.SyntheticMetadata`). Per filter, each database's
:class:`~app.vectordb.pgvector.PgVectorHandler` is warmed with 20 searches, then the ``--queries`` searches run
alternately (``a, b`` for even queries, ``b, a`` for odd ones), one at a time. Within 30 s a handler remembers what a
filter matched (app/vectordb/filter_rows.py), so these are searches of a filter searched again; ``--first`` makes
each handler forget it before every search, so each is a filter's first search (estimated, and counted unless
its estimate holds).

Prints one JSON line per filter while it runs (stderr) and one JSON object at the end (the LAST line, stdout):
per filter ``kind``, ``selectivity``, ``matching`` rows, ``load`` (1-minute load average after it), and for ``a`` and
``b``: ``recall_at_10``, ``p50_ms``, ``p95_ms`` (client side) and the ``plans`` that answered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import search_scale  # noqa: E402  (bench/ is not a package)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url_a")
    parser.add_argument("url_b")
    parser.add_argument("--n", type=int, required=True, help="rows search_scale.py loaded")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=None, help="as search_scale.py (default: N/250, 50..5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=50_000, help="as search_scale.py's --chunk")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef", type=int, default=160, help="hnsw.ef_search of both handlers")
    parser.add_argument("--filter-selectivity", type=lambda s: [float(x) for x in s.split(",")], required=True)
    parser.add_argument("--filter-kinds", type=lambda s: tuple(x for x in s.split(",") if x), default=("folder",))
    parser.add_argument("--metadata-order", choices=("random", "clustered"), default="random")
    parser.add_argument(
        "--measure",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="measure only the filters of these selectivities (default: all of --filter-selectivity, which must "
        "still list every one the rows were loaded with)",
    )
    parser.add_argument(
        "--first",
        action="store_true",
        help="measure first searches: each handler forgets what it knew of the filter's rows before every search",
    )
    parser.add_argument(
        "--b-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a constant of app.vectordb.pgvector for b's searches only (a number)",
    )
    args = parser.parse_args()

    import app.vectordb.pgvector as pgvector_module
    from app.vectordb.pgvector import PgVectorHandler

    overrides = {}
    for item in args.b_set:
        name, _, value = item.partition("=")
        if not hasattr(pgvector_module, name) or not value:
            parser.error(f"--b-set {item!r}: not NAME=VALUE for a constant of app.vectordb.pgvector")
        number = float(value)
        overrides[name] = int(number) if number.is_integer() else number
    defaults = {name: getattr(pgvector_module, name) for name in overrides}

    def search(name: str, q: np.ndarray, filters):
        """One search of handler ``name``, with ``--b-set`` in effect for ``b``."""
        if name == "b":
            for key, value in overrides.items():
                setattr(pgvector_module, key, value)
        try:
            if args.first:
                handlers[name]._filter_rows.clear()
            return handlers[name].search(q, search_scale.TOP_K, filters)
        finally:
            for key, value in defaults.items():
                setattr(pgvector_module, key, value)

    data, queries = search_scale.synthetic_data(args.n, args.dim, args.seed, args.chunk, args.queries, args.clusters)
    meta = search_scale.SyntheticMetadata(
        args.n, args.filter_selectivity, args.seed, args.filter_kinds, args.metadata_order
    )
    handlers = {
        name: PgVectorHandler(url, pool_min=1, pool_max=1, ef_search=args.ef)
        for name, url in (("a", args.url_a), ("b", args.url_b))
    }
    rows_out = []
    try:
        for kind, s, filters, mask in meta.filters():
            if args.measure is not None and s not in args.measure:
                continue
            rows = np.flatnonzero(mask)
            exact = rows[search_scale.exact_top_k(data[rows], queries, search_scale.TOP_K)]
            for name in handlers:
                for q in queries[: min(len(queries), 20)]:
                    search(name, q, filters)
            before = {name: h.plan_counts() for name, h in handlers.items()}
            ms = {name: [] for name in handlers}
            recall = {name: [] for name in handlers}
            for qi, q in enumerate(queries):
                for name in ("a", "b") if qi % 2 == 0 else ("b", "a"):
                    t = time.perf_counter()
                    hits = search(name, q, filters)
                    ms[name].append((time.perf_counter() - t) * 1000)
                    assert all(filters.matches(hit.metadata) for hit in hits)
                    found = {int(hit.id, 16) for hit in hits}
                    recall[name].append(len(found & set(exact[qi].tolist())) / search_scale.TOP_K)
            row = {"kind": kind, "selectivity": s, "matching": int(len(rows)), "load": round(os.getloadavg()[0], 2)}
            for name, h in handlers.items():
                after = h.plan_counts()
                p50, p95, _ = search_scale.percentiles(ms[name])
                row[name] = {
                    "recall_at_10": round(float(np.mean(recall[name])), 4),
                    "p50_ms": p50,
                    "p95_ms": p95,
                    "plans": {p: after[p] - before[name][p] for p in pgvector_module.PLAN_COUNTERS},
                    "last_ef": after.get("last_ef"),  # the latest iterative scan's hnsw.ef_search
                }
            search_scale.log(json.dumps(row))
            rows_out.append(row)
    finally:
        for h in handlers.values():
            h.close()
    line = {"bench": "filtered_ab", "n": args.n, "dim": args.dim, "queries": args.queries, "b_set": overrides}
    print(json.dumps({**line, "rows": rows_out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
