"""Move a collection's originals between image stores (disk to bucket and back): resumable and hash-verified.

Usage: ``image-search-move-originals --to URL [--from URL] [--delete-source] [--verify] [--workers N]``
(or ``python scripts/move_originals.py`` from a checkout), with the service's own settings (environment and
``.env``). ``--from`` defaults to the store the service uses (``IMAGE_STORE_URL``, else ``IMAGE_DIR``); both take
``file:///path`` or ``s3://bucket/prefix``, with the ``AWS_*`` / ``S3_*`` settings for any bucket.

Each original the target lacks is copied, read back and checked (its SHA-256 must equal its id); only then, with
``--delete-source``, is the source's original removed. A run stopped at any point (``kill -9`` included) is
finished by running the same command again: what is already in the target is not copied again. Logic:
app/storage/move.py. Then start the service with ``IMAGE_STORE_URL`` set to the target, and check with
``fsck.py``.

To move a live collection: run it once while the service serves (copies everything; reads and writes go on),
stop the service, run it again with ``--delete-source`` (copies only what was indexed meanwhile), start the
service with the new ``IMAGE_STORE_URL``. An image deleted through the service between the two runs keeps its copy
in the target without a row (the tool does not read the database): the start-up sweep removes it after
``ORPHAN_GRACE_S``; ``fsck.py --repair`` would index it again (stop the service before the first run to avoid it).

Exit codes: 0 every original is in the target; 1 some originals could not be moved (listed; they stay in the
source); 2 cannot run (a store unreachable or full, a bad URL, source and target the same): run again to resume.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Move the originals from one image store to another (file:///path or s3://bucket/prefix), "
        "resumable and verified by SHA-256.",
        epilog="Exit status: 0 all moved, 1 some could not be moved, 2 cannot run (run again to resume).",
    )
    parser.add_argument(
        "--to", required=True, metavar="URL", help="the target store: file:///path or s3://bucket/prefix"
    )
    parser.add_argument(
        "--from", dest="source", metavar="URL", help="the source store (default: IMAGE_STORE_URL, else IMAGE_DIR)"
    )
    parser.add_argument(
        "--delete-source",
        action="store_true",
        help="remove each original from the source once its copy in the target was verified",
    )
    parser.add_argument("--verify", action="store_true", help="also hash-check the originals the target already holds")
    parser.add_argument("--workers", type=int, default=8, help="originals moved at once (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="print one line per original: its outcome and id")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    from app.store_url import parse_store_url

    for url in (args.to, args.source):
        if url is not None:
            try:
                parse_store_url(url)
            except ValueError as exc:
                parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the move; returns the exit code (0, 1 or 2)."""
    args = parse_args(argv)
    from tqdm import tqdm

    from app.config import Settings
    from app.errors import StorageFullError, StorageUnavailableError
    from app.storage import from_settings
    from app.storage.move import MoveResult, Outcome, move_originals

    settings = Settings().for_operator_tool()
    source = from_settings(
        settings.model_copy(update={"image_store_url": args.source}) if args.source else settings,
        with_space_check=False,
    )
    target = from_settings(settings.model_copy(update={"image_store_url": args.to}))
    bar = tqdm(total=None, unit="img", desc="moving", dynamic_ncols=True, disable=args.no_progress)

    def progress(result: MoveResult, image_id: str, outcome: Outcome) -> None:
        if args.verbose:
            print(f"{outcome} {image_id}", flush=True)
        bar.n = result.done
        bar.refresh()

    try:
        result = move_originals(
            source,
            target,
            delete_source=args.delete_source,
            verify=args.verify,
            workers=args.workers,
            progress=progress,
        )
    except (StorageUnavailableError, StorageFullError, ValueError) as exc:
        print(f"error: {exc} Run the same command again to resume.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        bar.close()
        source.close()
        target.close()
    for location, reason in result.failures:
        print(f"failed: {location}: {reason}", file=sys.stderr)
    print(
        f"moved originals from {source.url} to {target.url}: {result.copied} copied "
        f"({result.bytes_copied / 1e6:.1f} MB), {result.present} already there, {result.replaced} bad copies "
        f"replaced, {result.vanished} deleted meanwhile, {len(result.failures)} failed, {result.deleted} removed "
        "from the source"
    )
    if result.failures:
        return 1
    print(f"done: start the service with IMAGE_STORE_URL={args.to}, then check with scripts/fsck.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
