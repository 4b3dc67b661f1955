#!/usr/bin/env python
"""The embedding cache on a skewed query stream: hit rate per layer and search latency, as one JSON line.

A stream of ``--queries`` image searches draws from ``--images`` real photos of ``caltech101_subset`` with Zipf
probabilities (rank r is asked with probability proportional to 1/r^s, ``--zipf-s``, 1.0 by default: the classic
skew of query logs and web requests, Breslau et al., "Web caching and Zipf-like distributions", INFOCOM 1999; the
ranks are a seeded random permutation of the photos). ``--indexed`` of the photos are indexed first, so the
stored-vector layer (L3) is asked too. The stream goes round-robin to ``--replicas`` services on one embedded
PostgreSQL (two API processes behind a load balancer), each with its own memory layer of ``--memory`` entries;
the hybrid variants share one real ``redis-server`` (started here on a loopback port, flushed before each variant).

Variants, in one run on one machine (compare them with each other, not with other runs):
- ``no_cache``: QUERY_CACHE_SIZE=0, no Redis (L3 still applies): the first ``--no-cache-queries`` of the stream
  only, since nearly every query runs decode + model;
- ``memory_lru`` / ``memory_lfu``: memory only (CACHE_POLICY lru / lfu);
- ``hybrid_lru`` / ``hybrid_lfu``: memory + Redis.

Each search is :meth:`SearchService.search_image` called in this process, one at a time (no HTTP): its wall time
is the latency. Reported per variant: ``hit_rate`` (queries no layer answered are the misses), each layer's hits
and hit rate, ``p50_ms``/``p95_ms`` of all searches, ``p50_cached_ms`` (searches a layer answered) and
``p50_uncached_ms`` (decode + model), and ``cached_over_uncached`` (their ratio; the aim is <= 0.10).

Usage: python bench/cache.py [--images 2000] [--queries 10000] [--memory 256] [--replicas 2] [--indexed 200]
       [--zipf-s 1.0] [--shift-every 0] [--no-cache-queries 1000] [--variants a,b,...] [--model-cache-dir DIR]

``--shift-every N`` draws a new popularity order every N queries (what was popular stops being asked): the case
where an LFU without ageing keeps stale favourites, to weigh CACHE_POLICY against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(message: str) -> None:
    print(f"[cache] {message}", file=sys.stderr, flush=True)


def zipf_stream(n_items: int, n_queries: int, s: float, seed: int, shift_every: int = 0) -> np.ndarray:
    """``(n_queries,)`` int indices into ``n_items``: rank r (1-based) drawn with p ∝ r^-s, ranks permuted; with
    ``shift_every`` > 0 the permutation is drawn anew every that many queries (popularity moves on)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** s
    ranks = rng.choice(n_items, size=n_queries, p=p / p.sum())
    block = shift_every or n_queries
    return np.concatenate(
        [rng.permutation(n_items)[ranks[start : start + block]] for start in range(0, n_queries, block)]
    )


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """Nearest-rank percentile in ms, or None without samples."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return round(ordered[max(0, int(np.ceil(q * len(ordered))) - 1)] * 1000, 2)


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port (no persistence); returns it and its URL."""
    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


def run_variant(name, settings_list, embedder, stream, payloads) -> dict:
    """Run ``stream`` round-robin over one service per settings object; the variant's figures."""
    from app.service import SearchService

    services = [SearchService.open(s, embedder=embedder) for s in settings_list]
    times, cached, uncached = [], [], []
    try:
        t0 = time.perf_counter()
        for i, item in enumerate(stream):
            service = services[i % len(services)]
            before = service.cache.stats().computed
            start = time.perf_counter()
            service.search_image(payloads[item], top_k=10)
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            (uncached if service.cache.stats().computed > before else cached).append(elapsed)
        wall_s = time.perf_counter() - t0
        stats = [s.cache.stats() for s in services]
    finally:
        for service in services:
            service.close()
    lookups = sum(s.lookups for s in stats)
    computed = sum(s.computed for s in stats)
    layers = {}
    for layer in ("memory", "redis", "store"):
        parts = [getattr(s, layer) for s in stats if getattr(s, layer) is not None]
        if not parts:
            continue
        hits, misses = sum(p.hits for p in parts), sum(p.misses for p in parts)
        layers[layer] = {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "share_of_queries": round(hits / lookups, 4) if lookups else 0.0,
        }
    p50_cached, p50_uncached = percentile_ms(cached, 0.5), percentile_ms(uncached, 0.5)
    result = {
        "queries": len(stream),
        "hit_rate": round((lookups - computed) / lookups, 4) if lookups else 0.0,
        "computed": computed,
        "layers": layers,
        "p50_ms": percentile_ms(times, 0.5),
        "p95_ms": percentile_ms(times, 0.95),
        "p50_cached_ms": p50_cached,
        "p50_uncached_ms": p50_uncached,
        "cached_over_uncached": round(p50_cached / p50_uncached, 4) if p50_cached and p50_uncached else None,
        "wall_s": round(wall_s, 1),
    }
    log(f"{name}: {json.dumps(result)}")
    return result


def main() -> int:
    from app.config import Settings
    from app.embedders import load_embedder
    from app.service import SearchService

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "caltech101_subset")
    parser.add_argument("--images", type=int, default=2000, help="photos the stream draws from")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument(
        "--shift-every", type=int, default=0, help="new popularity order every N queries (0: one order throughout)"
    )
    parser.add_argument("--memory", type=int, default=256, help="QUERY_CACHE_SIZE of each replica")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--indexed", type=int, default=200, help="photos indexed first (the L3 layer)")
    parser.add_argument("--no-cache-queries", type=int, default=1000)
    parser.add_argument("--variants", default="no_cache,memory_lru,memory_lfu,hybrid_lru,hybrid_lfu")
    parser.add_argument("--model-cache-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = sorted((args.dataset / "images").rglob("*.jpg"))
    if len(files) < args.images:
        log(f"only {len(files)} photos in {args.dataset}: using them all")
    files = files[: args.images]
    payloads = [f.read_bytes() for f in files]
    stream = zipf_stream(len(payloads), args.queries, args.zipf_s, args.seed, args.shift_every)
    log(f"{len(payloads)} photos, {args.queries} queries, {len(np.unique(stream))} distinct")

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        tmp = Path(tmp)
        from app.vectordb.embedded_pg import start_embedded_postgres

        embedded = start_embedded_postgres(tmp / "pgdata")
        redis_proc, redis_url = start_redis(tmp)
        try:
            model_cache = args.model_cache_dir or tmp / "models"
            base = dict(
                _env_file=None,
                data_dir=tmp / "data",
                database_url=embedded.url,
                embedder="efficientnet",
                model_cache_dir=model_cache,
            )
            embedder = load_embedder(Settings(**base))
            indexer = SearchService.open(Settings(**base), embedder=embedder)
            try:
                rng = np.random.default_rng(args.seed + 1)
                chosen = rng.choice(len(payloads), size=min(args.indexed, len(payloads)), replace=False)
                for start in range(0, len(chosen), 32):
                    indexer.index_images([(payloads[i], files[i].name) for i in chosen[start : start + 32]])
            finally:
                indexer.close()
            log(f"indexed {len(chosen)} photos")

            import redis

            flush = redis.Redis.from_url(redis_url)
            results = {}
            for name in args.variants.split(","):
                flush.flushall()
                overrides: dict = {"query_cache_size": args.memory}
                stream_part = stream
                if name == "no_cache":
                    overrides = {"query_cache_size": 0}
                    stream_part = stream[: args.no_cache_queries]
                else:
                    overrides["cache_policy"] = name.split("_")[1]
                    if name.startswith("hybrid"):
                        overrides["cache_redis_url"] = redis_url
                settings = [Settings(**base, **overrides) for _ in range(args.replicas)]
                results[name] = run_variant(name, settings, embedder, stream_part, payloads)
            flush.close()
        finally:
            redis_proc.kill()
            redis_proc.wait()
            embedded.stop()

    print(
        json.dumps(
            {
                "bench": "cache",
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                f"{platform.python_version()}",
                "loadavg": [round(x, 2) for x in os.getloadavg()],
                "images": len(payloads),
                "queries": args.queries,
                "distinct": int(len(np.unique(stream))),
                "zipf_s": args.zipf_s,
                "shift_every": args.shift_every,
                "replicas": args.replicas,
                "memory_entries": args.memory,
                "indexed": int(len(chosen)),
                "model": embedder.model_id,
                "variants": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
