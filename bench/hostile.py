#!/usr/bin/env python
"""Memory under hostile input: bursts of concurrent hostile uploads against a live server, as one JSON line.

Starts its own server (``python -m app``, embedded PostgreSQL, offline model) on a loopback port with a temporary
``DATA_DIR``, optionally indexes ``--baseline-photos`` real photos first (``POST /index_images``, 32 per request,
from ``../shared/datasets``: the issue #27 finding was that the bound held only from a fresh start), then, for each
class of ``--format`` in turn, posts ``--n`` distinct files of that class all at once to ``POST /index_image`` and
measures the server process's peak RSS during the burst (its kernel high-water mark ``VmHWM``, reset before each
burst through ``/proc/<pid>/clear_refs``, and an RSS sampled every 50 ms; the embedded PostgreSQL's processes are not
counted: they hold no decoded images) and its RSS ``--settle-s`` seconds after the last answer.

Classes (``--format``, comma-separated; each file is one base image made once, made distinct per request by a few
trailing bytes, which every decoder ignores):

- ``png_blocks``: an RGB PNG of ``--megapixels`` MP (default 100, ``MAX_IMAGE_PIXELS``), coloured blocks: a few
  hundred KB.
- ``png_truncated``: the same PNG cut to its first 10 %: the header claims 100 MP, the data stops early.
- ``jpeg_progressive``: a 100 MP progressive JPEG (4:4:4); libjpeg keeps every DCT coefficient of the whole image
  while it decodes one, whatever the draft scale: about 6 bytes per pixel.
- ``jpeg_progressive_partial``: the same, cut to its first half (a partial download).
- ``webp_8k``, ``avif_8k``, ``heic_8k``: 7680 x 4320 (33 MP) lossy RGB.
- ``tiff_100mp``: a 100 MP RGB TIFF (deflate).
- ``gif_animated``, ``png_animated``: three 33 MP frames (the decoder reads the first).
- any case of ``bench/decode_cost.py`` (``webp_rgba``, ``tiff_f``...) at ``--megapixels``.

Reports per class: ``peak_rss_mb``, ``rss_before_mb`` (just before the burst), ``rss_after_mb``, answers by status,
refusal messages and ``lost`` (requests answered with neither 2xx, 4xx nor 503: a 500 or no answer). Overall:
``baseline_rss_mb`` (after start-up, the baseline indexing and one search), ``indexing_peak_rss_mb`` and whether the
targets of issue #27 hold: every burst's peak <= ``--peak-target-mb`` (1500) in absolute terms, every "after" within
300 MB of the RSS before the burst, nothing lost.

``--project-root`` runs the server from another checkout (e.g. ``git archive main | tar -x -C /tmp/base``), so that a
change and its baseline run on the same machine in one session.

Usage: python bench/hostile.py [--n 32] [--format png_blocks,png_truncated,...] [--megapixels 100]
       [--baseline-photos 2000] [--settle-s 10] [--peak-target-mb 1500]
       [--model-cache-dir DIR] [--png-dir DIR] [--project-root DIR]
       [--env NAME=VALUE ...]   (extra server settings, e.g. MEMORY_LIMIT_MB=1200)
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
from live_server import (  # bench/ is on sys.path
    baseline_photos,
    free_port,
    index_photos,
    server_env,
    start_server,
    stop_server,
    wait_healthy,
)
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
AFTER_TARGET_MB = 300
#: the classes of hostile input of issue #27, in the order they run by default
HOSTILE_CLASSES = [
    "png_blocks",
    "png_truncated",
    "jpeg_progressive",
    "jpeg_progressive_partial",
    "webp_8k",
    "avif_8k",
    "heic_8k",
    "tiff_100mp",
    "gif_animated",
    "png_animated",
]
SIZE_8K = (7680, 4320)


def _blocks(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    """Random colour blocks (a 50 x 50 grid): compressible like a hostile upload, distinct per ``seed``."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(50, 50, channels), dtype=np.uint8)
    side = max(width, height)
    block = -(-side // 50)
    pixels = np.repeat(np.repeat(grid, block, axis=0), block, axis=1)[:height, :width]
    return np.ascontiguousarray(pixels if channels > 1 else pixels[:, :, 0])


def make_png(seed: int, megapixels: float) -> bytes:
    """A distinct, compressible RGB PNG of about ``megapixels`` MP: a grid of random colour blocks."""
    side = int((megapixels * 1_000_000) ** 0.5)
    out = io.BytesIO()
    Image.fromarray(_blocks(side, side, 3, seed)).save(out, format="PNG", compress_level=6)
    return out.getvalue()


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _frames(seed: int) -> list[Image.Image]:
    return [Image.fromarray(_blocks(*SIZE_8K, 3, seed + i)) for i in range(3)]


def make_class(name: str, megapixels: float, seed: int = 0) -> bytes:
    """The bytes of one file of the hostile class ``name`` (see the module docstring)."""
    side = int((megapixels * 1_000_000) ** 0.5)
    if name == "png_blocks":
        return make_png(seed, megapixels)
    if name == "png_truncated":
        data = make_png(seed, megapixels)
        return data[: len(data) // 10]
    if name in ("jpeg_progressive", "jpeg_progressive_partial"):
        image = Image.fromarray(_blocks(side, side, 3, seed))
        data = _save(image, "JPEG", quality=90, progressive=True, subsampling=0)
        return data if name == "jpeg_progressive" else data[: len(data) // 2]
    if name == "webp_8k":
        return _save(Image.fromarray(_blocks(*SIZE_8K, 3, seed)), "WEBP", quality=80, method=0)
    if name == "avif_8k":
        sys.path.insert(0, str(PROJECT_ROOT))
        from app.imaging.plugins import register_plugins

        register_plugins()
        return _save(Image.fromarray(_blocks(*SIZE_8K, 3, seed)), "AVIF", quality=50, speed=10)
    if name == "heic_8k":
        from pillow_heif import register_heif_opener

        register_heif_opener()
        return _save(Image.fromarray(_blocks(*SIZE_8K, 3, seed)), "HEIF", quality=50)
    if name == "tiff_100mp":
        return _save(Image.fromarray(_blocks(side, side, 3, seed)), "TIFF", compression="tiff_deflate")
    if name == "gif_animated":
        frames = [f.quantize(64) for f in _frames(seed)]
        return _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    if name == "png_animated":
        frames = _frames(seed)
        return _save(frames[0], "PNG", save_all=True, append_images=frames[1:])
    from decode_cost import make_case  # bench/ is on sys.path when this runs as a script

    return make_case(name, megapixels, seed=seed)


def distinct(data: bytes, i: int) -> bytes:
    """``data`` with a few trailing bytes naming ``i``: another content hash (so the server decodes each again),
    the same image (every decoder here stops at the end of its image; checked for PNG, JPEG, WebP, AVIF, HEIC,
    TIFF and GIF)."""
    return data + f"hostile-{i:06d}".encode()


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


def reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` (``VmHWM``; Linux 4.0+, same user); ``False`` where refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm(pid: int) -> int:
    """``VmHWM`` of ``pid`` in bytes (0 where unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mb(n_bytes: float) -> int:
    return round(n_bytes / 1e6)


def index_baseline(url: str, photos: list[Path], pid: int) -> dict:
    """Index ``photos`` (``live_server.index_photos``); the time taken and the server's peak RSS meanwhile."""
    reset_hwm(pid)
    sampler = RssSampler(pid, 0.2)
    sampler.start()
    result = index_photos(url, photos)
    sampler.stop_event.set()
    sampler.join()
    return {**result, "peak_rss_mb": mb(max(hwm(pid), sampler.peak))}


def burst(url: str, pid: int, files: list[bytes], settle_s: float) -> dict:
    """Post ``files`` at once to ``/index_image``; the server's peak RSS, its RSS before and after, the answers."""
    proc = psutil.Process(pid)
    before = proc.memory_info().rss
    exact = reset_hwm(pid)
    sampler = RssSampler(pid)
    sampler.start()
    statuses: list[int | str] = [""] * len(files)
    latencies = [0.0] * len(files)
    details: set[str] = set()

    def post(i: int) -> None:
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{url}/index_image", files={"file": (f"hostile{i}.img", files[i])}, timeout=600)
            statuses[i] = r.status_code
            if r.status_code >= 400:
                details.add(f"{r.status_code}: {str(r.json().get('detail', ''))[:100]}")
        except (httpx.HTTPError, ValueError) as exc:
            statuses[i] = type(exc).__name__
        latencies[i] = time.monotonic() - t0

    t0 = time.monotonic()
    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    burst_s = time.monotonic() - t0
    time.sleep(settle_s)
    sampler.stop_event.set()
    sampler.join()
    peak = max(sampler.peak, hwm(pid) if exact else 0)
    after = proc.memory_info().rss
    by_status: dict[str, int] = {}
    for s in statuses:
        by_status[str(s)] = by_status.get(str(s), 0) + 1
    answered = [s for s in statuses if isinstance(s, int) and (200 <= s < 500 or s == 503)]
    return {
        "file_kb": round(len(files[0]) / 1000),
        "rss_before_mb": mb(before),
        "peak_rss_mb": mb(peak),
        "peak_is_vmhwm": exact,
        "rss_after_mb": mb(after),
        "burst_s": round(burst_s, 1),
        "latency_s": {"min": round(min(latencies), 1), "max": round(max(latencies), 1)},
        "statuses": by_status,
        "refusals": sorted(details)[:6],
        "lost": len(statuses) - len(answered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="concurrent requests per class, one distinct file each")
    parser.add_argument("--format", default=",".join(HOSTILE_CLASSES), help="classes, comma-separated (see above)")
    parser.add_argument("--megapixels", type=float, default=100.0, help="size of png_*, jpeg_* and tiff_* files")
    parser.add_argument("--baseline-photos", type=int, default=0, help="photos to index before the bursts")
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait after a burst before the 'after' RSS")
    parser.add_argument("--peak-target-mb", type=float, default=1500.0, help="most peak RSS allowed, absolute")
    parser.add_argument("--model-cache-dir", type=Path, default=Path(os.environ.get("MODEL_CACHE_DIR", "data/models")))
    parser.add_argument("--env", action="append", default=[], help="extra server setting NAME=VALUE")
    parser.add_argument("--png-dir", type=Path, help="keep the generated images here and reuse them on later runs")
    parser.add_argument("--project-root", type=Path, default=PROJECT_ROOT, help="checkout the server runs from")
    args = parser.parse_args()
    classes = [c for c in args.format.split(",") if c]

    started = time.monotonic()
    bases: dict[str, bytes] = {}
    for name in classes:
        cached = args.png_dir / f"hostile-{name}-{args.megapixels:g}mp.img" if args.png_dir else None
        if cached is not None and cached.exists():
            bases[name] = cached.read_bytes()
            continue
        bases[name] = make_class(name, args.megapixels)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(bases[name])
    generate_s = time.monotonic() - started
    photos = baseline_photos(args.baseline_photos)

    results: dict[str, dict] = {}
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
            baseline = index_baseline(url, photos, server.pid) if photos else None
            warm = make_png(1000, 0.25)
            httpx.post(f"{url}/search_image", files={"file": ("warm.png", warm)}, timeout=60).raise_for_status()
            time.sleep(2.0)
            idle = psutil.Process(server.pid).memory_info().rss
            for name in classes:
                files = [distinct(bases[name], i) for i in range(args.n)]
                results[name] = burst(url, server.pid, files, args.settle_s)
                print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
            end_rss = psutil.Process(server.pid).memory_info().rss
        finally:
            stop_server(server)

    result = {
        "bench": "hostile",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "n": args.n,
        "megapixels": args.megapixels,
        "project_root": str(args.project_root),
        "settings": dict(item.split("=", 1) for item in args.env),
        "generate_s": round(generate_s, 1),
        "baseline": baseline,
        "baseline_rss_mb": mb(idle),
        "end_rss_mb": mb(end_rss),
        "settle_s": args.settle_s,
        "peak_target_mb": args.peak_target_mb,
        "classes": results,
        "worst_peak_rss_mb": max((r["peak_rss_mb"] for r in results.values()), default=None),
        "lost": sum(r["lost"] for r in results.values()),
        "meets_targets": all(
            r["peak_rss_mb"] <= args.peak_target_mb
            and r["rss_after_mb"] - r["rss_before_mb"] <= AFTER_TARGET_MB
            and r["lost"] == 0
            for r in results.values()
        ),
    }
    print(json.dumps(result))
    return 0 if result["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
