"""Copy every vector and its metadata from one backend to another, without re-embedding, then check the copy.

    python scripts/migrate.py --from pgvector --to milvus [--batch-size 1000] [--verify-samples 20]
    python scripts/migrate.py --from pgvector --to pgvector --to-database-url postgresql://.../other \\
                              --to-vector-type halfvec

Connection settings come from the same environment variables (or ``.env``) as the service: ``DATABASE_URL`` /
``DATA_DIR`` / ``VECTOR_TYPE`` for pgvector, ``MILVUS_URI`` / ``MILVUS_TOKEN`` for Milvus, ``MANTICORE_HOST`` /
``MANTICORE_PORT`` for Manticore. The ``--to-...`` options override them for the target only, which is how a
collection moves within one backend: to another PostgreSQL database, between ``vector`` and ``halfvec`` storage,
to another Milvus URI or Manticore server. Source and target must be different databases. The originals (under
``IMAGE_DIR``, or in ``IMAGE_STORE_URL``'s bucket) are addressed by content hash and need no copying: this tool
reads and writes only the vector databases, never the image store, so the service on the target serves the same
originals from the same place.

Stop the service first when either side is Milvus Lite (one process per database file) or the embedded
PostgreSQL is shared. The copy is idempotent (upserts by image id), so an interrupted run can simply be run again.

Afterwards it checks the target, and fails loudly when any check fails: the target holds exactly as many records
as the source and as were read; for ``--verify-samples`` records drawn at random during the copy, the target has
the same metadata and the same vector (within float16 rounding when either side is ``halfvec``, else 1e-5 per
component); and searches with those vectors return the same top-5 on both sides (ties within the same tolerance
may swap). Exit code 0 when every check holds, 1 when one fails (each failure is printed on stderr), 2 for usage
or connection errors.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from app.config import Settings
from app.errors import ServiceError
from app.vectordb import VectorDBHandler, create_handler
from app.vectordb.base import SearchHit

BACKENDS = ("pgvector", "milvus", "manticore")
TOP_K = 5
# Per-component vector tolerance: float32 round trips (Manticore prints 8 decimals of normalised vectors) stay far
# below 1e-5; float16 (halfvec) keeps 11 significant bits, so a component of magnitude below 1 moves by up to 2**-11.
EXACT_ATOL = 1e-5
HALF_ATOL = 2.0**-11


@dataclass
class Copied:
    """What :func:`migrate` did: rows read from the source and a uniform random sample of their ids."""

    rows: int = 0
    sample: list[str] = field(default_factory=list)


def migrate(
    source: VectorDBHandler,
    target: VectorDBHandler,
    batch_size: int = 1000,
    progress: bool = True,
    samples: int = 20,
    seed: int = 0,
) -> Copied:
    """Copy all records of ``source`` into ``target`` (created for the source's model).

    Returns the number of rows read and ``samples`` ids drawn uniformly among them (reservoir sampling, so no
    second pass over the source). Raises ``RuntimeError`` when the source has no collection,
    :class:`app.errors.CollectionMismatchError` when the target already holds another model's vectors.
    """
    info = source.collection_info()
    if info is None:
        raise RuntimeError("the source backend has no collection yet: nothing to migrate")
    target.ensure_collection(info.model_id, info.dim)
    rng = random.Random(seed)
    copied = Copied()
    with tqdm(total=source.count(), unit="vec", desc="migrating", disable=not progress) as bar:
        for batch in source.scan(batch_size=batch_size):
            target.upsert(batch)
            for record in batch:
                if len(copied.sample) < samples:
                    copied.sample.append(record.id)
                else:
                    j = rng.randrange(copied.rows + 1)
                    if j < samples:
                        copied.sample[j] = record.id
                copied.rows += 1
            bar.update(len(batch))
    return copied


def _vector_atol(*handlers: VectorDBHandler) -> float:
    return HALF_ATOL if any(getattr(h, "vector_type", "vector") == "halfvec" for h in handlers) else EXACT_ATOL


def same_top_k(a: list[SearchHit], b: list[SearchHit], k: int, score_tol: float) -> bool:
    """``True`` when the best ``k`` of ``a`` and ``b`` are the same ids, up to ties: an id in only one top-``k``
    must score within ``score_tol`` of the ``k``-th score (storage precision can swap near-equal neighbours)."""
    top_a, top_b = a[:k], b[:k]
    if len(top_a) != len(top_b):
        return False
    differ = {h.id for h in top_a} ^ {h.id for h in top_b}
    if not differ:
        return True
    kth = min(h.score for h in top_a)
    scores = {h.id: h.score for h in b} | {h.id: h.score for h in a}
    return all(abs(scores[i] - kth) <= score_tol for i in differ)


def verify(source: VectorDBHandler, target: VectorDBHandler, copied: Copied, top_k: int = TOP_K) -> dict:
    """Check ``target`` against ``source`` after :func:`migrate`; ``problems`` lists every failed check.

    Counts: source, target and rows read must agree. For every sampled id: present on both sides, equal metadata,
    vectors equal within the storage tolerance; the top-``top_k`` of a search with that vector must match up to
    ties (:func:`same_top_k`; a margin of ``2 * top_k`` results is asked for so ties at rank ``top_k`` are seen).
    """
    atol = _vector_atol(source, target)
    score_tol = 4 * atol  # a cosine of unit vectors moves by at most about sum|dq_i| ~ sqrt(D) * atol; ties only
    report = {
        "source_count": source.count(),
        "target_count": target.count(),
        "rows_read": copied.rows,
        "samples": len(copied.sample),
        "same_vectors": 0,
        "same_top_k": 0,
        "problems": [],
    }
    problems = report["problems"]
    if not report["source_count"] == report["target_count"] == copied.rows:
        problems.append(
            f"counts differ: the source holds {report['source_count']}, {copied.rows} were read and copied, the "
            f"target holds {report['target_count']}"
        )
    for image_id in copied.sample:
        ours, theirs = source.get(image_id), target.get(image_id)
        if ours is None or theirs is None:
            problems.append(f"record {image_id} is missing from the {'source' if ours is None else 'target'}")
            continue
        if ours.metadata != theirs.metadata:
            problems.append(f"record {image_id}: metadata differ ({ours.metadata} vs {theirs.metadata})")
        elif not np.allclose(ours.vector, theirs.vector, rtol=0, atol=atol):
            worst = float(np.max(np.abs(ours.vector - theirs.vector)))
            problems.append(f"record {image_id}: vectors differ by up to {worst:.3g} (tolerance {atol:.3g})")
        else:
            report["same_vectors"] += 1
        a = source.search(ours.vector, 2 * top_k)
        b = target.search(ours.vector, 2 * top_k)
        if same_top_k(a, b, top_k, score_tol):
            report["same_top_k"] += 1
        else:
            problems.append(
                f"search with record {image_id}: top-{top_k} differ ({[h.id[:12] for h in a[:top_k]]} vs "
                f"{[h.id[:12] for h in b[:top_k]]})"
            )
    return report


def _location(settings: Settings) -> tuple:
    """Where a backend's data lives, to refuse migrating a database onto itself."""
    if settings.vector_db == "pgvector":
        return ("pgvector", settings.database_url or str((settings.data_dir / "pgdata").resolve()))
    if settings.vector_db == "milvus":
        return ("milvus", settings.resolved_milvus_uri)
    return ("manticore", settings.manticore_host, settings.manticore_port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Copy vectors and metadata between vector databases, then check.")
    parser.add_argument("--from", dest="source", choices=BACKENDS, required=True)
    parser.add_argument("--to", dest="target", choices=BACKENDS, required=True)
    parser.add_argument("--to-database-url", help="target pgvector: this DATABASE_URL instead of the source's")
    parser.add_argument("--to-vector-type", choices=["vector", "halfvec"], help="target pgvector: VECTOR_TYPE")
    parser.add_argument("--to-milvus-uri", help="target milvus: this MILVUS_URI (a Lite path or http://host:port)")
    parser.add_argument("--to-manticore-host", help="target manticore: this MANTICORE_HOST")
    parser.add_argument("--to-manticore-port", type=int, help="target manticore: this MANTICORE_PORT")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per read and write (default 1000)")
    parser.add_argument("--verify-samples", type=int, default=20, help="records checked afterwards (default 20)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    settings = Settings().for_operator_tool()
    overrides = {
        "database_url": args.to_database_url,
        "vector_type": args.to_vector_type,
        "milvus_uri": args.to_milvus_uri,
        "manticore_host": args.to_manticore_host,
        "manticore_port": args.to_manticore_port,
    }
    source_settings = settings.model_copy(update={"vector_db": args.source})
    target_settings = settings.model_copy(
        update={"vector_db": args.target, **{k: v for k, v in overrides.items() if v is not None}}
    )
    if _location(source_settings) == _location(target_settings):
        parser.error(
            "source and target are the same database; name another one for the target with --to-database-url, "
            "--to-milvus-uri or --to-manticore-host/--to-manticore-port"
        )
    handlers: list[VectorDBHandler] = []
    try:
        source = create_handler(source_settings)
        handlers.append(source)
        target = create_handler(target_settings)
        handlers.append(target)
        copied = migrate(source, target, args.batch_size, progress=not args.no_progress, samples=args.verify_samples)
        report = verify(source, target, copied)
    except (ServiceError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for h in handlers:
            h.close()

    print(
        f"copied {copied.rows} records from {args.source} to {args.target}; counts {report['source_count']} -> "
        f"{report['target_count']}; same vectors for {report['same_vectors']}/{report['samples']} samples; "
        f"same top-5 for {report['same_top_k']}/{report['samples']} sample searches"
    )
    if report["problems"]:
        print("error: the target does not match the source:", file=sys.stderr)
        for problem in report["problems"]:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
