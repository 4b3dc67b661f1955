#!/usr/bin/env python
"""Index throughput and search latency of one vector database backend, as one JSON line.

    python bench/backends.py --backend pgvector|milvus|manticore [--dataset ../shared/datasets/caltech101_subset]

Every backend gets the same vectors: the 2,020 Caltech-101 photos are embedded once with the offline model
(EfficientNet-Lite2, 1280-d) and cached under ``bench/results/`` so that runs for different backends compare the
databases, not the model. Then, on a fresh, empty collection:

- index: ``upsert`` in batches of ``--batch-size``; ``index_vectors_per_s`` = vectors / wall time (database only;
  ``embed_images_per_s`` reports the model's share, measured once when the cache is built);
- search: every vector as a top-10 query through the handler; p50/p95 latency in ms and recall@10 against exact
  (brute-force numpy) cosine search over the same vectors.

Where the database lives: pgvector uses an embedded PostgreSQL in a temporary directory (or ``DATABASE_URL``),
milvus a temporary Milvus Lite file (or ``MILVUS_URI``), manticore needs ``MANTICORE_HOST`` (no engine installs here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.vectordb import create_handler  # noqa: E402
from app.vectordb.base import ImageMetadata, ImageRecord  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load_embeddings(dataset: Path) -> tuple[list[Path], np.ndarray, float]:
    """Embeddings of every image of ``dataset`` (``(N, 1280)`` float32), cached; returns files, vectors, images/s."""
    from app.embedders import load_embedder
    from app.imaging.decode import decode_image

    files = sorted((dataset / "images").rglob("*.jpg"))
    cache = RESULTS / f"{dataset.name}_efficientnet-lite2.npz"
    if cache.exists():
        data = np.load(cache)
        if list(data["names"]) == [f.relative_to(dataset).as_posix() for f in files]:
            return files, data["vectors"], float(data["ips"])
    embedder = load_embedder(Settings(_env_file=None, embedder="efficientnet"))
    t0 = time.perf_counter()
    vectors = []
    for i in range(0, len(files), 32):
        images = [decode_image(f.read_bytes(), max_pixels=100_000_000).image for f in files[i : i + 32]]
        vectors.append(embedder.embed_images(images))
    ips = len(files) / (time.perf_counter() - t0)
    out = np.concatenate(vectors).astype(np.float32)
    RESULTS.mkdir(exist_ok=True)
    np.savez(cache, vectors=out, names=[f.relative_to(dataset).as_posix() for f in files], ips=ips)
    return files, out, ips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["pgvector", "milvus", "manticore"], required=True)
    parser.add_argument("--dataset", type=Path, default=Path("../shared/datasets/caltech101_subset"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=10)
    args = parser.parse_args()

    args.dataset = args.dataset.resolve()
    files, vectors, embed_ips = load_embeddings(args.dataset)
    now = datetime.now(UTC)
    records = []
    for i, (f, v) in enumerate(zip(files, vectors, strict=True)):
        meta = ImageMetadata(f.relative_to(args.dataset).as_posix(), "JPEG", 300, 200, f.stat().st_size, now)
        records.append(ImageRecord(f"{i:064x}", v, meta))

    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        env = Settings()
        settings = env.model_copy(
            update={
                "vector_db": args.backend,
                "data_dir": Path(tmp),  # embedded PostgreSQL / Milvus Lite file live here unless URLs are set
                "milvus_uri": env.milvus_uri if env.milvus_uri.startswith("http") else "",
            }
        )
        handler = create_handler(settings)
        try:
            handler.ensure_collection("efficientnet-lite2:imagenet", vectors.shape[1])
            t0 = time.perf_counter()
            for i in range(0, len(records), args.batch_size):
                handler.upsert(records[i : i + args.batch_size])
            index_s = time.perf_counter() - t0
            assert handler.count() == len(records)

            exact = np.argsort(-(vectors @ vectors.T), axis=1)[:, : args.top_k]
            latencies, recalls = [], []
            for q, v in enumerate(vectors):
                t = time.perf_counter()
                hits = handler.search(v, args.top_k)
                latencies.append((time.perf_counter() - t) * 1000)
                found = {int(h.id, 16) for h in hits}
                recalls.append(len(found & set(exact[q].tolist())) / args.top_k)
        finally:
            handler.close()

    q = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        json.dumps(
            {
                "benchmark": "backends",
                "backend": args.backend,
                "dataset": args.dataset.name,
                "n": len(records),
                "dim": int(vectors.shape[1]),
                "batch_size": args.batch_size,
                "index_s": round(index_s, 2),
                "index_vectors_per_s": round(len(records) / index_s, 1),
                "embed_images_per_s": round(embed_ips, 1),
                "search_p50_ms": round(q[49], 2),
                "search_p95_ms": round(q[94], 2),
                "recall_at_10": round(float(np.mean(recalls)), 4),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
