#!/usr/bin/env python
"""ONNX Runtime's CPU memory arena on and off, on the offline model's export: resident memory and speed, one JSON line.

Each variant runs in a fresh child process (so one cannot inherit the other's heap): load the export, decode 256
caltech101_subset JPEGs at the model's draft size, embed them in batches of 32 (the service's EMBED_BATCH_SIZE) twice,
and report VmRSS after loading, after the batches, and after ``malloc_trim(0)``, in MB, and images/s of the second
pass. The export is made first (in the model cache given, or a temporary one) if it is not there yet.

Usage: python bench/ort_arena.py [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "caltech101_subset" / "images"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return 0.0


def variant(arena: bool, cache: str) -> dict:
    """Runs in the child: one variant's figures."""
    import onnxruntime as ort

    import app.embedders.onnx_model as onnx_model
    from app.config import Settings
    from app.embedders import load_embedder
    from app.imaging.decode import decode_image

    plain = onnx_model.ort_session

    def session(path, threads):  # noqa: ANN001, ANN202
        if not arena:
            return plain(path, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 2
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    onnx_model.ort_session = session
    embedder = load_embedder(Settings(_env_file=None, embedder="efficientnet", model_cache_dir=cache, data_dir=cache))
    loaded = rss_mb()
    files = sorted(DATASET.rglob("*.jpg"))[:256]
    images = [decode_image(p.read_bytes(), max_pixels=10**8, draft_size=embedder.draft_size).image for p in files]
    for start in range(0, len(images), 32):
        embedder.embed_images(images[start : start + 32])
    t0 = time.perf_counter()
    for start in range(0, len(images), 32):
        embedder.embed_images(images[start : start + 32])
    speed = len(images) / (time.perf_counter() - t0)
    after = rss_mb()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {
        "rss_loaded_mb": loaded,
        "rss_after_batches_mb": after,
        "rss_after_trim_mb": rss_mb(),
        "images_per_s": round(speed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-cache", default=None)
    parser.add_argument("--child", choices=["arena", "no_arena"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = args.model_cache or tempfile.mkdtemp(prefix="ort-arena-")
    if args.child:
        print(json.dumps(variant(args.child == "arena", cache)))
        return 0
    result = {"bench": "ort_arena", "batch": 32, "images": 256}
    for name in ("no_arena", "arena", "no_arena_again"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name.replace("_again", ""), "--model-cache", cache],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
