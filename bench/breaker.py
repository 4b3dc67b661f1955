#!/usr/bin/env python
"""False openings of the Redis cache breaker on a busy host, before and after the confirming PING, as one JSON line.

Starts one real ``redis-server`` on a loopback port (healthy throughout: never stopped or slowed by the bench) and
``--busy`` processes that only spin the CPU (by default four per CPU core: a host far busier than its cores, as
during a bulk load or beside another service). Then, for each variant, ``--threads`` threads run ``--lookups``
lookups in all through :class:`app.cache.redis_layer.RedisLayer` (GET of a stored embedding, a short sleep between
lookups, like request threads) with the default ``CACHE_REDIS_TIMEOUT_MS`` (50 ms) and
``CACHE_BREAKER_FAILURES`` (3):

- ``before``: ``confirm_timeout_s=0``, the rule before issue #27: three consecutive failed commands open the
  breaker at once;
- ``after``: the threshold first runs one PING with ``CACHE_BREAKER_CONFIRM_MS`` (``--confirm-ms``, 250 by
  default); only a Redis that misses that too opens the breaker.

Both variants run at the same time in each of ``--rounds`` rounds (``--threads`` threads each, on the same Redis
under the same load), so they see the same host at the same moments. Redis is healthy, so
every opening is false: ``opens`` (breaker openings), ``false_open_rate`` (openings per 1,000 lookups),
``open_s`` (seconds the breaker was open, the time ``/health`` said ``cache: degraded``), ``timeouts`` (failed
commands), ``confirmed_ok`` (thresholds a confirming PING answered), ``skipped`` (lookups that did not try Redis
because the breaker was open), and lookup latency ``p50_ms``/``p99_ms``/``max_ms``. Also ``hung_detect_ms``: with
the load still on, Redis is stopped (SIGSTOP) and each variant's lookups run until the breaker opens: the time from
the stop to the opening (a Redis that is really down must still be detected fast), then SIGCONT.

Usage: python bench/breaker.py [--busy N] [--threads 16] [--lookups 4000] [--rounds 3] [--confirm-ms 250]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.cache.keys import encode  # noqa: E402
from app.cache.redis_layer import RedisLayer  # noqa: E402
from tests.helpers import RedisServer  # noqa: E402

DIM = 512


def log(message: str) -> None:
    print(f"[breaker] {message}", file=sys.stderr, flush=True)


def spin(stop) -> None:  # noqa: ANN001 - a multiprocessing Event
    """Burn one CPU until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for _ in range(200_000):
            x += 1


def make_layer(url: str, confirm_ms: float) -> RedisLayer:
    layer = RedisLayer(url, DIM, ttl_s=600, timeout_s=0.05, failure_threshold=3, retry_s=2.0,
                       confirm_timeout_s=confirm_ms / 1000)  # fmt: skip
    layer.start()
    return layer


def run_lookups(layer: RedisLayer, threads: int, lookups: int) -> dict:
    """``lookups`` GETs over ``threads`` threads; counts openings and the time the breaker was open."""
    opens: list[float] = []
    open_s = 0.0
    original = layer._opened

    def opened(error: BaseException) -> None:
        opens.append(time.monotonic())
        log(f"opened: {error}")
        original(error)

    layer.breaker._on_open = opened
    latencies: list[float] = []
    lock = threading.Lock()
    stop_watch = threading.Event()

    def watch() -> None:  # the time /health would have said degraded
        nonlocal open_s
        while not stop_watch.wait(0.005):
            if layer.breaker.is_open:
                open_s += 0.005

    def worker(n: int) -> None:
        own = []
        for i in range(n):
            start = time.perf_counter()
            layer.get(f"bench:breaker:{i % 64}")
            own.append(time.perf_counter() - start)
            time.sleep(0.002)
        with lock:
            latencies.extend(own)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    pool = [threading.Thread(target=worker, args=(lookups // threads,)) for _ in range(threads)]
    before = layer.stats()
    alarms = layer.breaker.false_alarms
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    stop_watch.set()
    watcher.join()
    after = layer.stats()
    latencies.sort()
    return {
        "lookups": len(latencies),
        "opens": len(opens),
        "open_s": round(open_s, 2),
        "timeouts": after.errors - before.errors,
        "confirmed_ok": layer.breaker.false_alarms - alarms,
        "skipped": after.skipped - before.skipped,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[int(0.99 * len(latencies)) - 1] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
    }


def run_into(results: dict, name: str, layer: RedisLayer, threads: int, lookups: int) -> None:
    results[name] = run_lookups(layer, threads, lookups)


def hung_detect_ms(server: RedisServer, layers: dict[str, RedisLayer]) -> dict[str, float]:
    """SIGSTOP Redis; per variant, one thread looks up until the breaker opens: ms from the stop to the opening."""
    result = {}
    server.pause()
    try:
        for name, layer in layers.items():
            start = time.perf_counter()
            while not layer.breaker.is_open and time.perf_counter() - start < 10:
                layer.get("bench:breaker:0")
            result[name] = round((time.perf_counter() - start) * 1000, 1)
    finally:
        server.resume()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=4 * (os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--lookups", type=int, default=4000, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--confirm-ms", type=float, default=250.0)
    args = parser.parse_args()

    stop = mp.Event()
    busy = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    totals = {name: {} for name in ("before", "after")}
    try:
        with RedisServer(Path(tempfile.mkdtemp(prefix="bench-breaker-"))) as server:
            client = server.client()
            vector = np.ones(DIM, np.float32) / np.sqrt(DIM)
            for i in range(64):
                client.set(f"bench:breaker:{i}", encode(vector))
            for process in busy:
                process.start()
            time.sleep(1.0)
            log(f"{args.busy} busy processes on {os.cpu_count()} CPUs; load {os.getloadavg()}")
            for round_ in range(args.rounds):
                layers = {
                    name: make_layer(server.url, ms) for name, ms in (("before", 0.0), ("after", args.confirm_ms))
                }
                results: dict[str, dict] = {}
                runs = [
                    threading.Thread(target=run_into, args=(results, name, layer, args.threads, args.lookups))
                    for name, layer in layers.items()
                ]
                try:
                    for run in runs:  # both variants at once: the same host, the same moments of load
                        run.start()
                    for run in runs:
                        run.join()
                finally:
                    for layer in layers.values():
                        layer.close()
                for name, result in results.items():
                    log(f"round {round_ + 1} {name}: {result}")
                    for key, value in result.items():
                        if key in ("p50_ms", "p99_ms", "max_ms"):
                            totals[name].setdefault(key, []).append(value)
                        else:
                            totals[name][key] = totals[name].get(key, 0) + value
            layers = {name: make_layer(server.url, ms) for name, ms in (("before", 0.0), ("after", args.confirm_ms))}
            try:
                detect = hung_detect_ms(server, layers)
            finally:
                for layer in layers.values():
                    layer.close()
            load = os.getloadavg()
    finally:
        stop.set()
        for process in busy:
            process.join(timeout=10)
    for name, total in totals.items():
        total["false_open_rate"] = round(1000 * total["opens"] / max(1, total["lookups"]), 3)
        for key in ("p50_ms", "p99_ms", "max_ms"):
            total[key] = max(total[key])  # the worst round
        total["hung_detect_ms"] = detect[name]
    result = {
        "bench": "breaker",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "loadavg_1m_end": round(load[0], 2),
        "busy_processes": args.busy,
        "threads": args.threads,
        "rounds": args.rounds,
        "timeout_ms": 50,
        "failure_threshold": 3,
        "confirm_ms": args.confirm_ms,
        **totals,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
