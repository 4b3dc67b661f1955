#!/usr/bin/env python
"""What decoding really costs in memory, per format and mode, as one JSON line.

For each case (format x mode, e.g. WebP RGBA, 16-bit PNG, float TIFF) it writes one image of ``--megapixels`` MP
(coloured blocks: compressible, like a hostile upload) and decodes it with the service's own
:func:`app.imaging.decode.decode_image` in a fresh child process, which reports the peak RSS growth during the decode
(the larger of ``ru_maxrss``'s growth and an RSS sampled every 2 ms) in bytes per pixel. An 8-bit RGB raster is 3
bytes per pixel; ``factor`` = bytes per pixel / 3 is the cost in "RGB pixels" that the decode admission
(``app/imaging/admission.py``, ``DECODE_COST_FACTORS``) charges per header pixel.

Usage: python bench/decode_cost.py [--megapixels 16] [--cases webp_rgba,png_rgb,...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _blocks_seeded(side: int, channels: int, seed: int = 0, dtype=np.uint8, high: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = 50
    grid = rng.integers(0, high, size=(cells, cells, channels)).astype(dtype)
    block = -(-side // cells)
    return np.repeat(np.repeat(grid, block, axis=0), block, axis=1)[:side, :side]


def make_case(case: str, megapixels: float, seed: int = 0) -> bytes:
    """The bytes of one test image: ``case`` is ``<format>_<mode>`` (see :data:`CASES`); ``seed`` picks the colours
    (distinct seeds: distinct images)."""
    side = int((megapixels * 1_000_000) ** 0.5)
    out = io.BytesIO()

    def _blocks(side: int, channels: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
        return _blocks_seeded(side, channels, seed, dtype, high)

    if case == "jpeg_rgb":
        Image.fromarray(_blocks(side, 3)).save(out, format="JPEG", quality=90)
    elif case == "png_rgb":
        Image.fromarray(_blocks(side, 3)).save(out, format="PNG")
    elif case == "png_rgba":
        Image.fromarray(_blocks(side, 4), "RGBA").save(out, format="PNG")
    elif case == "png_i16":
        Image.fromarray(_blocks(side, 1, dtype=np.uint16, high=65536)[:, :, 0]).save(out, format="PNG")
    elif case == "png_p":
        Image.fromarray(_blocks(side, 3)).quantize(64).save(out, format="PNG")
    elif case == "webp_rgb":
        Image.fromarray(_blocks(side, 3)).save(out, format="WEBP", quality=80, method=0)
    elif case == "webp_rgba":
        Image.fromarray(_blocks(side, 4), "RGBA").save(out, format="WEBP", lossless=True, method=0, quality=0)
    elif case == "tiff_rgb":
        Image.fromarray(_blocks(side, 3)).save(out, format="TIFF", compression="tiff_deflate")
    elif case == "tiff_rgba":
        Image.fromarray(_blocks(side, 4), "RGBA").save(out, format="TIFF", compression="tiff_deflate")
    elif case == "tiff_f":
        Image.fromarray(_blocks(side, 1, dtype=np.float32, high=2)[:, :, 0] * 0.5, "F").save(
            out, format="TIFF", compression="tiff_deflate"
        )
    elif case == "tiff_f_hdr":  # values beyond 0..1: decoded through the min..max stretch
        Image.fromarray(_blocks(side, 1, dtype=np.float32, high=1000)[:, :, 0] * 3.5, "F").save(
            out, format="TIFF", compression="tiff_deflate"
        )
    elif case == "tiff_i16":
        Image.fromarray(_blocks(side, 1, dtype=np.uint16, high=65536)[:, :, 0]).save(
            out, format="TIFF", compression="tiff_deflate"
        )
    elif case == "gif_p":
        Image.fromarray(_blocks(side, 3)).quantize(64).save(out, format="GIF")
    elif case == "heic_rgb":
        from pillow_heif import register_heif_opener

        register_heif_opener()
        Image.fromarray(_blocks(side, 3)).save(out, format="HEIF", quality=50)
    elif case == "avif_rgb":
        import pillow_avif  # noqa: F401 - registers the AVIF plugin

        Image.fromarray(_blocks(side, 3)).save(out, format="AVIF", quality=50, speed=10)
    else:
        raise ValueError(f"unknown case {case!r}")
    return out.getvalue()


CASES = [
    "jpeg_rgb",
    "png_rgb",
    "png_rgba",
    "png_i16",
    "png_p",
    "webp_rgb",
    "webp_rgba",
    "tiff_rgb",
    "tiff_rgba",
    "tiff_f",
    "tiff_f_hdr",
    "tiff_i16",
    "gif_p",
    "heic_rgb",
    "avif_rgb",
]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str) -> None:
    """Decode ``path`` once (after a warm-up decode of a small image of the same kind) and print the peak growth."""
    from app.imaging.decode import decode_image, header_pixels
    from app.imaging.plugins import register_plugins

    register_plugins()  # HEIF, AVIF... as the service has them
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        small = io.BytesIO()
        fmt = im.format
        mode = im.mode
        try:
            im.reduce(16).save(small, format=fmt if fmt != "MPO" else "JPEG")
        except Exception:  # noqa: BLE001 - a warm-up only
            small = None
    if small is not None:
        decode_image(small.getvalue(), max_pixels=10**9)
    pixels = header_pixels(data, max_pixels=10**9)
    peak = [0]
    stop = threading.Event()
    before = _rss()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler.start()
    start = time.perf_counter()
    decoded = decode_image(data, max_pixels=10**9)
    took = time.perf_counter() - start
    del decoded
    stop.set()
    sampler.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grown = max(peak[0] - before, max_after - max(max_before, before))
    print(json.dumps({"format": fmt, "mode": mode, "pixels": pixels, "grown": grown, "decode_s": round(took, 2)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=16.0)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="decode-cost-") as tmp:
        for case in args.cases.split(","):
            started = time.perf_counter()
            data = make_case(case, args.megapixels)
            made = time.perf_counter() - started
            path = Path(tmp) / case
            path.write_bytes(data)
            env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True, check=True
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            bpp = r["grown"] / r["pixels"]
            results[case] = {
                "mode": r["mode"],
                "kb": len(data) // 1024,
                "bytes_per_pixel": round(bpp, 2),
                "factor": round(bpp / 3, 2),
                "decode_s": r["decode_s"],
                "encode_s": round(made, 1),
            }
            print(f"{case}: {results[case]}", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "decode_cost",
                "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                "megapixels": args.megapixels,
                "cases": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
