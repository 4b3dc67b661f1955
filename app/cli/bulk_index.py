"""Index every image under a folder, through the running service's REST API or directly into its database.

    python scripts/bulk_index.py ~/Pictures --api http://localhost:8000     # batches of files to POST /index_images
    python scripts/bulk_index.py ~/Pictures --direct --workers 4             # no server: decode, embed, write here

Resumable: each file is hashed (SHA-256, the image id) and the server (or, with ``--direct``, the database) is asked
which ids it already has before anything is uploaded, so a second run, or a run after an interruption (even
``kill -9``), only sends what is missing. The stored filename is the path relative to FOLDER, so search results say
where each match lives.

``--direct`` runs next to the database with the service's own settings (environment / ``.env``: DATABASE_URL or
DATA_DIR's embedded PostgreSQL, VECTOR_DB, IMAGE_DIR, EMBEDDER, EMBED_BATCH_SIZE...) and the same ingest code as the
server (:mod:`app.indexing.pipeline`): decoding in ``--workers`` processes, embedding in batches, batched database
writes, all overlapped. With pgvector it may run while the service runs (also on the embedded PostgreSQL, which the two
processes share); Milvus Lite allows one process per database file, so stop the service first there.

Exit status: 0 when every file was indexed or already there, 1 when some failed (their reasons go to the failures
log), 2 for usage errors or an API that cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import httpx
from tqdm import tqdm

from app.cli.client import add_api_arguments, error_detail, make_client, request
from app.ids import image_id_of_file
from app.imaging.extensions import IMAGE_EXTENSIONS

EXISTS_BATCH = 1000  # the most ids POST /images/exists accepts at once
DEFAULT_BATCH_SIZE = 32  # files per POST /index_images (the server's MAX_BATCH_FILES defaults to 64)
BATCH_BYTES = 100_000_000  # most bytes per POST /index_images (the server's MAX_BATCH_MB defaults to 200)


class ApiUnreachable(Exception):
    """The API did not answer (or answered like something else) even after the retries."""


class ApiRefused(ApiUnreachable):
    """The API refused the request for want of a (valid) API key: no other batch can succeed either."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One file to index: where it is, the name to store (relative POSIX path) and its content hash."""

    path: Path
    name: str
    image_id: str


# --- files -------------------------------------------------------------------------------------------------
def iter_files(folder: Path, all_files: bool = False) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, relative POSIX name)`` for the files to index, in a stable sorted order.

    Hidden files and directories (leading dot) are skipped; without ``all_files`` only known image extensions are
    kept. Symlinked directories are followed, each real directory at most once so that a link loop terminates.
    """
    seen_dirs: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: prunes and orders the walk
        for name in sorted(files):
            if name.startswith("."):
                continue
            if not all_files and Path(name).suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                continue
            path = Path(root, name)
            if path.is_file():  # follows symlinks; drops dangling links, sockets, FIFOs
                yield path, path.relative_to(folder).as_posix()


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of at most ``size`` items (itertools.batched is Python 3.12+)."""
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


# --- HTTP --------------------------------------------------------------------------------------------------
def check_refused(response: httpx.Response, what: str) -> None:
    """Raise :class:`ApiRefused` when the server refused ``what`` for want of a valid key (401/403)."""
    if response.status_code in (401, 403):
        raise ApiRefused(
            f"{what} answered {response.status_code} {error_detail(response)} "
            "(pass the server's key with --api-key or IMAGE_SEARCH_API_KEY)"
        )


def check_api(client: httpx.Client, api: str, retries: int) -> None:
    """Fail fast with :class:`ApiUnreachable` before scanning a large folder against a wrong or dead URL."""
    try:
        response = request(client, "GET", "/health", retries)
    except httpx.TransportError as exc:
        raise ApiUnreachable(f"cannot reach the API at {api} ({type(exc).__name__}: {exc})") from exc
    if response.status_code != 200:
        raise ApiUnreachable(f"the API at {api} is not ready: GET /health answered {response.status_code}")


def existing_ids(client: httpx.Client, ids: list[str], retries: int) -> set[str]:
    """Which of these ids (at most 1000) the server already has."""
    try:
        response = request(client, "POST", "/images/exists", retries, json={"ids": ids})
    except httpx.TransportError as exc:
        raise ApiUnreachable(f"lost the API ({type(exc).__name__}: {exc})") from exc
    check_refused(response, "POST /images/exists")
    if response.status_code != 200:
        raise ApiUnreachable(f"POST /images/exists answered {response.status_code} {error_detail(response)}")
    return set(response.json()["existing"])


def upload_batch(
    client: httpx.Client, candidates: list[Candidate], retries: int
) -> list[tuple[Candidate, str, str | None]]:
    """Index a batch with one ``POST /index_images``; returns ``(candidate, status, reason)`` per file.

    status is ``indexed``/``exists`` (reason ``None``) or ``failed`` with ``"HTTP <code>: <the API's detail>"``
    for a file the server refused; when the whole request fails, every file of the batch fails with its reason.
    """
    try:
        # Read here, one batch per upload thread: memory is bounded by --concurrency x BATCH_BYTES.
        files = [("files", (c.path.name, c.path.read_bytes())) for c in candidates]
        response = request(
            client, "POST", "/index_images", retries, files=files, data={"filenames": [c.name for c in candidates]}
        )
    except (httpx.HTTPError, OSError) as exc:
        return [(c, "failed", f"{type(exc).__name__}: {exc}") for c in candidates]
    check_refused(response, "POST /index_images")
    if response.status_code != 200:
        reason = f"HTTP {response.status_code}: {error_detail(response)}"
        return [(c, "failed", reason) for c in candidates]
    try:
        results = response.json()["results"]
        if len(results) != len(candidates):
            raise ValueError(f"{len(results)} results for {len(candidates)} files")
        out = []
        for c, r in zip(candidates, results, strict=True):
            if r["status"] in ("indexed", "exists"):
                out.append((c, r["status"], None))
            else:
                out.append((c, "failed", f"HTTP {r.get('code') or 422}: {r.get('detail') or 'refused'}"))
        return out
    except (ValueError, KeyError, TypeError) as exc:  # e.g. a proxy's page instead of the API's answer
        reason = f"HTTP {response.status_code}: unexpected answer ({exc}) {response.text[:200]!r}"
        return [(c, "failed", reason) for c in candidates]


def pack(candidates: list[Candidate], batch_size: int, max_bytes: int = BATCH_BYTES) -> Iterator[list[Candidate]]:
    """Consecutive batches of at most ``batch_size`` files and about ``max_bytes`` bytes (a bigger file goes alone)."""
    batch: list[Candidate] = []
    size = 0
    for c in candidates:
        try:
            n = c.path.stat().st_size
        except OSError:
            n = 0  # upload_batch reports the error
        if batch and (len(batch) >= batch_size or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(c)
        size += n
    if batch:
        yield batch


# --- the run -----------------------------------------------------------------------------------------------
class Run:
    """Counts, progress bar and failures log of one bulk-index run."""

    def __init__(self, failures_log: Path, show_progress: bool) -> None:
        self.scanned = self.already = self.indexed = self.failed = 0
        self.uploaded = 0  # uploads answered, for the rate (a disabled tqdm bar does not count)
        self.failures_log = failures_log
        self._log_file = None
        self.started = time.monotonic()
        # The total grows as batches are hashed, so uploads start before the whole tree has been read.
        self.bar = tqdm(total=0, unit="img", desc="indexing", dynamic_ncols=True, disable=not show_progress)

    def fail(self, name: str, reason: str) -> None:
        self.failed += 1
        if self._log_file is None:  # created on the first failure only: a clean run leaves no log behind
            self._log_file = self.failures_log.open("w", encoding="utf-8")
        self._log_file.write(f"{name}\t{reason}\n")
        self._log_file.flush()  # keep what is known if the run is interrupted
        self.bar.write(f"failed: {name}: {reason}", file=sys.stderr)

    def finish(self) -> None:
        self.bar.close()
        if self._log_file is not None:
            self._log_file.close()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.uploaded / elapsed
        # Every scanned file is in exactly one count: a run that stopped early (API lost, key refused, Ctrl-C) also
        # says how many it never got to (hashed but not looked up, or queued for upload), so the line adds up.
        not_done = self.scanned - self.already - self.indexed - self.failed
        print(
            f"scanned {self.scanned} files: {self.already} already indexed, {self.indexed} indexed, "
            f"{self.failed} failed ({rate:.1f} img/s)" + (f"; {not_done} not done" if not_done > 0 else "")
        )
        if self._log_file is not None:
            print(f"failures written to {self.failures_log}")


def plan(
    folder: Path, run: Run, existing: Callable[[list[str]], set[str]], *, all_files: bool
) -> Iterator[list[Candidate]]:
    """Hash the folder batch by batch (1000 files) and yield, per batch, the files whose ids ``existing`` lacks.

    Counts scanned, already indexed (also duplicates within this run) and unreadable files on ``run``.
    """
    seen: set[bytes] = set()  # ids met earlier in this run: a duplicate file counts as already indexed
    for batch in batched(iter_files(folder, all_files), EXISTS_BATCH):
        candidates = []
        for path, name in batch:
            run.scanned += 1
            try:
                image_id = image_id_of_file(path)
            except OSError as exc:
                run.fail(name, f"{type(exc).__name__}: {exc}")
                continue
            digest = bytes.fromhex(image_id)  # 32 bytes instead of a 64-character str per file
            if digest in seen:
                run.already += 1
                continue
            seen.add(digest)
            candidates.append(Candidate(path, name, image_id))
        have = existing([c.image_id for c in candidates]) if candidates else set()
        todo = [c for c in candidates if c.image_id not in have]
        run.already += len(candidates) - len(todo)
        run.bar.total += len(todo)
        run.bar.refresh()
        yield todo


def index_folder(
    client: httpx.Client,
    folder: Path,
    run: Run,
    *,
    all_files: bool,
    concurrency: int,
    retries: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:
    """Hash the folder batch by batch, skip what the server has, and upload the rest in concurrent batches."""
    pending: dict[Future, list[Candidate]] = {}

    def collect(block: bool) -> None:
        done, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in done:
            pending.pop(future)
            for candidate, status, reason in future.result():
                if status == "indexed":
                    run.indexed += 1
                elif status == "exists":  # same bytes indexed meanwhile (another client, or a duplicate)
                    run.already += 1
                else:
                    run.fail(candidate.name, reason or "unknown error")
                run.uploaded += 1
                run.bar.update()

    def existing(ids: list[str]) -> set[str]:
        return existing_ids(client, ids, retries)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload") as pool:
        try:
            for todo in plan(folder, run, existing, all_files=all_files):
                for batch in pack(todo, batch_size):
                    pending[pool.submit(upload_batch, client, batch, retries)] = batch
                    # Hash the next files while these upload, but keep the queue (and memory) bounded.
                    while len(pending) > 2 * concurrency:
                        collect(block=True)
                collect(block=False)
            while pending:
                collect(block=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # let in-flight uploads finish, drop the queue
            raise


def index_direct(
    folder: Path,
    run: Run,
    *,
    all_files: bool,
    workers: int,
    batch_size: int | None,
    settings=None,  # noqa: ANN001
) -> None:
    """Index into the service's database and image store from this process (``IngestPipeline``).

    ``settings``: an :class:`app.config.Settings`; default: the service's, from the environment and ``.env``.
    Raises :class:`app.errors.DatabaseUnavailableError` when the database cannot be reached and
    :class:`app.errors.StorageFullError` when free space under ``IMAGE_DIR`` is below ``MIN_FREE_MB`` (checked
    before the model is loaded, and again before each batch is written).
    """
    from app.config import Settings
    from app.embedders import load_embedder
    from app.indexing.pipeline import IngestItem, IngestPipeline
    from app.storage import from_settings
    from app.vectordb import create_handler

    settings = (settings or Settings()).for_operator_tool()
    store = from_settings(settings)
    store.ensure_space()  # refuse at once, not after loading the model and decoding the first batch
    embedder = load_embedder(settings)
    db = create_handler(settings)
    try:
        db.ensure_collection(embedder.model_id, embedder.dim)

        def on_result(name: str, status: str, reason: str | None) -> None:
            if status == "indexed":
                run.indexed += 1
            elif status == "exists":
                run.already += 1
            else:
                run.fail(name, reason or "unknown error")
            run.uploaded += 1
            run.bar.update()

        pipeline = IngestPipeline(
            embedder,
            db,
            store,
            workers=workers,
            batch_size=batch_size or settings.embed_batch_size,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_upload_bytes,
            on_result=on_result,
        )
        items = (
            IngestItem(c.path, c.name)
            for todo in plan(folder, run, lambda ids: db.existing_ids(ids), all_files=all_files)
            for c in todo
        )
        pipeline.start()
        run.started = time.monotonic()  # the rate counts indexing, not loading the model or starting the workers
        pipeline.run(items)
    finally:
        db.close()
        store.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Index all images under FOLDER through the image search API (resumable).",
        epilog="Exit status: 0 all indexed, 1 some files failed, 2 usage error or API unreachable.",
    )
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="folder to index, recursively")
    add_api_arguments(parser, key_help="needed for writes when the server sets API_KEY")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel batch uploads (default: 4)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"files per upload request (default: {DEFAULT_BATCH_SIZE}; at most the server's MAX_BATCH_FILES), "
        "or with --direct images per model call and database write (default: EMBED_BATCH_SIZE)",
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="no server: decode, embed and write into the database here, with the service's settings "
        "(DATABASE_URL or DATA_DIR, VECTOR_DB, IMAGE_DIR, EMBEDDER...); --api is ignored",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="with --direct: decoding processes (default: the number of CPUs)",
    )
    parser.add_argument(
        "--all-files",
        action="store_true",
        help="send every non-hidden file, not only image extensions; the server decides",
    )
    parser.add_argument(
        "--failures-log",
        type=Path,
        default=Path("bulk_index_failures.log"),
        help="where failed files and their reasons go, if any (default: ./bulk_index_failures.log)",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="retries per request on connection errors and 502/503/504 (default: 3)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"not a folder: {args.folder}")
    if not args.failures_log.parent.is_dir():
        parser.error(f"no folder for the failures log: {args.failures_log.parent}")
    if args.concurrency < 1 or args.retries < 0 or args.timeout <= 0:
        parser.error("--concurrency must be >= 1, --retries >= 0 and --timeout > 0")
    if args.workers < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--workers and --batch-size must be >= 1")
    return args


def finish(run: Run, work: Callable[[], None], errors: dict[type[BaseException], str]) -> int:
    """Run ``work`` and close ``run``; the exit status: 0, or 1 when a file failed; 2 after printing the message of
    the first class in ``errors`` that matches (``{exc}`` is the error); 130 when interrupted. The messages say
    whether running the same command again resumes."""
    try:
        work()
    except KeyboardInterrupt:
        run.finish()
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except tuple(errors) as exc:
        run.finish()
        message = next(text for cls, text in errors.items() if isinstance(exc, cls))
        print(f"error: {message.format(exc=exc)}", file=sys.stderr)
        return 2
    run.finish()
    return 1 if run.failed else 0


def main_direct(args: argparse.Namespace) -> int:
    """``--direct``: index into the database from this process; same summary, log and exit codes as the API mode."""
    from app.errors import DatabaseUnavailableError, StorageFullError, StorageUnavailableError

    run = Run(args.failures_log, show_progress=not args.no_progress)
    return finish(
        run,
        lambda: index_direct(
            args.folder, run, all_files=args.all_files, workers=args.workers, batch_size=args.batch_size
        ),
        {
            DatabaseUnavailableError: "the database is unavailable ({exc}); run the same command again to resume",
            StorageFullError: "{exc} Then run the same command again to resume.",
            StorageUnavailableError: "{exc} Then run the same command again to resume.",
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.direct:
        return main_direct(args)
    api = args.api.rstrip("/")
    # The uploads plus the exists look-ups.
    with make_client(args, connections=args.concurrency + 1) as client:
        try:
            check_api(client, api, args.retries)
        except ApiUnreachable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        run = Run(args.failures_log, show_progress=not args.no_progress)
        return finish(
            run,
            lambda: index_folder(
                client,
                args.folder,
                run,
                all_files=args.all_files,
                concurrency=args.concurrency,
                retries=args.retries,
                batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
            ),
            # ApiRefused first: it is an ApiUnreachable, but running again without a key will not help.
            {ApiRefused: "{exc}", ApiUnreachable: "{exc}; run the same command again to resume"},
        )


if __name__ == "__main__":
    sys.exit(main())
