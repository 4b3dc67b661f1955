#!/usr/bin/env python
"""CPU encoder paths (CPU_ENCODER=torch|bf16|int8|onnx) compared on speed and retrieval quality, as one JSON line.

For each path the offline EfficientNet-Lite2 embedder is built on CPU and measured on:

- ``images_per_s``: ``embed_images`` on one fixed batch of ``EMBED_BATCH_SIZE`` pre-decoded images (the first files
  of the dataset in sorted order; preprocessing + model), from the median of ``--repeats`` timed runs after one
  warm-up run; ``best_images_per_s`` from the fastest run. The paths take turns run by run (round-robin), so load
  from other processes on the machine hits all of them alike; ``loadavg`` records that load (1-min average, start
  and end).
- ``model_images_per_s`` / ``best_model_images_per_s``: the same batch already preprocessed, through the network
  alone (``embed_batch``).
- ``mAP`` / ``top1`` on ``instance_small``: every image embedded in-process (decoded with
  ``app.imaging.decode.decode_image`` at the service's JPEG draft size), each of the 190 queries of
  ``queries.json`` ranked by exact cosine similarity
  against all other images (the query itself excluded), top 100 kept, AP as in ``bench/quality.py`` (AP@100).
- ``mean_cosine_vs_fp32`` / ``min_cosine_vs_fp32``: row-wise cosine between the path's and the fp32 (``torch``)
  embeddings of all dataset images.

``eligible_default`` applies the project's rule: faster than fp32 on ``images_per_s`` and at most 0.01 (absolute) mAP
below it; ``recommended_default`` is the fastest eligible path (``torch`` if none).

Usage: flock /tmp/bench.lock .venv/bin/python bench/encoder.py [--dataset ../shared/datasets/instance_small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.embedders.cpu_encoder import CPU_ENCODERS  # noqa: E402
from app.embedders.efficientnet import EfficientNetLiteEmbedder  # noqa: E402
from app.imaging.decode import decode_image  # noqa: E402
from bench.quality import average_precision  # noqa: E402

TOP_K = 100  # as bench/quality.py's default, so the mAP here compares with the API figure
MAX_MAP_LOSS = 0.01


def retrieval(emb: np.ndarray, rels: list[str], queries: dict[str, list[str]]) -> tuple[float, float]:
    """(mAP@100, top-1) of exact cosine search over ``emb`` (rows in ``rels`` order), each query excluded."""
    index = {rel: i for i, rel in enumerate(rels)}
    sims = emb @ emb.T
    aps, top1 = [], []
    for query, relevant in queries.items():
        q = index[query]
        order = [int(j) for j in np.argsort(-sims[q], kind="stable") if j != q][:TOP_K]
        relevant_idx = {index[r] for r in relevant} - {q}
        flags = [j in relevant_idx for j in order]
        aps.append(average_precision(flags, len(relevant_idx)))
        top1.append(1.0 if flags[:1] == [True] else 0.0)
    return float(np.mean(aps)), float(np.mean(top1))


def round_robin(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` rounds in which every function runs once, after one warm-up round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/instance_small"))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median and best reported)")
    parser.add_argument("--paths", default=",".join(CPU_ENCODERS), help="comma-separated CPU_ENCODER values")
    args = parser.parse_args()

    settings = Settings()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if paths[0] != "torch":
        paths = ["torch"] + [p for p in paths if p != "torch"]  # fp32 is the reference for every comparison

    root = args.dataset.resolve()
    queries: dict[str, list[str]] = json.loads((root / "queries.json").read_text())
    files = sorted(p for p in (root / "images").rglob("*") if p.is_file())
    rels = [p.relative_to(root).as_posix() for p in files]

    embedders = {
        name: EfficientNetLiteEmbedder(
            device="cpu",
            batch_size=settings.embed_batch_size,
            cpu_encoder=name,
            cache_dir=settings.resolved_model_cache_dir,
            threads=settings.torch_threads,
        )
        for name in paths
    }
    # Decoded once, as the service decodes (JPEG draft size included), and shared by every path.
    draft = embedders["torch"].draft_size
    images = [decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels, draft_size=draft).image for p in files]
    batch_images = images[: settings.embed_batch_size]
    batch_tensor = embedders["torch"].preprocess(batch_images)

    results: dict[str, dict] = {}
    reference = embedders["torch"].embed_images(images)
    for name, embedder in embedders.items():
        emb = reference if name == "torch" else embedder.embed_images(images)
        cosine = np.sum(emb * reference, axis=1)
        mAP, top1 = retrieval(emb, rels, queries)
        results[name] = {
            "encoder": embedder.encoder.name,
            "mAP": round(mAP, 4),
            "top1": round(top1, 4),
            "mean_cosine_vs_fp32": round(float(cosine.mean()), 6),
            "min_cosine_vs_fp32": round(float(cosine.min()), 6),
        }

    load_start = os.getloadavg()[0]
    n = len(batch_images)
    full = round_robin({k: (lambda e=e: e.embed_images(batch_images)) for k, e in embedders.items()}, args.repeats)
    model = round_robin({k: (lambda e=e: e.embed_batch(batch_tensor)) for k, e in embedders.items()}, args.repeats)
    load_end = os.getloadavg()[0]
    for name, r in results.items():
        r["images_per_s"] = round(n / statistics.median(full[name]), 1)
        r["best_images_per_s"] = round(n / min(full[name]), 1)
        r["model_images_per_s"] = round(n / statistics.median(model[name]), 1)
        r["best_model_images_per_s"] = round(n / min(model[name]), 1)

    base = results["torch"]
    for r in results.values():
        r["speedup"] = round(r["images_per_s"] / base["images_per_s"], 2)
        r["model_speedup"] = round(r["model_images_per_s"] / base["model_images_per_s"], 2)
    eligible = [
        name
        for name, r in results.items()
        if name != "torch" and r["images_per_s"] > base["images_per_s"] and base["mAP"] - r["mAP"] <= MAX_MAP_LOSS
    ]
    out = {
        "benchmark": "encoder",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": EfficientNetLiteEmbedder.model_id,
        "dataset": root.name,
        "n_images": len(files),
        "n_queries": len(queries),
        "batch_size": settings.embed_batch_size,
        "repeats": args.repeats,
        "loadavg": [round(load_start, 2), round(load_end, 2)],
        "paths": results,
        "eligible_default": eligible,
        "recommended_default": max(eligible, key=lambda n: results[n]["images_per_s"]) if eligible else "torch",
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
