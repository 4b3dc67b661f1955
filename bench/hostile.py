#!/usr/bin/env python
"""Memory under hostile input: eight concurrent distinct 100 MP PNGs against a live server, as one JSON line.

Starts its own server (``python -m app``, embedded PostgreSQL, offline model) on a loopback port with a temporary
``DATA_DIR``, generates ``--n`` distinct PNGs of ``--megapixels`` each (coloured blocks with a per-image pattern:
compressible, so each is a few hundred KB, while decoding each takes 3 bytes per pixel), and posts them all at once
to ``POST /index_image``. It samples the server process's RSS every 50 ms (the embedded PostgreSQL's processes are
not counted: they hold no decoded images).

Reports: ``idle_rss_mb`` (after start-up and one warm-up search), ``peak_rss_mb`` and ``peak_over_idle_mb``,
``rss_after_mb``/``after_over_idle_mb`` ``--settle-s`` seconds after the last answer, the answers by status, and
whether the targets of issue #8 hold: peak <= idle + 1.5 GB, after <= idle + 300 MB, every request answered with a
2xx or a 503 (none lost).

``--format`` sends images of another format and mode instead (``webp_rgba``, ``png_rgba``, ``tiff_f``, ``gif_p``,
``heic_rgb``, ``avif_rgb``... as in ``bench/decode_cost.py``); ``--project-root`` runs the server from another
checkout (e.g. ``git archive main | tar -x -C /tmp/base``), so that a change and its baseline run on the same
machine in one session.

Usage: python bench/hostile.py [--n 8] [--megapixels 100] [--format png_blocks] [--settle-s 30]
       [--model-cache-dir DIR] [--png-dir DIR] [--project-root DIR]
       [--env NAME=VALUE ...]   (extra server settings, e.g. MAX_DECODE_PIXELS_IN_FLIGHT=200000000)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
from live_server import free_port, server_env, start_server, stop_server, wait_healthy  # bench/ is on sys.path
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PEAK_TARGET_MB = 1500
AFTER_TARGET_MB = 300


def make_png(seed: int, megapixels: float) -> bytes:
    """A distinct, compressible RGB PNG of about ``megapixels`` MP: a grid of random colour blocks."""
    side = int((megapixels * 1_000_000) ** 0.5)
    rng = np.random.default_rng(seed)
    cells = 50
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    block = -(-side // cells)
    pixels = np.repeat(np.repeat(grid, block, axis=0), block, axis=1)[:side, :side]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=6)
    return out.getvalue()


class RssSampler(threading.Thread):
    """Peak RSS of one process, sampled every ``interval_s`` seconds until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)


def mb(n_bytes: int) -> int:
    return round(n_bytes / 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="concurrent requests, one distinct PNG each")
    parser.add_argument("--megapixels", type=float, default=100.0)
    parser.add_argument("--settle-s", type=float, default=30.0, help="wait before the 'after' RSS sample")
    parser.add_argument("--model-cache-dir", type=Path, default=Path(os.environ.get("MODEL_CACHE_DIR", "data/models")))
    parser.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE")
    parser.add_argument("--png-dir", type=Path, help="keep the generated images here and reuse them on later runs")
    parser.add_argument(
        "--format", default="png_blocks", help="png_blocks (RGB PNG), or a case of bench/decode_cost.py (webp_rgba...)"
    )
    parser.add_argument("--project-root", type=Path, default=PROJECT_ROOT, help="checkout the server runs from")
    args = parser.parse_args()

    started = time.monotonic()
    pngs = []
    for seed in range(args.n):
        name = "" if args.format == "png_blocks" else f"{args.format}-"
        cached = args.png_dir / f"hostile-{name}{args.megapixels:g}mp-{seed}.img" if args.png_dir else None
        if cached is not None and cached.exists():
            pngs.append(cached.read_bytes())
            continue
        if args.format == "png_blocks":
            pngs.append(make_png(seed, args.megapixels))
        else:
            from decode_cost import make_case  # bench/ is on sys.path when this runs as a script

            pngs.append(make_case(args.format, args.megapixels, seed=seed))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(pngs[-1])
    generate_s = time.monotonic() - started

    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = server_env(
            tmp,
            port,
            project_root=args.project_root,
            model_cache_dir=args.model_cache_dir,
            log_level="WARNING",
            MAX_UPLOAD_MB="50",
        )
        env.update(dict(item.split("=", 1) for item in args.env))
        server = start_server(env, tmp)
        try:
            wait_healthy(url, server)
            warm = make_png(1000, 0.25)
            httpx.post(f"{url}/search_image", files={"file": ("warm.png", warm)}, timeout=60).raise_for_status()
            time.sleep(2.0)
            idle = psutil.Process(server.pid).memory_info().rss

            sampler = RssSampler(server.pid)
            sampler.start()
            statuses: list[int | str] = [""] * len(pngs)
            latencies: list[float] = [0.0] * len(pngs)
            details: set[str] = set()  # why requests were refused

            def post(i: int) -> None:
                t0 = time.monotonic()
                try:
                    r = httpx.post(f"{url}/index_image", files={"file": (f"big{i}.img", pngs[i])}, timeout=600)
                    statuses[i] = r.status_code
                    if r.status_code >= 400:
                        details.add(f"{r.status_code}: {r.json().get('detail', '')[:120]}")
                except httpx.HTTPError as exc:
                    statuses[i] = type(exc).__name__
                latencies[i] = time.monotonic() - t0

            t0 = time.monotonic()
            threads = [threading.Thread(target=post, args=(i,)) for i in range(len(pngs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            burst_s = time.monotonic() - t0
            time.sleep(args.settle_s)
            sampler.stop_event.set()
            sampler.join()
            after = psutil.Process(server.pid).memory_info().rss
        finally:
            stop_server(server)

    answered = [s for s in statuses if isinstance(s, int)]
    ok = [s for s in answered if 200 <= s < 300 or s == 503]
    by_status: dict[str, int] = {}
    for s in statuses:
        by_status[str(s)] = by_status.get(str(s), 0) + 1
    result = {
        "bench": "hostile",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "n": args.n,
        "megapixels": args.megapixels,
        "format": args.format,
        "project_root": str(args.project_root),
        "png_kb": [round(len(p) / 1000) for p in pngs],
        "generate_s": round(generate_s, 1),
        "settings": dict(item.split("=", 1) for item in args.env),
        "idle_rss_mb": mb(idle),
        "peak_rss_mb": mb(sampler.peak),
        "peak_over_idle_mb": mb(sampler.peak - idle),
        "rss_after_mb": mb(after),
        "after_over_idle_mb": mb(after - idle),
        "settle_s": args.settle_s,
        "burst_s": round(burst_s, 1),
        "latency_s": sorted(round(x, 1) for x in latencies),
        "statuses": by_status,
        "refusals": sorted(details),
        "lost": len(statuses) - len(ok),
        "meets_targets": bool(
            sampler.peak - idle <= PEAK_TARGET_MB * 1e6
            and after - idle <= AFTER_TARGET_MB * 1e6
            and len(ok) == len(statuses)
        ),
    }
    print(json.dumps(result))
    return 0 if result["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
