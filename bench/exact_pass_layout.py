"""Where the filtered exact pass spends its time, per storage layout (issue #29: filters keeping 0.5-5 % of 1M rows).

The pgvector backend answers a selective filter with an exact pass (app/vectordb/pgvector.py): read the matching
rows' ``embedding_bq`` (binary quantisation, ``bit(D)``), keep the ``--rerank`` best by Hamming distance, re-rank
those by the exact cosine distance of their vectors, return the top 10. At 1M rows the filters that keep rows
scattered over the table (format, size) cost 17-46 ms there (docs/benchmarks.md, run 8), over the 10 ms the issue
asks. This bench measures the same statement on three layouts of the same rows, side by side in one run:

``heap`` (the service before the covering indexes)
    B-tree on ``upper(format)``; a bitmap heap scan visits every matching row's heap page for its bits; the
    candidates' vectors are read by ``ctid`` from TOAST (a 512-d ``vector`` is 2,056 bytes, past PostgreSQL's
    2,032-byte TOAST threshold).
``covering``
    the B-tree holds the bits: ``(upper(format)) INCLUDE (format, id, embedding_bq)``, so the pass is an
    index-only scan (``format`` is included because PostgreSQL considers an index-only scan on an expression index
    only when the expression's columns are in the index, too); the candidates are fetched by primary key.
``covering_inline``
    as ``covering``, re-ranked over a ``halfvec(D)`` copy stored in the row (``STORAGE PLAIN``, D * 2 + 8 bytes)
    instead of the TOASTed vector: a second table, so that the wider rows do not slow the other two. (The service
    now keeps the ``vector`` itself in the row instead, ``sql/init.sql``'s ``toast_tuple_target``; the tables here
    keep PostgreSQL's default, so that the three layouts stay comparable with the runs recorded before.)

Rows: ``--n`` synthetic vectors around 64 centres (L2-normalised float32), ``format`` scattered at random so that
the filters ``F0..`` keep ``--matching`` rows each (5,000 / 20,000 / 50,000: 0.5 / 2 / 5 % of 1M) and the rest is
``JPEG``. ``--rerank`` candidates are re-ranked (default: the service's ``rerank_candidates``, 400 up to 20,000
matching rows, 2 % of them beyond). Each layout answers ``--queries`` queries per filter twice (the first round
warms); the server keeps the tables in ``--shared-buffers`` (``pg_prewarm``, as bench/search_scale.py does).
recall@10 is against the exact top-10 by cosine over the matching rows (numpy, float32). Costs: the tables' and
indexes' sizes in MB.

Usage::

    .venv/bin/python bench/exact_pass_layout.py --n 1000000 --matching 5000,20000,50000

Prints one JSON line (the last line; progress on stderr). An embedded PostgreSQL is started in a temporary
directory (or ``--pgdata``) and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CENTRES = 64
LAYOUTS = ("heap", "covering", "covering_inline")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_rows(n: int, dim: int, matching: list[int], seed: int) -> tuple[list[str], np.ndarray, np.random.Generator]:
    """``(formats, centres, rng)``: the ``format`` of each of ``n`` rows (``F<i>`` keeps ``matching[i]`` rows,
    scattered at random; the rest ``JPEG``) and the ``(CENTRES, dim)`` float32 centres the vectors are drawn
    around. Raises ``SystemExit`` when the filters ask for more rows than ``n``."""
    if sum(matching) > n:
        raise SystemExit(f"--matching asks for {sum(matching):,} rows of {n:,}")
    formats = [f"F{i}" for i, m in enumerate(matching) for _ in range(m)]
    formats += ["JPEG"] * (n - len(formats))
    random.Random(seed).shuffle(formats)
    rng = np.random.default_rng(seed)
    return formats, rng.standard_normal((CENTRES, dim)).astype(np.float32), rng


def vectors(rng: np.random.Generator, centres: np.ndarray, start: int, count: int) -> np.ndarray:
    """``(count, D)`` float32 L2-normalised: row ``i`` is centre ``i % CENTRES`` plus Gaussian noise (sigma 0.8)."""
    v = centres[np.arange(start, start + count) % CENTRES] + 0.8 * rng.standard_normal(
        (count, centres.shape[1])
    ).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def load(
    url: str, formats: list[str], centres: np.ndarray, rng: np.random.Generator
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Create and fill ``images`` (the service's columns) and ``images_inline`` (plus ``embedding_h``), the same
    rows in both; returns each filter's matching rows, ``(ids, (m, D) float32 vectors)``, for the exact top-10."""
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    dim = centres.shape[1]
    kept: dict[str, list[tuple[int, np.ndarray]]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        for table, extra in (("images", ""), ("images_inline", f", embedding_h halfvec({dim})")):
            conn.execute(
                f"CREATE TABLE {table} (id text PRIMARY KEY, embedding vector({dim}), embedding_bq bit({dim}), "
                f"format text{extra})"
            )
        conn.execute("ALTER TABLE images_inline ALTER COLUMN embedding_h SET STORAGE PLAIN")
        t0 = time.perf_counter()
        chunk = 20_000
        for start in range(0, len(formats), chunk):
            block = vectors(rng, centres, start, min(chunk, len(formats) - start))
            for table, columns, types in (
                ("images", "id, embedding, format", ["text", "vector", "text"]),
                ("images_inline", "id, embedding, format, embedding_h", ["text", "vector", "text", "halfvec"]),
            ):
                with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(types)
                    for j, v in enumerate(block):
                        row = [f"{start + j:040x}", v, formats[start + j]]
                        copy.write_row(row + [HalfVector(v)] if table == "images_inline" else row)
            for j, v in enumerate(block):
                if formats[start + j] != "JPEG":
                    kept.setdefault(formats[start + j], []).append((start + j, v))
        for table in ("images", "images_inline"):
            # Unthresholded sign bits: the layouts' costs do not depend on the thresholds (bench/bq_quality.py
            # measures those on real embeddings).
            conn.execute(f"UPDATE {table} SET embedding_bq = binary_quantize(embedding)::bit({dim})")
            conn.execute(f"VACUUM FULL {table}")
        log(f"loaded {len(formats):,} rows twice in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        conn.execute("CREATE INDEX images_format_upper ON images (upper(format))")
        for table in ("images", "images_inline"):
            conn.execute(
                f"CREATE INDEX {table}_format_covering ON {table} (upper(format)) INCLUDE (format, id, embedding_bq)"
            )
            conn.execute(f"VACUUM ANALYZE {table}")  # the visibility map an index-only scan needs
        log(f"indexed in {time.perf_counter() - t0:.0f} s")
    by_size = sorted(kept.items(), key=lambda item: len(item[1]))  # the narrowest filter first
    return {f: ([f"{i:040x}" for i, _ in rows], np.stack([v for _, v in rows])) for f, rows in by_size}


def sizes_mb(url: str) -> dict[str, float]:
    """Size in MB of each table (heap + TOAST, no indexes) and index."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, CASE WHEN c.relkind = 'r' THEN pg_table_size(c.oid) ELSE pg_relation_size(c.oid) END "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') ORDER BY 1"
        ).fetchall()
    return {name: round(b / 1e6, 1) for name, b in rows}


def statement(layout: str, dim: int) -> str:
    """The exact pass of ``layout`` (params: format, query vector, rerank, query vector): the 10 nearest matching
    rows, ``(id, cosine distance)``."""
    table = "images_inline" if layout == "covering_inline" else "images"
    key, fetch = ("ctid", "i.ctid") if layout == "heap" else ("id", "i.id")
    column, cast = ("embedding_h", "halfvec") if layout == "covering_inline" else ("embedding", "vector")
    return (
        f"WITH matching AS MATERIALIZED (SELECT {key} AS t, embedding_bq AS b FROM {table} "
        f"WHERE upper(format) = %s), "
        f"candidates AS (SELECT t FROM matching ORDER BY b <~> binary_quantize(%s::vector)::bit({dim}), t LIMIT %s) "
        f"SELECT i.id, i.{column} <=> %s::{cast} AS d FROM {table} i "
        f"WHERE {fetch} = ANY(ARRAY(SELECT t FROM candidates)) ORDER BY d, i.id LIMIT 10"
    )


def settings(layout: str) -> str:
    """The plan each layout is measured with: the heap layout as the service runs it (bitmap heap scan; the service
    turns index scans off for its exact pass), the covering ones as an index-only scan."""
    common = "SET LOCAL work_mem = '64MB'; SET LOCAL max_parallel_workers_per_gather = 0; "
    if layout == "heap":
        return common + (
            "SET LOCAL enable_indexscan = off; SET LOCAL enable_indexonlyscan = off; SET LOCAL enable_seqscan = off"
        )
    return common + "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off"


def plan_nodes(plan: dict) -> list[str]:
    """The node types of an ``EXPLAIN (FORMAT JSON)`` plan, depth first, with index names."""
    out = [plan["Node Type"] + (f" {plan['Index Name']}" if plan.get("Index Name") else "")]
    for child in plan.get("Plans", []):
        out += plan_nodes(child)
    return out


def measure(
    url: str, dim: int, matching: dict[str, tuple[list[str], np.ndarray]], queries: np.ndarray, rerank: int
) -> list[dict]:
    """One row per (layout, filter): p50/p95 ms of the statement (the second of two rounds), recall@10 against
    the exact top-10, the shared buffers one run of it touched, and whether it read the matching rows by an
    index-only scan."""
    import psycopg
    from pgvector.psycopg import register_vector

    from app.vectordb.pgvector import rerank_candidates

    truth = {
        fmt: [{ids[j] for j in np.argsort(-(vecs @ q), kind="stable")[:10]} for q in queries]
        for fmt, (ids, vecs) in matching.items()
    }
    rows = []
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        for layout in LAYOUTS:
            if layout == "covering":  # the covering index is then the only one on the expression
                conn.execute("DROP INDEX images_format_upper")
            sql = statement(layout, dim)
            for fmt, (ids, _) in matching.items():
                candidates = rerank or rerank_candidates(10, len(ids))
                times, found = [], 0
                for rnd in range(2):
                    for q, wanted in zip(queries, truth[fmt], strict=True):
                        with conn.transaction():
                            conn.execute(settings(layout))
                            t0 = time.perf_counter()
                            got = conn.execute(sql, (fmt, q, candidates, q), prepare=False).fetchall()
                            elapsed = (time.perf_counter() - t0) * 1000
                        if rnd:
                            times.append(elapsed)
                            found += len({r[0] for r in got} & wanted)
                with conn.transaction():
                    conn.execute(settings(layout))
                    plan = conn.execute(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, (fmt, queries[0], candidates, queries[0])
                    ).fetchone()[0]
                top = plan[0]["Plan"]
                p50, p95 = np.percentile(times, [50, 95])
                rows.append(
                    {
                        "layout": layout,
                        "matching": len(ids),
                        "rerank": candidates,
                        "p50_ms": round(float(p50), 2),
                        "p95_ms": round(float(p95), 2),
                        "recall_at_10": round(found / (10 * len(queries)), 3),
                        "index_only": any(n.startswith("Index Only Scan") for n in plan_nodes(top)),
                        "shared_blocks": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
                    }
                )
                log(json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="rows (default 200,000)")
    parser.add_argument("--dim", type=int, default=512, help="dimension (default 512)")
    parser.add_argument(
        "--matching", default="5000,20000,50000", help="rows each filter keeps, comma-separated (default 5k,20k,50k)"
    )
    parser.add_argument("--queries", type=int, default=40, help="queries per filter (default 40)")
    parser.add_argument(
        "--rerank",
        type=int,
        default=0,
        help="candidates re-ranked exactly (default 0: the service's rerank_candidates(10, matching rows))",
    )
    parser.add_argument("--shared-buffers", default="2GB", help="the server's shared_buffers (default 2GB)")
    parser.add_argument("--pgdata", type=Path, help="data directory of the embedded server (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    from search_scale import restart_with_shared_buffers

    from app.vectordb.embedded_pg import start_embedded_postgres

    matching = [int(m) for m in args.matching.split(",") if m.strip()]
    formats, centres, rng = make_rows(args.n, args.dim, matching, args.seed)
    scratch = None if args.pgdata else Path(tempfile.mkdtemp(prefix="exact-pass-"))
    base = args.pgdata or scratch / "pgdata"
    server = start_embedded_postgres(base)
    try:
        t0 = time.perf_counter()
        kept = load(server.url, formats, centres, rng)
        build_s = time.perf_counter() - t0
        sizes = sizes_mb(server.url)
        server = restart_with_shared_buffers(server, base, args.shared_buffers)
        queries = vectors(np.random.default_rng(args.seed + 1), centres, 0, args.queries)
        rows = measure(server.url, args.dim, kept, queries, args.rerank)
    finally:
        server.stop()
        shutil.rmtree(scratch or base, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "exact_pass_layout",
                "n": args.n,
                "dim": args.dim,
                "rerank": args.rerank,
                "queries": args.queries,
                "shared_buffers": args.shared_buffers,
                "build_s": round(build_s, 1),
                "sizes_mb": sizes,
                "load": round(os.getloadavg()[0], 1),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
