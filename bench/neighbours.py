#!/usr/bin/env python
"""Neighbour-graph build time at scale: the job of ``POST /jobs/neighbours`` over N synthetic vectors on pgvector.

Generates ``--n`` unit vectors (the seeded Gaussian mixture of ``bench/search_scale.py``), loads them into an
embedded PostgreSQL + pgvector (or ``DATABASE_URL``, an empty database) with binary ``COPY``, builds the HNSW index
after the load (as ``bench/search_scale.py`` does), then runs the service's own job (:class:`NeighbourJobs`: scan,
one ANN search per vector on ``--threads`` threads, batches committed to the SQLite graph file) with the service's
defaults (``NEIGHBOURS_K``, ``NEIGHBOURS_EF_SEARCH``) and times it. ``--dba`` also computes the DBA vectors.
The graph's recall is checked on ``--check`` random vectors against their exact ``k`` nearest neighbours (numpy).

Prints one JSON line: ``graph_s`` (the job, from start to completed; target <= 300 s for 100k on the 2-core box),
``images_per_s``, ``recall_at_k``, ``load_s``/``index_s`` (setup, not part of the job), ``graph_mb`` (the SQLite file),
``cpu_s`` (CPU time the job took in this process and the embedded PostgreSQL together: ``cpu_s / cores`` is the
wall time on an otherwise idle machine), ``loadavg`` (1 and 5 minutes, at the end: the machine is shared).

Usage: python bench/neighbours.py [--n 100000] [--dim 512] [--threads 4] [--dba]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.search_scale import MODEL_ID, SyntheticMetadata, copy_rows, log, synthetic_data  # noqa: E402


def cpu_seconds(pgdata: Path | None) -> float:
    """CPU time (user + system, s) used so far by this process and by the embedded PostgreSQL's processes (the
    postmaster and its children, from /proc; 0 for those with ``DATABASE_URL``)."""
    own = os.times()
    total = own.user + own.system
    if pgdata is None or not (pgdata / "postmaster.pid").exists():
        return total
    tick = os.sysconf("SC_CLK_TCK")
    root = int((pgdata / "postmaster.pid").read_text().split()[0])
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            if int(p.name) == root or int(fields[1]) == root:
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> int:
    from app.config import Settings
    from app.neighbours.jobs import NeighbourJobs
    from app.vectordb.pgvector import PgVectorHandler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="NEIGHBOURS_THREADS (default: the setting's)")
    parser.add_argument("--k", type=int, default=None, help="NEIGHBOURS_K (default: the setting's)")
    parser.add_argument("--dba", action="store_true", help="also compute DBA vectors (DBA=true)")
    parser.add_argument("--ef-search", type=int, default=None, help="NEIGHBOURS_EF_SEARCH (default: the setting's, 64)")
    parser.add_argument("--check", type=int, default=1000, help="vectors whose neighbours are checked exactly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=50_000)
    args = parser.parse_args()

    data, _ = synthetic_data(args.n, args.dim, args.seed, args.chunk)
    with tempfile.TemporaryDirectory(prefix="bench-neighbours-") as tmp:
        tmp = Path(tmp)
        embedded, pgdata = None, None
        url = os.environ.get("DATABASE_URL")
        if not url:
            from app.vectordb.embedded_pg import start_embedded_postgres

            pgdata = tmp / "pgdata"
            embedded = start_embedded_postgres(pgdata)
            url = embedded.url
        # The figures in docs/benchmarks.md are the SQLite file's (its size is measured below); the PostgreSQL
        # tables replicas share (NEIGHBOURS_STORE=auto with a DATABASE_URL) are not measured at scale yet.
        overrides = {"data_dir": tmp / "data", "database_url": url, "dba": args.dba, "neighbours_store": "sqlite"}
        if args.threads:
            overrides["neighbours_threads"] = args.threads
        if args.k:
            overrides["neighbours_k"] = args.k
        if args.ef_search:
            overrides["neighbours_ef_search"] = args.ef_search
        settings = Settings(_env_file=None, **overrides)
        db = None
        try:
            loader = PgVectorHandler(url, pool_min=1, pool_max=1)
            loader.ensure_collection(MODEL_ID, args.dim)
            if loader.count():
                raise SystemExit("the images table is not empty; point DATABASE_URL at an empty database")
            loader.drop_index()
            t0 = time.perf_counter()
            meta = SyntheticMetadata(len(data), [], args.seed)  # no filters: every row synthetic/<i>, as before
            for start in range(0, len(data), args.chunk):
                copy_rows(url, data[start : start + args.chunk], start, "vector", meta)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            loader.create_index(maintenance_work_mem="2GB", parallel_workers=2)
            index_s = time.perf_counter() - t0
            loader.close()
            log(f"loaded {args.n:,} x {args.dim} in {load_s:.1f} s, HNSW in {index_s:.1f} s")

            db = PgVectorHandler(
                url,
                pool_min=1,
                pool_max=settings.neighbours_threads + 2,
                ef_search=settings.hnsw_ef_search,
                hnsw_m=settings.hnsw_m,
                hnsw_ef_construction=settings.hnsw_ef_construction,
            )
            db.ensure_collection(MODEL_ID, args.dim)
            jobs = NeighbourJobs(settings, db)
            cpu0, t0 = cpu_seconds(pgdata), time.perf_counter()
            job, _ = jobs.start()
            while not jobs.wait(timeout=10):
                j = jobs.job(job.id)
                log(f"{j.phase} {j.done:,}/{j.total:,} after {time.perf_counter() - t0:.0f} s")
            graph_s = time.perf_counter() - t0
            cpu_s = cpu_seconds(pgdata) - cpu0
            job = jobs.job(job.id)
            if job.state != "completed":
                raise SystemExit(f"the job did not complete: {job}")

            rng = np.random.default_rng(args.seed)
            rows = rng.choice(args.n, size=min(args.check, args.n), replace=False)
            sims = data[rows] @ data.T
            sims[np.arange(len(rows)), rows] = -np.inf
            exact = np.argsort(-sims, axis=1)[:, : job.k]
            found = jobs._store.neighbours_of(job.id, [f"{r:064x}" for r in rows], job.k)
            hits = sum(
                len({int(d, 16) for d, _ in found[f"{r:064x}"]} & set(exact[i].tolist())) for i, r in enumerate(rows)
            )
            recall = hits / (len(rows) * job.k)
            graph_mb = sum(p.stat().st_size for p in (tmp / "data").glob("neighbours.sqlite3*")) / 1e6
            jobs.close()
        finally:
            if db is not None:
                db.close()
            if embedded is not None:
                embedded.stop()
    print(
        json.dumps(
            {
                "benchmark": "neighbours",
                "backend": "pgvector",
                "n": args.n,
                "dim": args.dim,
                "k": job.k,
                "threads": settings.neighbours_threads,
                "ef_search": settings.neighbours_ef_search,
                "dba": args.dba,
                "graph_s": round(graph_s, 1),
                "images_per_s": round(args.n / graph_s, 1),
                "cpu_s": round(cpu_s, 1),
                "recall_at_k": round(recall, 4),
                "graph_mb": round(graph_mb, 1),
                "load_s": round(load_s, 1),
                "index_s": round(index_s, 1),
                "cpus": os.cpu_count(),
                "loadavg": [round(v, 2) for v in os.getloadavg()[:2]],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
