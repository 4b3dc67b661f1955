"""Switch models: re-embed every stored original with the model the settings name, into a new collection, then make
it the active one.

Usage: ``image-search-reindex [--target NAME] [--drop-old] [--workers N] [--batch-size N] [--allow-missing]``
(or ``python scripts/reindex.py`` from a checkout), with the service's own settings (environment and ``.env``):
the NEW model's ``EMBEDDER`` / ``CLIP_MODEL`` / ``CLIP_PRETRAINED``, and the database and store the service uses
(``DATABASE_URL`` or ``DATA_DIR``, ``VECTOR_DB``, ``IMAGE_DIR``...). ``--list`` shows the database's collections,
``--drop NAME`` deletes one that is not active, ``--from NAME`` catches up after a switch (the rows of the old
collection NAME that the active one lacks, re-embedded into the active one).

It reads every row of the active collection, decodes its original from ``IMAGE_DIR`` with the ingest pipeline
(app/indexing/pipeline.py), embeds it and writes it with the row's own metadata into the target collection
(default name: from the model id), with a progress bar; an interrupted run (even ``kill -9``) resumes where it
stopped. When the target holds every row, the database's active collection is switched to it in one atomic step.
The old collection stays until ``--drop-old`` (or ``--drop NAME`` later). A running service keeps serving the old
collection until it is restarted with the new model's settings. With pgvector it may run beside the service; Milvus
Lite allows one process per database, so stop the service first there. Logic: app/indexing/reindex.py.

Exit codes: 0 switched (or nothing to do, or ``--list`` / ``--drop`` done); 1 some rows failed or the source kept
changing, nothing switched (run again, or ``--allow-missing``); 2 the database is unavailable, or the re-index
cannot start (its message says why).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Re-embed every stored image with the model the settings name, into a new collection, and make "
        "it the active one (resumable).",
        epilog="Exit status: 0 switched or nothing to do, 1 some rows failed (nothing switched), 2 cannot run.",
    )
    parser.add_argument("--target", metavar="NAME", help="name of the new collection (default: from the model id)")
    parser.add_argument(
        "--from",
        dest="source",
        metavar="NAME",
        help="catch up after a switch: re-embed the rows of the old collection NAME that the active one lacks "
        "(images indexed through a service still serving NAME) into the active one; switches nothing",
    )
    parser.add_argument(
        "--drop-old",
        action="store_true",
        help="drop the old collection after a successful switch (a service still running on it then loses it: "
        "restart the service first, or drop it later with --drop)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="switch even when some rows could not be re-embedded (they are left out of the new collection)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: the number of CPUs)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per model call (default: EMBED_BATCH_SIZE)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the database's collections and exit")
    parser.add_argument("--drop", metavar="NAME", help="drop collection NAME (not the active one) and exit")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--workers and --batch-size must be >= 1")
    from app.vectordb.base import validate_collection_name

    for name in (args.target, args.drop, args.source):
        if name is not None:
            try:
                validate_collection_name(name)
            except ValueError as exc:
                parser.error(str(exc))
    return args


def _describe(db) -> list[str]:
    """One line per collection: name, model, dimension, rows, and which is active."""
    active = db.active_collection()
    lines = []
    for name, info in db.list_collections().items():
        handler = db if name == db.collection_name else db.open_collection(name)
        try:
            count = handler.count()
        finally:
            if handler is not db:
                handler.close()
        mark = "  (active)" if name == active else ""
        lines.append(f"{name}: model {info.model_id}, dim {info.dim}, {count} images{mark}")
    return lines


def _model_settings(settings) -> str:
    if settings.embedder == "clip" or settings.embedder == "auto":
        return (
            f"EMBEDDER={settings.embedder} CLIP_MODEL={settings.clip_model} CLIP_PRETRAINED={settings.clip_pretrained}"
        )
    return f"EMBEDDER={settings.embedder}"


def main(argv: list[str] | None = None) -> int:
    """Run the re-index (or ``--list`` / ``--drop``); returns the exit code (0, 1 or 2)."""
    args = parse_args(argv)
    from app.config import Settings
    from app.errors import CollectionMismatchError, DatabaseUnavailableError, StorageUnavailableError
    from app.indexing.reindex import NothingToReindex, ReindexError, reindex
    from app.storage import from_settings
    from app.vectordb import create_handler

    settings = Settings().for_operator_tool()
    try:
        db = create_handler(settings)
    except DatabaseUnavailableError as exc:
        print(f"error: the database is unavailable: {exc}", file=sys.stderr)
        return 2
    try:
        if args.list:
            for line in _describe(db):
                print(line)
            return 0
        if args.drop:
            dropped = db.drop_collection(args.drop)
            print(f"dropped collection '{args.drop}'" if dropped else f"there is no collection '{args.drop}'")
            return 0
        from tqdm import tqdm

        from app.embedders import load_embedder

        embedder = load_embedder(settings)  # not the collection's model: the one the settings name
        if embedder is None:
            print("error: EMBEDDER=none loads no model; name the new model (EMBEDDER, CLIP_MODEL...)", file=sys.stderr)
            return 2
        bar = tqdm(total=0, unit="img", desc="re-indexing", dynamic_ncols=True, disable=args.no_progress)

        def progress(done: int, total: int) -> None:
            bar.total = max(total, done)
            bar.n = done
            bar.refresh()

        # Photo libraries' images are read from their files (app/library/files.py), uploads from the store.
        from app.library.files import library_view

        store, libraries = library_view(settings, from_settings(settings, with_space_check=False))
        try:
            result = reindex(
                db,
                embedder,
                store,
                target_name=args.target,
                source_name=args.source,
                workers=args.workers,
                batch_size=args.batch_size or settings.embed_batch_size,
                max_pixels=settings.max_image_pixels,
                max_bytes=settings.max_upload_bytes,
                allow_missing=args.allow_missing,
                drop_old=args.drop_old,
                progress=progress,
            )
        finally:
            bar.close()
            embedder.close()
            if libraries is not None:
                libraries.close()
    except NothingToReindex as exc:
        print(str(exc))
        others = [line for line in _describe(db) if not line.endswith("(active)")]
        for line in others:
            name = line.split(":")[0]
            print(
                f"other collection: {line}; drop it with scripts/reindex.py --drop {name}, or first copy what it got "
                f"after the switch with scripts/reindex.py --from {name}"
            )
        return 0
    except CollectionMismatchError as exc:
        print(
            f"error: the target collection exists with another model ({exc.stored_model}, dim {exc.stored_dim}); "
            "choose another --target, or drop it with --drop NAME",
            file=sys.stderr,
        )
        return 2
    except (ReindexError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnavailableError as exc:
        print(f"error: the database is unavailable ({exc}); run the same command again to resume", file=sys.stderr)
        return 2
    except StorageUnavailableError as exc:
        print(f"error: {exc} Run the same command again to resume.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        db.close()

    for failure in result.failures:
        print(f"failed: {failure.image_id} {failure.filename}: {failure.reason}", file=sys.stderr)
    if args.source and result.source != result.target:
        print(
            f"caught up from '{result.source}' into the active collection '{result.target}': {result.embedded} "
            f"embedded, {result.already} already there, {result.skipped} skipped (original deleted since), "
            f"{len(result.failures)} failed"
        )
        return 1 if result.failures else 0
    print(
        f"re-indexed '{result.source}' ({result.source_model}) into '{result.target}' ({result.target_model}): "
        f"{result.source_count} images, {result.already} already there, {result.embedded} embedded, "
        f"{len(result.failures)} failed, {result.removed} removed"
    )
    if not result.switched:
        print(
            f"not switched: {len(result.failures)} images failed or the collection kept changing; fix them (e.g. "
            "scripts/fsck.py --repair) and run the same command again, or pass --allow-missing to leave them out",
            file=sys.stderr,
        )
        return 1
    if result.dropped:
        print(f"dropped the old collection '{result.source}'")
    else:
        print(f"the old collection '{result.source}' is kept: drop it with scripts/reindex.py --drop {result.source}")
    print(
        f"switched: '{result.target}' is now the active collection. A running service keeps serving "
        f"'{result.source}' until it is restarted with the new model's settings ({_model_settings(settings)})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
