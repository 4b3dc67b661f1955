"""Check that the image store (IMAGE_DIR, or IMAGE_STORE_URL's bucket) and the vector database agree; with --repair,
make them agree.

Usage: ``image-search-fsck [--repair] [--backfill] [--calibrate] [--json]`` (or ``python scripts/fsck.py`` from a
checkout), with the service's own settings (environment and ``.env``:
``DATABASE_URL`` or ``DATA_DIR``'s embedded PostgreSQL, ``VECTOR_DB``, ``IMAGE_DIR``, ``EMBEDDER``...).

Reports, one line each: rows whose original is gone, originals without a row, temporary upload files. With
``--repair``: rows without an original are deleted (and listed), originals without a row are indexed again (the
model is loaded only then), temporary files are removed. Safe next to a running server or ``bulk_index.py
--direct`` (each fix is re-checked under the id's lock; app/indexing/fsck.py).

With ``--calibrate`` (pgvector): a collection too large to be calibrated at start (over 20,000 rows without
binary quantisation thresholds; the service logs a warning) gets them; it rewrites the table, so stop the service
first (docs/backends.md).

With ``--backfill``: rows indexed before ``taken_at`` was stored get it from their original's EXIF
``DateTimeOriginal`` (vectors unchanged, no model loaded), so the ``taken_after``/``taken_before`` filters see them.

Exit codes: 0 store and database agree (or everything found was repaired); 1 mismatches remain; 2 the database or
the object store is unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: ``--repair``, ``--backfill``, ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repair", action="store_true", help="fix what is found (see the module docstring)")
    parser.add_argument(
        "--backfill", action="store_true", help="fill taken_at (EXIF date) into rows indexed before it was stored"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="pgvector: set the binary quantisation thresholds of a collection that has none (rewrites the table: "
        "about 10 minutes at a million rows; stop the service first)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return parser.parse_args(argv)


def _reindexer(settings, db, store):
    """A ReindexFn backed by the service's model (loaded on first use)."""
    from app.embedders import load_embedder
    from app.imaging.prepare import prepare_bytes
    from app.indexing.fsck import reindex_with

    state: dict = {}

    def reindex(files):
        if "fn" not in state:
            info = db.collection_info()
            embedder = load_embedder(settings, collection_model=None if info is None else info.model_id)
            if embedder is None:
                raise SystemExit("error: EMBEDDER=none cannot index originals again; set EMBEDDER and rerun")

            def prepare(data: bytes, name: str):
                return prepare_bytes(
                    data,
                    name,
                    max_pixels=settings.max_image_pixels,
                    max_bytes=settings.max_upload_bytes,
                    draft_size=embedder.draft_size,
                    fit_size=embedder.fit_size,
                )

            state["fn"] = reindex_with(embedder.embed_images, prepare, db, store)
        return state["fn"](files)

    return reindex


def main(argv: list[str] | None = None) -> int:
    """Check (and with ``--repair`` fix) the store against the database; returns the exit code (0, 1 or 2)."""
    args = parse_args(argv)
    from app.config import Settings
    from app.errors import DatabaseUnavailableError, StorageUnavailableError
    from app.indexing.fsck import backfill_taken_at, check, repair
    from app.library.files import library_view
    from app.storage import from_settings
    from app.vectordb import create_handler

    settings = Settings().for_operator_tool()
    try:
        db = create_handler(settings)
    except DatabaseUnavailableError as exc:
        print(f"error: the database is unavailable: {exc}", file=sys.stderr)
        return 2
    libraries = None
    try:
        # Photo libraries' rows have no original in the store: their scans own them (docs/libraries.md).
        store, libraries = library_view(settings, from_settings(settings, with_space_check=False))
        held = libraries.held_ids() if libraries is not None else set()
        report = check(db, store, held)
        found = report.lines()
        actions: list[str] = []
        remaining = found
        if args.repair and not report.clean:
            actions = repair(db, store, report, _reindexer(settings, db, store))
            remaining = check(db, store, held).lines()
        backfilled = backfill_taken_at(db, store) if args.backfill else None
        # Only PostgreSQL ranks filtered searches by a stored binary quantisation (app/vectordb/pgvector.py).
        calibrate = getattr(db, "calibrate_bq", None)
        calibrated = calibrate() if args.calibrate and calibrate is not None else None
    except DatabaseUnavailableError as exc:
        print(f"error: the database is unavailable: {exc}", file=sys.stderr)
        return 2
    except StorageUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if libraries is not None:
            libraries.close()
        db.close()
    if args.json:
        print(
            json.dumps(
                {
                    "rows": report.rows,
                    "originals": report.originals,
                    "library_rows": report.library_rows,
                    "rows_written_during": report.rows_written_during,
                    "originals_written_during": report.originals_written_during,
                    "rows_deleted_during": report.rows_deleted_during,
                    "originals_deleted_during": report.originals_deleted_during,
                    "mismatches": found,
                    "repaired": actions,
                    "remaining": remaining,
                    **({} if backfilled is None else {"backfill": vars(backfilled)}),
                    **({} if calibrated is None else {"calibrated": calibrated}),
                }
            )
        )
    else:
        for line in found:
            print(line)
        for line in actions:
            print(f"repaired: {line}")
        if calibrated is not None:
            print("calibrated embedding_bq" if calibrated else "embedding_bq: already calibrated (or no rows)")
        summary = f"checked {report.rows} rows and {report.originals} originals: {len(found)} mismatches"
        if why := report.count_difference():
            summary += f" ({why})"
        if args.repair:
            summary += f", {len(actions)} repaired, {len(remaining)} remaining"
        print(summary)
        if backfilled is not None:
            print(
                f"backfill: {backfilled.filled} rows given taken_at, {backfilled.without_date} originals without an "
                f"EXIF date, {backfilled.rows} rows read"
            )
    return 1 if remaining else 0


if __name__ == "__main__":
    sys.exit(main())
