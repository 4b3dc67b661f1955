#!/usr/bin/env python
"""Copy every vector and its metadata from one backend to another, without re-embedding.

    python scripts/migrate.py --from pgvector --to milvus [--batch-size 1000] [--verify-samples 20]

Connection settings come from the same environment variables (or ``.env``) as the service: ``DATABASE_URL`` /
``DATA_DIR`` for pgvector, ``MILVUS_URI`` / ``MILVUS_TOKEN`` for Milvus, ``MANTICORE_HOST`` / ``MANTICORE_PORT``
for Manticore. The originals under ``IMAGE_DIR`` are addressed by content hash and need no copying.

Stop the service first when either side is Milvus Lite (one process per database file) or the embedded
PostgreSQL is shared. The copy is idempotent (upserts by image id), so an interrupted run can simply be run again.

Afterwards it checks that the target holds as many records as the source and that a sample of searches returns
the same top-5 ids on both; the exit code is 0 when both hold, 1 otherwise, 2 for usage or connection errors.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

from tqdm import tqdm  # noqa: E402

from app.config import Settings  # noqa: E402
from app.errors import ServiceError  # noqa: E402
from app.vectordb import VectorDBHandler, create_handler  # noqa: E402
from app.vectordb.base import canonical_top_ids  # noqa: E402

BACKENDS = ("pgvector", "milvus", "manticore")


def migrate(source: VectorDBHandler, target: VectorDBHandler, batch_size: int = 1000, progress: bool = True) -> int:
    """Copy all records of ``source`` into ``target`` (created for the source's model); returns the number copied.

    Raises ``RuntimeError`` when the source has no collection, :class:`app.errors.CollectionMismatchError` when
    the target already holds another model's vectors.
    """
    info = source.collection_info()
    if info is None:
        raise RuntimeError("the source backend has no collection yet: nothing to migrate")
    target.ensure_collection(info.model_id, info.dim)
    copied = 0
    with tqdm(total=source.count(), unit="vec", desc="migrating", disable=not progress) as bar:
        for batch in source.scan(batch_size=batch_size):
            target.upsert(batch)
            copied += len(batch)
            bar.update(len(batch))
    return copied


def verify(source: VectorDBHandler, target: VectorDBHandler, samples: int = 20, top_k: int = 5) -> dict:
    """Compare counts and the top-``top_k`` ids of ``samples`` searches (queries: stored vectors of the source).

    Rankings are compared with :func:`app.vectordb.base.canonical_top_ids`, so exact ties may differ in order.
    """
    ids = [r.id for batch in source.scan(batch_size=10_000) for r in batch]
    picked = random.Random(0).sample(ids, min(samples, len(ids)))
    same = 0
    for image_id in picked:
        record = source.get(image_id)
        # A margin beyond top_k lets a tie at rank top_k resolve the same way on both sides.
        a = canonical_top_ids(source.search(record.vector, 2 * top_k), top_k)
        b = canonical_top_ids(target.search(record.vector, 2 * top_k), top_k)
        same += a == b
    return {
        "source_count": source.count(),
        "target_count": target.count(),
        "samples": len(picked),
        "same_top_k": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Copy vectors and metadata between vector database backends.")
    parser.add_argument("--from", dest="source", choices=BACKENDS, required=True)
    parser.add_argument("--to", dest="target", choices=BACKENDS, required=True)
    parser.add_argument("--batch-size", type=int, default=1000, help="records per read and write (default 1000)")
    parser.add_argument("--verify-samples", type=int, default=20, help="searches compared afterwards (default 20)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.source == args.target:
        parser.error("--from and --to must name different backends")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    settings = Settings()
    handlers: list[VectorDBHandler] = []
    try:
        source = create_handler(settings.model_copy(update={"vector_db": args.source}))
        handlers.append(source)
        target = create_handler(settings.model_copy(update={"vector_db": args.target}))
        handlers.append(target)
        copied = migrate(source, target, args.batch_size, progress=not args.no_progress)
        report = verify(source, target, args.verify_samples)
    except (ServiceError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for h in handlers:
            h.close()

    print(
        f"copied {copied} records from {args.source} to {args.target}; counts {report['source_count']} -> "
        f"{report['target_count']}; same top-5 for {report['same_top_k']}/{report['samples']} sample searches"
    )
    ok = report["source_count"] == report["target_count"] and report["same_top_k"] == report["samples"]
    if not ok:
        print("warning: the target differs from the source (see the counts and samples above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
