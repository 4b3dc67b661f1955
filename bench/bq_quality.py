"""How well a binary quantisation ranks real embeddings for the filtered exact pass (issue #29).

The pgvector backend answers a selective filter by ranking the matching rows by the Hamming distance of
``embedding_bq`` and re-ranking the best ``rerank_candidates(top_k)`` (400) by exact cosine similarity
(app/vectordb/pgvector.py). Whether the true top-10 survive the first stage depends on how the bits are cut: plain
sign bits (``binary_quantize(embedding)``) or per-dimension median thresholds (``bq_thresholds``, what a calibrated
collection stores). Synthetic, zero-centred vectors cannot show the difference; real embeddings can.

Steps: embed every image under ``--dataset`` with the service's offline model (EfficientNet-Lite2, 1,280-d;
``--embeddings file.npy`` reuses a saved ``(N, D)`` float32 array, ``--save`` writes one); for ``--queries`` images
(leave-one-out, seeded), the exact top-10 by cosine similarity among the others; then, per scheme and per
re-ranked fraction ``f`` (``--fractions``: 400 candidates of a filter matching ``400 / f`` rows), the share of the
exact top-10 found by ranking the others by Hamming distance (ties by index, as the SQL breaks them by id), keeping
the best ``f * (N - 1)`` and re-ranking those exactly: recall@10.

Schemes: ``sign`` (bit set when the component is positive), ``median`` (median of every image), ``median_of_<n>``
(median of ``n`` random images, as a collection calibrated at its ``n``-th row), ``mean`` (mean instead of median).

Usage::

    .venv/bin/python bench/bq_quality.py --dataset ../shared/datasets/caltech101_subset/images

Prints one JSON line (the last line; progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.vectordb.pgvector import bq_thresholds  # noqa: E402


def embed_dataset(root: Path, batch: int = 32) -> tuple[np.ndarray, int]:
    """``(N, D)`` float32 L2-normalised embeddings of every ``.jpg``/``.png`` under ``root`` (sorted paths) with
    the offline EfficientNet-Lite2, and the number of files."""
    from PIL import Image

    from app.embedders.efficientnet import EfficientNetLiteEmbedder

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise SystemExit(f"no images under {root}")
    embedder = EfficientNetLiteEmbedder()
    out = []
    for i in range(0, len(files), batch):
        images = []
        for f in files[i : i + batch]:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        out.append(embedder.embed_images(images))
        print(f"embedded {min(i + batch, len(files))}/{len(files)}", file=sys.stderr, flush=True)
    return np.concatenate(out).astype(np.float32), len(files)


def recall_after_rerank(x: np.ndarray, codes: np.ndarray, queries: np.ndarray, fraction: float, k: int = 10) -> float:
    """Mean recall@k of "best ``fraction`` of the other rows by Hamming distance of ``codes``, re-ranked by cosine".

    Args:
        x: ``(N, D)`` float32 L2-normalised embeddings. codes: ``(N, D)`` bool bits. queries: row indices.
        fraction: share of the other ``N - 1`` rows kept by the first stage, in (0, 1].
    """
    n = len(x)
    keep = max(k, int(round(fraction * (n - 1))))
    order = np.arange(n)
    found = []
    for q in queries:
        sims = x @ x[q]
        sims[q] = -np.inf
        truth = set(np.argsort(-sims, kind="stable")[:k].tolist())
        ham = (codes != codes[q]).sum(axis=1).astype(np.float64)
        ham[q] = np.inf
        first = np.lexsort((order, ham))[:keep]
        top = first[np.argsort(-sims[first], kind="stable")[:k]]
        found.append(len(truth & set(top.tolist())) / k)
    return float(np.mean(found))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared/datasets/caltech101_subset/images")
    parser.add_argument("--embeddings", type=Path, help="reuse a saved (N, D) float32 .npy instead of embedding")
    parser.add_argument("--save", type=Path, help="write the embeddings to this .npy")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--fractions", default="0.02,0.05,0.08,0.2", help="re-ranked share of the matching rows")
    parser.add_argument("--calibration-sizes", default="200,1000", help="median_of_<n> schemes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    if args.embeddings:
        x, files = np.load(args.embeddings).astype(np.float32), None
    else:
        x, files = embed_dataset(args.dataset)
        if args.save:
            np.save(args.save, x)
    embed_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    queries = rng.choice(len(x), size=min(args.queries, len(x)), replace=False)
    schemes = {"sign": x > 0, "median": x > bq_thresholds(x), "mean": x > x.mean(axis=0)}
    for size in (int(s) for s in args.calibration_sizes.split(",") if s):
        sample = x[rng.choice(len(x), size=min(size, len(x)), replace=False)]
        schemes[f"median_of_{size}"] = x > bq_thresholds(sample)
    fractions = [float(f) for f in args.fractions.split(",")]
    result = {
        "benchmark": "bq_quality",
        "dataset": str(args.embeddings or args.dataset),
        "model": "efficientnet-lite2" if files is not None else "from --embeddings",
        "n": int(len(x)),
        "dim": int(x.shape[1]),
        "positive_share": round(float((x > 0).mean()), 3),
        "zero_share": round(float((x == 0).mean()), 3),
        "queries": int(len(queries)),
        "embed_s": round(embed_s, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "recall_at_10": {
            name: {str(f): round(recall_after_rerank(x, codes, queries, f), 3) for f in fractions}
            for name, codes in schemes.items()
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
