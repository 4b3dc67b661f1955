#!/usr/bin/env python
"""HNSW search at scale: build time, size, latency and recall@10 of N synthetic embeddings, as one JSON line.

    python bench/search_scale.py --backend pgvector|milvus|manticore --n 1000000 --dim 512
                                 [--vector-type vector|halfvec] [--ef 20,40,80,160] [--queries 300] [--no-api]
                                 [--check-scan] [--filter-selectivity 0.02,0.1,0.5 [--filter-ef 40,160]]

Data: ``N`` unit vectors from a seeded Gaussian mixture on the sphere, not uniform noise (on which HNSW behaves
unlike on real embeddings). ``--clusters`` centres share a mean direction and vary along a power-law spectrum
(real embeddings fill a cone; centres uniform on the sphere would all be orthogonal, a pathological case for HNSW,
see docs/benchmarks.md); each vector is its centre plus anisotropic noise (the same power-law spectrum over
another random orthonormal basis, so the data has a low effective dimension as image embeddings do) with a
per-cluster spread drawn log-normally, then L2-normalised. ``--queries`` held-out vectors from the same mixture
are the queries; ground truth is exact top-10 by numpy brute force over the same float32 vectors (for ``halfvec``
too, so its recall includes the float16 rounding).

Steps (pgvector): a fresh embedded PostgreSQL in a temporary directory (or ``DATABASE_URL``, whose ``images``
table must be empty); ``ensure_collection`` creates the ``vector(D)``/``halfvec(D)`` table, the index is dropped,
rows are loaded with binary ``COPY`` (psycopg's copy with the pgvector adapter, in chunks; after the first chunk
``embedding_bq`` is calibrated, as the service does at its 1,000th row, unless ``--bq sign``), then the HNSW index is
built once with ``maintenance_work_mem`` = ``--maintenance-work-mem`` and ``max_parallel_maintenance_workers`` =
``--workers`` (pgvector's advice for fast builds). For each ``ef_search``: ``--queries`` top-10 searches, one at a
time, through :meth:`PgVectorHandler.search` (after a warm-up pass), and, unless ``--no-api``, through
``POST /search_vector`` of a real uvicorn server (``python -m uvicorn app.main:app``) started on the same database
with ``EMBEDDER=none`` (serve an existing collection without a model: the collection's synthetic model id is then
what the service reports) and ``HNSW_EF_SEARCH`` set to that value.

Steps (milvus): a fresh Milvus Lite database in the temporary directory (or, when ``MILVUS_URI`` is an
``http(s)://`` URL, a fresh collection on that server, dropped afterwards); rows go in through
:meth:`MilvusHandler.upsert` in batches of ``--batch-size`` (the service's own write path, with its flush policy);
``build_s`` is the time from the last write until the index is ready: closing the handler, which on Lite waits for
the background compaction and per-segment HNSW builds, and opening a new one, which loads (or builds) the indexes.
``index_mb`` is the size of Lite's index files, ``table_mb`` the whole database directory (``None`` on a server).

Steps (manticore, where ``MANTICORE_HOST`` answers): a fresh table ``bench_<hex>`` (dropped afterwards), rows
through :meth:`ManticoreHandler.upsert`, then ``FLUSH RAMCHUNK`` and ``OPTIMIZE TABLE ... OPTION cutoff=1, sync=1``
(timed as ``build_s``: the engine builds HNSW per disk chunk; ``cutoff=1`` merges them into one, so a search walks
one graph: without it a 29.x engine stops at two disk chunks, see docs/backends.md; ``--optimize-cutoff 0`` leaves
the cutoff to the engine, as before issue #27); ``disk_chunks`` and ``index_mb``/``table_mb`` from ``SHOW TABLE
... STATUS`` (``disk_bytes``; ``index_mb`` is ``None``, the engine does not report the HNSW part separately).

The handler pass is the same for every backend: for each ``ef_search`` a new handler with that ``ef_search``,
a warm-up, then ``--queries`` top-10 searches; the API pass starts the server with ``VECTOR_DB`` set to the
backend (all handlers are closed first: Milvus Lite allows one process per database). ``--check-scan`` then reads
every row back through :meth:`VectorDBHandler.scan` and adds ``"scan": {"rows", "distinct", "complete",
"seconds"}`` (``complete``: every stored id came back exactly once and nothing else did).

``--filter-selectivity s1,s2,...`` (issue #9) gives every row a synthetic folder so that, for each ``s``, one
:class:`~app.vectordb.base.SearchFilter` (``path_prefix``) keeps a random fraction ``s`` of the rows, independent
of the vectors: a seeded uniform ``u`` per row, and nested folders ``in0.5/in0.1/in0.02/`` for the rows with
``u < s`` at each level (``out/`` where a level fails), so ``path_prefix="in0.5/in0.1"`` keeps the 10 %. Then, per
selectivity and per ``--filter-ef`` (default: ``--ef``), the same queries are searched through the handler with
that filter, and ``"filtered"`` reports ``matching`` (rows the filter keeps), ``recall_at_10`` against the exact
filtered top-10 (numpy over the same vectors, restricted to the matching rows), ``full`` (share of searches that
returned all 10) and ``p50_ms``/``p95_ms``. To compare the handlers' filtered-search plans, ``--pg-exact-max-rows``,
``--pg-iterative-scan`` and ``--pg-iterative-ef-per-result`` override ``EXACT_SEARCH_MAX_ROWS``, ``ITERATIVE_SCAN``
and ``ITERATIVE_EF_PER_RESULT`` of :mod:`app.vectordb.pgvector` (``0`` sends every filtered search through the
iterative scan; ``0`` makes ``--filter-ef`` the iterative scan's ``hnsw.ef_search``, for a sweep), and
``--lite-filter-ef-factor`` overrides ``LITE_FILTER_EF_FACTOR`` of :mod:`app.vectordb.milvus`; the values in
effect are reported under ``"filter_plan"``.

Reported: ``build_s`` (index build wall time), ``load_s`` (COPY), ``index_mb``/``table_mb`` (``pg_relation_size``
of the index, and of the table with its TOAST data), ``server_pss_mb`` (proportional set size of all server
processes after the searches: shared buffers touched plus private memory; the OS page cache that holds the rest of
the index is not in it, which is why ``index_mb`` is the memory a fast search needs), and per ``ef_search``:
``recall_at_10``, ``p50_ms``/``p95_ms``/``p99_ms`` (handler) and ``api_p50_ms`` (HTTP round trip, client side).
The LAST line printed is the JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_ID = "synthetic:gaussian-mixture"  # recorded with the collection; EMBEDDER=none serves it as is
TOP_K = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Mixture:
    """Seeded Gaussian mixture on the unit sphere; :meth:`sample` gives ``(n, dim)`` float32 unit rows.

    Args:
        dim: dimension ``D``. clusters: number of centres. seed: makes every draw reproducible.
        spread: overall noise scale (norm of the noise relative to the unit centre, before normalisation).
    """

    def __init__(self, dim: int, clusters: int, seed: int, spread: float = 0.8) -> None:
        rng = np.random.default_rng(seed)
        # Centres are not uniform on the sphere: real embeddings fill a cone (a shared mean direction) and vary
        # mostly along a few dozen directions. Uniform centres in 512-d are all mutually orthogonal, which leaves
        # HNSW's greedy descent no gradient between clusters (measured: recall@10 0.33-0.68 at 1M, ef_search
        # 20-120) and is unlike any real embedding set.
        mean = rng.normal(size=dim)
        mean /= np.linalg.norm(mean)
        c = mean[None, :] + 1.2 * (rng.standard_normal(size=(clusters, dim)) @ self._powerlaw_basis(rng, dim))
        self.centres = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        # Within-cluster noise: another random basis with the same power-law spectrum (effective dimension about
        # 28 of 512), instead of isotropic noise, which makes every neighbour equidistant.
        self.basis = self._powerlaw_basis(rng, dim).astype(np.float32)  # (D, D): z @ basis
        self.cluster_spread = (spread * rng.lognormal(0.0, 0.3, size=clusters)).astype(np.float32)
        self.weights = rng.dirichlet(np.full(clusters, 5.0))
        self.dim = dim

    @staticmethod
    def _powerlaw_basis(rng: np.random.Generator, dim: int) -> np.ndarray:
        """``(D, D)`` map of standard normal ``z`` to noise with variance ``1/i`` along random orthonormal
        directions ``i = 1..D``, scaled to unit expected norm."""
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -1.0
        return (q * np.sqrt(spectrum / spectrum.sum())[None, :]).T

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = rng.choice(len(self.centres), size=n, p=self.weights)
        z = rng.standard_normal(size=(n, self.dim), dtype=np.float32)
        x = self.centres[labels] + (z @ self.basis) * self.cluster_spread[labels, None]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def default_clusters(n: int) -> int:
    """Mixture centres for ``n`` rows when ``--clusters`` is not given: ``n / 250``, at least 50, at most 5,000."""
    return int(np.clip(n // 250, 50, 5000))


def synthetic_data(
    n: int, dim: int, seed: int, chunk: int, queries: int = 0, clusters: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, queries)``: ``(n, dim)`` and ``(queries, dim)`` float32 unit vectors of one :class:`Mixture`
    (``clusters`` centres, default :func:`default_clusters`). The rows are drawn in blocks of ``chunk``, block ``b``
    seeded ``seed * 1_000_003 + 1 + b``, the queries with ``seed * 1_000_003 + 999_999``: the one definition every
    bench that reopens rows this script loaded (``filtered_ab.py``) or loads the same ones (``neighbours.py``) uses."""
    mix = Mixture(dim, clusters or default_clusters(n), seed)
    rows = np.concatenate(
        [mix.sample(min(chunk, n - s), seed=seed * 1_000_003 + 1 + s // chunk) for s in range(0, n, chunk)]
    )
    return rows, mix.sample(queries, seed=seed * 1_000_003 + 999_999)


def exact_top_k(data: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Row indices of the exact top-``k`` cosine neighbours (unit vectors: dot product), ``(Q, k)`` int64."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(data), chunk):
        s = queries @ data[start : start + chunk].T
        part = np.argpartition(-s, k, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
    return best_i


def server_pss_mb(pgdata: Path | None) -> float | None:
    """Proportional set size (MB) of the postmaster and its children, from /proc; ``None`` if unknown."""
    if pgdata is None or not (pgdata / "postmaster.pid").exists():
        return None
    root = int((pgdata / "postmaster.pid").read_text().split()[0])
    pids = [root]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == root:
                    pids.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def copy_rows(url: str, vectors: np.ndarray, start: int, vector_type: str, meta: SyntheticMetadata) -> None:
    """Binary COPY of ``vectors`` as rows ``start..`` (ids ``f"{i:064x}"``) through the pgvector adapter, with the
    metadata of :meth:`SyntheticMetadata.row`."""
    import psycopg
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        register_vector(conn)
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY images (id, embedding, filename, format, width, height, bytes, indexed_at, taken_at) "
                "FROM STDIN WITH (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(
                [
                    "text",
                    vector_type,  # char(64) has text's binary format
                    "text",
                    "text",
                    "int4",
                    "int4",
                    "int8",
                    "timestamptz",
                    "timestamptz",
                ]
            )
            for i, v in enumerate(vectors, start):
                value = HalfVector(v) if vector_type == "halfvec" else v
                filename, fmt, width, height, taken_at = meta.row(i)
                copy.write_row((f"{i:064x}", value, filename, fmt, width, height, 0, now, taken_at))
        conn.commit()


def restart_with_shared_buffers(embedded, pgdata: Path, shared_buffers: str):
    """Set the embedded server's ``shared_buffers`` (``ALTER SYSTEM``; it applies at a start), restart it, and load
    the table, its TOAST table (the vectors) and every index into them with ``pg_prewarm`` (PostgreSQL's contrib
    module), so that the searches measure a server whose working set is in its own cache rather than in the OS page
    cache, which other jobs on a shared machine evict. Returns the restarted server."""

    import psycopg

    from app.vectordb.embedded_pg import start_embedded_postgres

    with psycopg.connect(embedded.url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
    embedded.stop()
    embedded = start_embedded_postgres(pgdata)
    prewarm(embedded.url)
    return embedded


def prewarm(url: str) -> None:
    """Load the ``images`` table, its TOAST table and every index of it into the server's ``shared_buffers``
    (``pg_prewarm``), logging the setting and the pages read."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        relations = [
            r[0]
            for r in conn.execute(
                "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'images'::regclass "
                "UNION ALL SELECT 'images' "
                "UNION ALL SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'images'::regclass "
                "AND reltoastrelid <> 0"
            )
        ]
        t0 = time.perf_counter()
        pages = sum(conn.execute("SELECT pg_prewarm(%s)", (r,)).fetchone()[0] for r in relations)
        log(
            f"shared_buffers = {conn.execute('SHOW shared_buffers').fetchone()[0]}; prewarmed {pages:,} pages "
            f"of {len(relations)} relations in {time.perf_counter() - t0:.1f} s"
        )


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.asarray(ms), [50, 95, 99])
    return round(float(p50), 2), round(float(p95), 2), round(float(p99), 2)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_server(backend_env: dict[str, str], data_dir: Path, ef: int):
    """A real uvicorn server (``python -m uvicorn app.main:app``) on a free loopback port, serving the database of
    ``backend_env`` (``VECTOR_DB`` and its connection variables) with ``EMBEDDER=none`` and ``HNSW_EF_SEARCH=ef``;
    yields an ``httpx.Client`` on it once ``/health`` answers 200 (at most 120 s), and stops it afterwards."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        **backend_env,
        "DATA_DIR": str(data_dir),
        "EMBEDDER": "none",
        "HNSW_EF_SEARCH": str(ef),
        "UI_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen([*argv, "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the API server exited with {server.returncode}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the API server did not start in 120 s")
                time.sleep(0.2)
            yield client
    finally:
        server.terminate()
        server.wait(timeout=30)


def api_p50_ms(backend_env: dict[str, str], data_dir: Path, ef: int, queries: np.ndarray) -> float:
    """Median client-side latency (ms) of top-10 ``POST /search_vector`` on a real uvicorn server
    (:func:`api_server`)."""
    with api_server(backend_env, data_dir, ef) as client:
        bodies = [{"vector": q.tolist(), "top_k": TOP_K} for q in queries]
        for body in bodies[:20]:  # warm-up: connection, thread pool, pool connections
            client.post("/search_vector", json=body).raise_for_status()
        ms = []
        for body in bodies:
            t = time.perf_counter()
            r = client.post("/search_vector", json=body)
            ms.append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
            assert len(r.json()["results"]) == TOP_K
    return percentiles(ms)[0]


def filter_body(filters) -> dict:
    """The JSON filter fields of ``POST /search_vector`` that mean ``filters`` (a SearchFilter)."""
    body = {}
    for name in ("path_prefix", "min_width", "min_height"):
        if getattr(filters, name) is not None:
            body[name] = getattr(filters, name)
    if filters.formats is not None:
        body["formats"] = list(filters.formats)
    for name in ("indexed_after", "indexed_before", "taken_after", "taken_before"):
        if getattr(filters, name) is not None:
            body[name] = getattr(filters, name).isoformat()
    return body


def api_filtered(
    args, backend_env: dict[str, str], data_dir: Path, data: np.ndarray, queries: np.ndarray, meta, replicas: int
) -> list[dict]:
    """The filtered searches through ``POST /search_vector`` of ``replicas`` servers on the same database (issue
    #29): per filter, recall@10 of the first server's answers against the exact filtered top-10, and whether every
    replica returned the same ids in the same order (``replicas_identical``), over ``--api-filter-queries``
    queries; ``ef_search`` is the first of ``--filter-ef``."""
    ef = args.filter_ef[0]
    out = []
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(api_server(backend_env, data_dir, ef)) for _ in range(replicas)]
        for kind, s, filters, mask in meta.filters():
            rows = np.flatnonzero(mask)
            qs = queries[: args.api_filter_queries]
            exact = rows[exact_top_k(data[rows], qs, TOP_K)]
            recalls, identical = [], True
            for qi, q in enumerate(qs):
                body = {"vector": q.tolist(), "top_k": TOP_K, "exclude_self": False, **filter_body(filters)}
                answers = []
                for client in clients:
                    r = client.post("/search_vector", json=body)
                    r.raise_for_status()
                    answers.append([hit["id"] for hit in r.json()["results"]])
                identical &= all(a == answers[0] for a in answers)
                recalls.append(len({int(i, 16) for i in answers[0]} & set(exact[qi].tolist())) / TOP_K)
            row = {
                "kind": kind,
                "selectivity": s,
                "queries": len(qs),
                "replicas": replicas,
                "api_recall_at_10": round(float(np.mean(recalls)), 4),
                "replicas_identical": identical,
            }
            log(json.dumps(row))
            out.append(row)
    return out


def measure_searches(args, open_handler, queries: np.ndarray, exact: np.ndarray, api_env, tmp: Path) -> list[dict]:
    """Per ``ef_search`` in ``args.ef``: recall@10 and latency of ``--queries`` top-10 searches.

    ``open_handler(ef)`` returns a new handler searching with that ``ef_search``; it is closed before the API pass
    (``api_env``: the server's backend variables, or ``None`` to skip it). Row ids are ``f"{i:064x}"``, so a hit's
    row index is ``int(id, 16)``. Latencies in ms, client side, one search at a time after a warm-up pass.
    """
    results = []
    for ef in args.ef:
        h = open_handler(ef)
        try:
            for q in queries[: min(len(queries), 100)]:  # warm-up: pages into caches, connections opened
                h.search(q, TOP_K)
            ms, recalls = [], []
            for qi, q in enumerate(queries):
                t = time.perf_counter()
                hits = h.search(q, TOP_K)
                ms.append((time.perf_counter() - t) * 1000)
                found = {int(hit.id, 16) for hit in hits}
                recalls.append(len(found & set(exact[qi].tolist())) / TOP_K)
        finally:
            h.close()
        p50, p95, p99 = percentiles(ms)
        row = {
            "ef_search": ef,
            "recall_at_10": round(float(np.mean(recalls)), 4),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "api_p50_ms": None,
        }
        if args.api and api_env is not None:
            row["api_p50_ms"] = api_p50_ms(api_env, tmp / "app-data", ef, queries)
        log(json.dumps(row))
        results.append(row)
    return results


FILTER_KINDS = ("folder", "format", "size", "date")
#: format names given to the slices of --filter-selectivity (largest selectivity first); the rest of the rows: HEIF
SYNTHETIC_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "AVIF", "BMP")
DATE_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
DATE_SPAN_DAYS = 10_000.0
DATE_WINDOW_START_DAYS = 1_000.0  # a date filter keeps a window starting here, not the newest or oldest photos


class SyntheticMetadata:
    """Per-row metadata drawn independently of the vectors, so that one filter per kind and per selectivity ``s``
    keeps a random fraction ``s`` of the rows (issue #29). Each kind has its own seeded uniform ``u`` per row:

    * ``folder``: nested folders ``in0.5/in0.1/in0.02/...`` for the rows with ``u < s`` at each level (``out``
      where a level fails); the filter is ``path_prefix`` (e.g. ``in0.5/in0.1`` keeps 10 %).
    * ``format``: disjoint slices of ``u``, one format name per selectivity (``SYNTHETIC_FORMATS``), ``HEIF`` for
      the rest; the filter is ``formats=[name]`` (needs the selectivities to sum to at most 1).
    * ``size``: ``width = 100 + floor(10,000 u)`` px (height 3/4 of it); the filter is ``min_width`` keeping ``s``.
    * ``date``: ``taken_at`` uniform over 10,000 days from 2000-01-01; the filter is a ``taken_after`` /
      ``taken_before`` window of ``10,000 s`` days starting on day 1,000.

    Without selectivities every row is ``synthetic/{i}``, format ``SYNTHETIC``, 1 x 1 px, no ``taken_at``.

    ``order="clustered"`` sorts the folder's and the date's ``u`` along the row number, so a folder (and a date
    window) is a run of consecutive rows, as in a photo library scanned folder by folder whose folders are dated
    events (``image-search-library``, ``scripts/bulk_index.py`` walk in path order); the rows are stored in row
    order, so a folder's rows then share heap pages. Format and size stay random in both orders.
    """

    def __init__(
        self,
        n: int,
        selectivities: list[float],
        seed: int,
        kinds: tuple[str, ...] = ("folder",),
        order: str = "random",
    ) -> None:
        self.n, self.kinds = n, tuple(kinds) if selectivities else ()
        self.selectivities = sorted(selectivities, reverse=True)
        if "format" in self.kinds and sum(self.selectivities) > 1:
            raise SystemExit("--filter-kinds format needs --filter-selectivity values that sum to at most 1")
        rng = np.random.default_rng(seed * 1_000_003 + 7)
        u = rng.random((n, 4)) if selectivities else np.zeros((n, 4))
        if order == "clustered":
            u[:, 0].sort()
            u[:, 3].sort()
        self.u = u
        levels = self.selectivities
        names = [f"in{x:g}" for x in levels]
        depth = np.zeros(n, dtype=np.int64)
        for x in levels:
            depth += u[:, 0] < x
        self.folders = (
            ["/".join(names[:d] + (["out"] if d < len(levels) else [])) for d in depth.tolist()] if levels else None
        )
        self.prefixes = {x: "/".join(names[: k + 1]) for k, x in enumerate(levels)}
        self.format_of = np.full(n, "HEIF", dtype=object)
        self.format_names, lo = {}, 0.0
        for k, x in enumerate(levels[: len(SYNTHETIC_FORMATS)]):
            self.format_names[x] = SYNTHETIC_FORMATS[k]
            self.format_of[(u[:, 1] >= lo) & (u[:, 1] < lo + x)] = SYNTHETIC_FORMATS[k]
            lo += x
        self.width = (100 + np.floor(u[:, 2] * 10_000)).astype(np.int64)
        self.taken_days = u[:, 3] * DATE_SPAN_DAYS

    def _mask(self, kind: str, x: float, f) -> np.ndarray:
        """``(N,)`` bool: the rows ``f`` keeps, computed from the arrays (checked against ``f.matches`` on a sample
        of rows, the filter's reference meaning)."""
        if kind == "folder":
            mask = self.u[:, 0] < x
        elif kind == "format":
            mask = self.format_of == self.format_names[x]
        elif kind == "size":
            mask = self.width >= f.min_width
        else:
            start = (f.taken_after - DATE_ORIGIN).total_seconds() / 86400
            end = (f.taken_before - DATE_ORIGIN).total_seconds() / 86400
            mask = (self.taken_days >= start) & (self.taken_days < end)
        from app.vectordb.base import ImageMetadata

        now = datetime.now(UTC)
        for i in np.random.default_rng(0).choice(self.n, size=min(self.n, 2000), replace=False).tolist():
            filename, fmt, width, height, taken_at = self.row(i)
            assert f.matches(ImageMetadata(filename, fmt, width, height, 0, now, taken_at)) == mask[i], (kind, x, i)
        return mask

    def row(self, i: int) -> tuple[str, str, int, int, datetime | None]:
        """``(filename, format, width, height, taken_at)`` of row ``i``."""
        if self.folders is None:
            return f"synthetic/{i}", "SYNTHETIC", 1, 1, None
        w = int(self.width[i])
        taken = DATE_ORIGIN + timedelta(days=float(self.taken_days[i]))
        return f"{self.folders[i]}/{i}", str(self.format_of[i]), w, max(1, w * 3 // 4), taken

    def filters(self) -> list[tuple[str, float, object, np.ndarray]]:
        """``(kind, s, SearchFilter, mask)`` per kind and selectivity; ``mask`` (N,) bool marks the matching rows."""
        from app.vectordb.base import SearchFilter

        out = []
        for kind in self.kinds:
            for x in sorted(self.selectivities):
                if kind == "folder":
                    f = SearchFilter.create(path_prefix=self.prefixes[x])
                elif kind == "format":
                    if x not in self.format_names:
                        continue
                    f = SearchFilter.create(formats=[self.format_names[x]])
                elif kind == "size":
                    f = SearchFilter.create(min_width=100 + int(np.ceil(10_000 * (1 - x))))
                else:
                    start = DATE_ORIGIN + timedelta(days=DATE_WINDOW_START_DAYS)
                    f = SearchFilter.create(taken_after=start, taken_before=start + timedelta(days=DATE_SPAN_DAYS * x))
                out.append((kind, x, f, self._mask(kind, x, f)))
        return out


def apply_filter_plan(args) -> dict:
    """Apply the ``--pg-*``/``--lite-*`` overrides to the handler modules; returns the settings in effect."""
    import app.vectordb.milvus as milvus_module
    import app.vectordb.pgvector as pgvector_module

    if args.pg_exact_max_rows is not None:
        pgvector_module.EXACT_SEARCH_MAX_ROWS = args.pg_exact_max_rows
    if args.pg_iterative_scan is not None:
        pgvector_module.ITERATIVE_SCAN = args.pg_iterative_scan
    if args.pg_iterative_ef_per_result is not None:
        pgvector_module.ITERATIVE_EF_PER_RESULT = args.pg_iterative_ef_per_result
        pgvector_module.ITERATIVE_EF_PER_RESULT_STRONG = args.pg_iterative_ef_per_result
    if args.lite_filter_ef_factor is not None:
        milvus_module.LITE_FILTER_EF_FACTOR = args.lite_filter_ef_factor
    return {
        "pg_exact_max_rows": pgvector_module.EXACT_SEARCH_MAX_ROWS,
        "pg_iterative_scan": pgvector_module.ITERATIVE_SCAN,
        "pg_iterative_ef_per_result": [
            pgvector_module.ITERATIVE_EF_PER_RESULT,
            pgvector_module.ITERATIVE_EF_PER_RESULT_STRONG,
        ],
        "lite_filter_ef_factor": milvus_module.LITE_FILTER_EF_FACTOR,
    }


def _plan_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    """Which of :class:`PgVectorHandler`'s filtered plans answered the searches between two
    :meth:`PgVectorHandler.plan_counts` (``last_ef`` as it is after them); ``None`` for other backends."""
    if before is None or after is None:
        return None
    from app.vectordb.pgvector import PLAN_COUNTERS

    out = {k: after[k] - before.get(k, 0) for k in PLAN_COUNTERS}
    if "last_ef" in after:
        out["last_ef"] = after["last_ef"]
    return out


def _planner_estimate(handler, filters) -> float | None:
    """The PostgreSQL planner's row estimate for ``filters`` (what the pgvector handler's plan choice starts from);
    ``None`` for other backends."""
    if not hasattr(handler, "_estimated_rows"):
        return None
    from app.vectordb.pgvector import filter_sql

    where, params = filter_sql(filters)
    return handler._run(lambda conn: handler._estimated_rows(conn, where, params))


def _first_searches_ms(handler, queries: np.ndarray, filters, n: int = 100) -> list[float]:
    """pgvector: latency (ms) of ``n`` searches that each find ``filters`` new to the handler (what it knew of the
    filter's rows forgotten first, so each one estimates and counts them again, as the first search of a filter
    does); the other searches of :func:`measure_filtered` reuse the count for its TTL. Empty for other backends."""
    known = getattr(handler, "_filter_rows", None)
    if known is None:
        return []
    ms = []
    for q in queries[:n]:
        known.clear()
        t = time.perf_counter()
        handler.search(q, TOP_K, filters)
        ms.append((time.perf_counter() - t) * 1000)
    return ms


def measure_filtered(args, open_handler, data: np.ndarray, queries: np.ndarray, meta: SyntheticMetadata) -> list[dict]:
    """Per filter of ``meta`` (kind x selectivity) and per ``ef_search`` in ``args.filter_ef``: recall@10 of the
    filtered search against exact (numpy) filtered search over the matching rows, the share of searches that
    returned all 10 rows, latency (ms, client side, one search at a time after a warm-up), and on pgvector the
    planner's row estimate, which plan answered how many searches (and how many counted the filter's rows) and the
    latency of a filter's first search (``p50_first_ms``, :func:`_first_searches_ms`). Empty without
    ``--filter-selectivity``."""
    results = []
    for kind, s, filters, mask in meta.filters():
        rows = np.flatnonzero(mask)
        exact = rows[exact_top_k(data[rows], queries, TOP_K)]  # (Q, 10) row indices of the matching rows
        for ef in args.filter_ef:
            h = open_handler(ef)
            try:
                for q in queries[: min(len(queries), 20)]:  # warm-up
                    h.search(q, TOP_K, filters)
                estimate = _planner_estimate(h, filters)
                counts = getattr(h, "plan_counts", None)
                plans_before = counts() if counts else None
                ms, recalls, full = [], [], 0
                for qi, q in enumerate(queries):
                    t = time.perf_counter()
                    hits = h.search(q, TOP_K, filters)
                    ms.append((time.perf_counter() - t) * 1000)
                    assert all(filters.matches(hit.metadata) for hit in hits)
                    found = {int(hit.id, 16) for hit in hits}
                    recalls.append(len(found & set(exact[qi].tolist())) / TOP_K)
                    full += len(hits) == TOP_K
                plans = _plan_delta(plans_before, counts() if counts else None)
                first_before = counts() if counts else None
                first_ms = _first_searches_ms(h, queries, filters)
                first_plans = _plan_delta(first_before, counts() if counts else None)
            finally:
                h.close()
            p50, p95, _ = percentiles(ms)
            row = {
                "kind": kind,
                "selectivity": s,
                "matching": int(len(rows)),
                "ef_search": ef,
                "recall_at_10": round(float(np.mean(recalls)), 4),
                "full": round(full / len(queries), 4),
                "p50_ms": p50,
                "p95_ms": p95,
            }
            if first_ms:
                row["p50_first_ms"], row["p95_first_ms"], _ = percentiles(first_ms)
                row["first_plans"] = first_plans
            if estimate is not None:
                row["planner_estimate"] = round(estimate)
                row["plans"] = plans
            log(json.dumps(row))
            results.append(row)
    return results


def check_scan(args, open_handler, n: int, batch_size: int = 1000) -> dict | None:
    """With ``--check-scan``: read every row through ``scan`` of a new handler from ``open_handler()`` (timed).

    Returns ``rows`` read, ``distinct`` ids, ``complete`` (every id ``f"{i:064x}"`` for ``i < n`` came back exactly
    once, and nothing else), ``seconds`` wall time; ``None`` without ``--check-scan``.
    """
    if not args.check_scan:
        return None
    handler = open_handler()
    try:
        t0 = time.perf_counter()
        rows, seen = 0, set()
        for batch in handler.scan(batch_size=batch_size):
            rows += len(batch)
            seen.update(r.id for r in batch)
        seconds = time.perf_counter() - t0
    finally:
        handler.close()
    complete = rows == n and seen == {f"{i:064x}" for i in range(n)}
    log(f"scan: {rows:,} rows, {len(seen):,} distinct, complete={complete}, {seconds:.1f} s")
    return {"rows": rows, "distinct": len(seen), "complete": complete, "seconds": round(seconds, 1)}


def synthetic_records(vectors: np.ndarray, start: int, meta: SyntheticMetadata) -> list:
    """Rows ``start..`` as :class:`ImageRecord` (ids ``f"{i:064x}"``, the same metadata COPY writes)."""
    from app.vectordb.base import ImageMetadata, ImageRecord

    now = datetime.now(UTC)
    records = []
    for i, v in enumerate(vectors, start):
        filename, fmt, width, height, taken_at = meta.row(i)
        records.append(ImageRecord(f"{i:064x}", v, ImageMetadata(filename, fmt, width, height, 0, now, taken_at)))
    return records


def load_through_handler(handler, data: np.ndarray, batch_size: int, meta: SyntheticMetadata) -> float:
    """Upsert every row through the handler's own batched write path; returns the wall time in seconds."""
    t0 = time.perf_counter()
    for start in range(0, len(data), batch_size):
        handler.upsert(synthetic_records(data[start : start + batch_size], start, meta))
        done = min(start + batch_size, len(data))
        if done % 50_000 < batch_size or done == len(data):
            log(f"loaded {done:,}/{len(data):,}")
    return time.perf_counter() - t0


def run_pgvector(args, data: np.ndarray, queries: np.ndarray, exact: np.ndarray, tmp: Path) -> dict:
    import psycopg

    from app.vectordb.pgvector import PgVectorHandler

    pgdata, embedded = None, None
    url = os.environ.get("DATABASE_URL")
    if not url:
        from app.vectordb.embedded_pg import start_embedded_postgres

        pgdata = tmp / "pgdata"
        embedded = start_embedded_postgres(pgdata)
        url = embedded.url
    params = dict(hnsw_m=args.m, hnsw_ef_construction=args.ef_construction, vector_type=args.vector_type)
    try:
        loader = PgVectorHandler(url, pool_min=1, pool_max=1, **params)
        loader.ensure_collection(MODEL_ID, args.dim)
        if loader.count():
            raise SystemExit("the images table is not empty; point DATABASE_URL at an empty database")
        loader.drop_index()
        t0 = time.perf_counter()
        meta = SyntheticMetadata(len(data), args.filter_selectivity, args.seed, args.filter_kinds, args.metadata_order)
        for start in range(0, len(data), args.chunk):
            copy_rows(url, data[start : start + args.chunk], start, args.vector_type, meta)
            log(f"loaded {min(start + args.chunk, len(data)):,}/{len(data):,}")
            if start == 0 and args.bq == "calibrated":
                # What the service does at its 1,000th row (COPY bypasses upsert): median thresholds, one rewrite.
                loader.calibrate_bq()
                log("embedding_bq calibrated")
        load_s = time.perf_counter() - t0
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE images")
        log(f"building HNSW (m={args.m}, ef_construction={args.ef_construction}, {args.workers} workers)")
        t0 = time.perf_counter()
        loader.create_index(maintenance_work_mem=args.maintenance_work_mem, parallel_workers=args.workers)
        build_s = time.perf_counter() - t0
        log(f"built in {build_s:.1f} s")
        loader.close()
        if args.pg_shared_buffers:
            if embedded is None:  # the server at DATABASE_URL keeps its own shared_buffers (logged): only prewarm
                prewarm(url)
            else:
                embedded = restart_with_shared_buffers(embedded, pgdata, args.pg_shared_buffers)
                url = embedded.url
        with psycopg.connect(url) as conn:
            index_b, table_b = conn.execute(
                "SELECT pg_relation_size('images_embedding_hnsw'), pg_table_size('images')"
            ).fetchone()

        api_env = {"VECTOR_DB": "pgvector", "DATABASE_URL": url, "VECTOR_TYPE": args.vector_type}
        results = measure_searches(
            args,
            lambda ef: PgVectorHandler(url, pool_min=1, pool_max=1, ef_search=ef, **params),
            queries,
            exact,
            api_env,
            tmp,
        )
        filtered = measure_filtered(
            args,
            lambda ef: PgVectorHandler(url, pool_min=1, pool_max=1, ef_search=ef, **params),
            data,
            queries,
            meta,
        )
        api_filters = []
        if args.api and filtered and args.api_filter_queries > 0:
            api_filters = api_filtered(args, api_env, tmp / "app-data", data, queries, meta, replicas=2)
        scan = check_scan(args, lambda: PgVectorHandler(url, pool_min=1, pool_max=1, **params), len(data))
        pss = server_pss_mb(pgdata)
    finally:
        if embedded is not None:
            embedded.stop()
    return {
        "load_s": round(load_s, 1),
        "build_s": round(build_s, 1),
        "index_mb": round(index_b / 1e6, 1),
        "table_mb": round(table_b / 1e6, 1),
        "server_pss_mb": pss,
        "results": results,
        "filtered": filtered,
        "api_filtered": api_filters,
        "scan": scan,
    }


def _dir_bytes(root: Path, only=lambda p: True) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and only(p))


def run_milvus(args, data: np.ndarray, queries: np.ndarray, exact: np.ndarray, tmp: Path) -> dict:
    from app.vectordb.milvus import MilvusHandler

    server_uri = os.environ.get("MILVUS_URI", "")
    lite = not server_uri.startswith(("http://", "https://"))
    uri = str(tmp / "milvus.db") if lite else server_uri
    collection = "images" if lite else f"bench_{uuid.uuid4().hex[:12]}"
    params = dict(collection=collection, hnsw_m=args.m, hnsw_ef_construction=args.ef_construction, timeout_s=600)
    loader = MilvusHandler(uri, **params)
    try:
        loader.ensure_collection(MODEL_ID, args.dim)
        meta = SyntheticMetadata(len(data), args.filter_selectivity, args.seed, args.filter_kinds, args.metadata_order)
        load_s = load_through_handler(loader, data, args.batch_size, meta)
        log("waiting for Milvus to seal, compact and index every segment")
        t0 = time.perf_counter()
        loader.close()  # Lite: stopping the last client of a database waits for its background index builds
        reopened = MilvusHandler(uri, **params)  # loads the collection: reads (or builds) every segment's index
        reopened.close()
        build_s = time.perf_counter() - t0
        log(f"indexed in {build_s:.1f} s")
        index_b = table_b = None
        if lite:
            index_b = _dir_bytes(Path(uri), lambda p: "index" in p.relative_to(uri).as_posix())
            table_b = _dir_bytes(Path(uri))
        api_env = {"VECTOR_DB": "milvus", "MILVUS_URI": uri} if lite else None  # a server collection: not "images"
        results = measure_searches(
            args, lambda ef: MilvusHandler(uri, ef_search=ef, **params), queries, exact, api_env, tmp
        )
        filtered = measure_filtered(args, lambda ef: MilvusHandler(uri, ef_search=ef, **params), data, queries, meta)
        scan = check_scan(args, lambda: MilvusHandler(uri, **params), len(data))
    finally:
        loader.close()
        if not lite:
            from pymilvus import MilvusClient

            client = MilvusClient(uri=uri, token=os.environ.get("MILVUS_TOKEN", ""))
            client.drop_collection(collection)
            client.close()
    return {
        "load_s": round(load_s, 1),
        "build_s": round(build_s, 1),
        "index_mb": None if index_b is None else round(index_b / 1e6, 1),
        "table_mb": None if table_b is None else round(table_b / 1e6, 1),
        "server_pss_mb": None,
        "results": results,
        "filtered": filtered,
        "scan": scan,
    }


def run_manticore(args, data: np.ndarray, queries: np.ndarray, exact: np.ndarray, tmp: Path) -> dict:
    import pymysql

    from app.vectordb.manticore import ManticoreHandler

    host = os.environ.get("MANTICORE_HOST")
    if not host:
        raise SystemExit("--backend manticore needs MANTICORE_HOST (and MANTICORE_PORT) of a running engine")
    port = int(os.environ.get("MANTICORE_PORT", "9306"))
    table = f"bench_{uuid.uuid4().hex[:12]}"
    params = dict(table=table, hnsw_m=args.m, hnsw_ef_construction=args.ef_construction, timeout_s=60)
    loader = ManticoreHandler(host, port, **params)
    try:
        loader.ensure_collection(MODEL_ID, args.dim)
        meta = SyntheticMetadata(len(data), args.filter_selectivity, args.seed, args.filter_kinds, args.metadata_order)
        load_s = load_through_handler(loader, data, args.batch_size, meta)
        loader.close()
        t0 = time.perf_counter()
        with pymysql.connect(host=host, port=port, autocommit=True, read_timeout=3600) as conn, conn.cursor() as cur:
            cur.execute(f"FLUSH RAMCHUNK {table}")  # into a disk chunk, where the HNSW graph is built
            cutoff = f"cutoff={int(args.optimize_cutoff)}, " if args.optimize_cutoff > 0 else ""
            cur.execute(f"OPTIMIZE TABLE {table} OPTION {cutoff}sync=1")
            build_s = time.perf_counter() - t0
            cur.execute(f"SHOW TABLE {table} STATUS")
            status = {str(k): v for k, v in cur.fetchall()}
        table_b = int(status.get("disk_bytes", 0)) or None
        disk_chunks = int(status["disk_chunks"]) if str(status.get("disk_chunks", "")).isdigit() else None
        results = measure_searches(
            args, lambda ef: ManticoreHandler(host, port, ef_search=ef, **params), queries, exact, None, tmp
        )
        filtered = measure_filtered(
            args, lambda ef: ManticoreHandler(host, port, ef_search=ef, **params), data, queries, meta
        )
        scan = check_scan(args, lambda: ManticoreHandler(host, port, **params), len(data))
    finally:
        loader.close()
        with pymysql.connect(host=host, port=port, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"DROP TABLE IF EXISTS {table}_meta")
    return {
        "load_s": round(load_s, 1),
        "build_s": round(build_s, 1),
        "index_mb": None,
        "table_mb": None if table_b is None else round(table_b / 1e6, 1),
        "optimize_cutoff": args.optimize_cutoff or None,
        "disk_chunks": disk_chunks,
        "server_pss_mb": None,
        "results": results,
        "filtered": filtered,
        "scan": scan,
    }


RUNNERS = {"pgvector": run_pgvector, "milvus": run_milvus, "manticore": run_manticore}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(RUNNERS), default="pgvector")
    parser.add_argument("--n", type=int, default=100_000, help="vectors stored")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vector-type", choices=["vector", "halfvec"], default="vector", help="pgvector only")
    parser.add_argument("--queries", type=int, default=300, help="held-out queries, same mixture")
    parser.add_argument("--ef", type=lambda s: [int(x) for x in s.split(",")], default=[20, 40, 80, 160])
    parser.add_argument("--clusters", type=int, default=None, help="mixture centres (default: N/250, 50..5000)")
    from app.config import Settings

    defaults = Settings.model_fields  # the service's own build parameters, HNSW_M and HNSW_EF_CONSTRUCTION
    parser.add_argument("--m", type=int, default=defaults["hnsw_m"].default)
    parser.add_argument("--ef-construction", type=int, default=defaults["hnsw_ef_construction"].default)
    parser.add_argument("--maintenance-work-mem", default="8GB", help="pgvector index build only")
    parser.add_argument("--workers", type=int, default=2, help="max_parallel_maintenance_workers (pgvector build)")
    parser.add_argument("--chunk", type=int, default=50_000, help="rows per COPY (pgvector) and per generated block")
    parser.add_argument(
        "--bq",
        choices=("calibrated", "sign"),
        default="calibrated",
        help="pgvector: calibrate embedding_bq after the first chunk, as the service does at 1,000 rows "
        "(default), or keep plain sign bits (collections from before the calibration)",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per upsert (milvus, manticore)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-api", dest="api", action="store_false", help="skip the POST /search_vector pass")
    parser.add_argument("--check-scan", action="store_true", help="read every row back through scan(), timed")
    parser.add_argument(
        "--optimize-cutoff",
        type=int,
        default=1,
        help="manticore: OPTIMIZE ... OPTION cutoff=N after the load (1: one disk chunk; 0: the engine's default)",
    )
    parser.add_argument(
        "--filter-selectivity",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[],
        help="also search with a path_prefix filter keeping each of these fractions of the rows, e.g. 0.02,0.1,0.5",
    )
    parser.add_argument(
        "--filter-kinds",
        type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
        default=("folder",),
        help=f"which filters to measure per selectivity, of {','.join(FILTER_KINDS)} (default: folder)",
    )
    parser.add_argument(
        "--metadata-order",
        choices=("random", "clustered"),
        default="random",
        help="where a folder's and a date window's rows lie: scattered at random (default), or runs of consecutive "
        "rows as in a library indexed folder by folder (format and size stay random)",
    )
    parser.add_argument(
        "--api-filter-queries",
        type=int,
        default=50,
        help="pgvector: queries per filter through POST /search_vector of two replica servers (0: skip)",
    )
    parser.add_argument(
        "--pg-shared-buffers",
        default=None,
        help="pgvector, embedded server: shared_buffers for the searches (e.g. 4GB; the server is restarted after "
        "the build and the table and indexes prewarmed); default: the server's own (128MB). With DATABASE_URL the "
        "server keeps its own setting (logged) and the table and indexes are prewarmed",
    )
    parser.add_argument("--pg-exact-max-rows", type=int, default=None, help="pgvector EXACT_SEARCH_MAX_ROWS override")
    parser.add_argument(
        "--pg-iterative-scan", choices=["strict_order", "relaxed_order"], default=None, help="pgvector override"
    )
    parser.add_argument(
        "--pg-iterative-ef-per-result",
        type=float,
        default=None,
        help="pgvector ITERATIVE_EF_PER_RESULT(_STRONG) override (0: an iterative scan's hnsw.ef_search is --filter-ef "
        "itself)",
    )
    parser.add_argument("--lite-filter-ef-factor", type=int, default=None, help="Milvus Lite LITE_FILTER_EF_FACTOR")
    parser.add_argument(
        "--filter-ef",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="ef_search values of the filtered searches (default: --ef)",
    )
    parser.add_argument(
        "--compare-halfvec",
        action="store_true",
        help="after the --vector-type vector pass, run again with halfvec on the same vectors and queries, and add "
        "its sizes and recall (against the same exact float32 top-10) to the JSON line under 'halfvec'",
    )
    args = parser.parse_args()
    if args.compare_halfvec and (args.vector_type != "vector" or args.backend != "pgvector"):
        parser.error("--compare-halfvec compares against --backend pgvector --vector-type vector")
    clusters = args.clusters or default_clusters(args.n)
    if any(not 0 < s < 1 for s in args.filter_selectivity):
        parser.error("--filter-selectivity takes fractions strictly between 0 and 1")
    if any(k not in FILTER_KINDS for k in args.filter_kinds):
        parser.error(f"--filter-kinds takes {', '.join(FILTER_KINDS)}")
    if args.filter_ef is None:
        args.filter_ef = args.ef
    filter_plan = apply_filter_plan(args)

    t0 = time.perf_counter()
    data, queries = synthetic_data(args.n, args.dim, args.seed, args.chunk, args.queries, clusters)
    exact = exact_top_k(data, queries, TOP_K)
    log(
        f"generated {args.n:,} x {args.dim} ({clusters} clusters) + exact top-{TOP_K} "
        f"in {time.perf_counter() - t0:.1f} s"
    )

    with tempfile.TemporaryDirectory(prefix="bench-search-scale-") as tmp:
        out = RUNNERS[args.backend](args, data, queries, exact, Path(tmp))
    line = {
        "benchmark": "search_scale",
        "backend": args.backend,
        "vector_type": args.vector_type if args.backend == "pgvector" else "float32",
        "n": args.n,
        "dim": args.dim,
        "clusters": clusters,
        "queries": args.queries,
        "m": args.m,
        "ef_construction": args.ef_construction,
        "workers": args.workers,
        "pg_shared_buffers": args.pg_shared_buffers if args.backend == "pgvector" else None,
        "bq": args.bq if args.backend == "pgvector" else None,
        "metadata_order": args.metadata_order if args.filter_selectivity else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **{k: out[k] for k in ("load_s", "build_s", "index_mb", "table_mb", "server_pss_mb")},
        "results": out["results"],
    }
    if out["filtered"]:
        line["filter_plan"] = filter_plan
        line["filtered"] = out["filtered"]
    if out.get("api_filtered"):
        line["api_filtered"] = out["api_filtered"]
    if out["scan"] is not None:
        line["scan"] = out["scan"]
    if args.compare_halfvec:
        args.vector_type = "halfvec"
        with tempfile.TemporaryDirectory(prefix="bench-search-scale-") as tmp:
            half = run_pgvector(args, data, queries, exact, Path(tmp))
        line["halfvec"] = {k: half[k] for k in ("load_s", "build_s", "index_mb", "table_mb", "results")}
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
