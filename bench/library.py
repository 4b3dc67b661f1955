#!/usr/bin/env python
"""Photo libraries indexed in place (issue #26): scans of a large synthetic tree, the disk a library uses, and the
ingest rate of a library against ``bulk_index.py --direct``. One JSON line per part (key ``part``).

    python bench/library.py --part scan --n 200000 [--state sqlite,postgres] [--rescans 3] [--cprofile]
    python bench/library.py --part disk [--dataset ../shared/datasets/instance_small/images]
    python bench/library.py --part ingest [--dataset ../shared/datasets/caltech101_subset/images] [--limit 1000]
                            [--workers 2] [--repeat 2]

``--part scan``: a synthetic tree of ``--n`` small JPEGs (16x16 px, random pixels, so every file's bytes differ; about
800 bytes each), laid out like a camera roll, ``YYYY/MM-event/IMG_nnnn.jpg`` in about ``n / 65`` folders, is
generated once under ``--tree-cache`` (outside the repository) and hard-linked into a fresh working copy per run.
A library over it is scanned through the service's own facade (:class:`app.library.libraries.Libraries`, as
``POST /libraries`` and ``POST /libraries/{name}/scan`` do: a scan thread, its progress written to the state), on
the real embedded PostgreSQL + pgvector (``GuardedHandler`` over ``create_handler``), the real library state and the
real id locks (``app.storage.from_settings``). ``--state sqlite`` is the default configuration (``DATABASE_URL``
unset: the embedded server under ``DATA_DIR/pgdata``, the library state in ``DATA_DIR/libraries.sqlite3``, ``flock``
id locks); ``--state postgres`` sets ``DATABASE_URL`` to an embedded server of its own (the same package), so the
state and the id locks are PostgreSQL's (what replicas share). Phases, in order: ``first`` (every file new),
``unchanged`` (x ``--rescans``), then 1 % of ``--n`` ``added`` (new bytes, in new and existing folders),
``removed``, ``moved`` (to another folder, renamed), ``moved_before_fix`` (1 % more moved, each renamed row written
in an upsert of its own as before this benchmark's fix, :class:`RenamesBeforeFix`; left out with
``--no-before-fix``), ``touched`` (rewritten with the same bytes: new inode and mtime), ``mixed`` (added + removed +
moved at once) and a last ``unchanged``. Per phase: the scan's own counts (:class:`ScanResult`), ``seconds`` (wall,
from the scan request to the end of the scan thread), ``model_images`` (images the embedder was given, counted by
the embedder) and ``expected_new`` (files whose bytes the collection has never seen); ``ok`` says
``indexed == model_images == expected_new``; ``db``: the vector database's ``upsert``, ``get``, ``delete`` and
``existing_ids`` calls during the phase (calls, rows or ids, seconds summed over threads).

THE EMBEDDER OF ``--part scan`` IS NOT A MODEL: :class:`PixelEmbedder` (``bench:pixels-8x8``) returns each image's
8x8 RGB pixels, centred and L2-normalised (192 dimensions). The real model would need hours for 200,000 images on
2 CPU cores and would measure the model, not the scan; everything else is the service's path (decoding in
``LIBRARY_SCAN_WORKERS`` processes, batches of ``EMBED_BATCH_SIZE``, HNSW upserts of 192-d vectors). A rescan of
unchanged files calls no model at all, so its time is the real one.

Then the unchanged rescan is profiled by calling :func:`app.library.scan.scan_library` directly ``--profile-reps``
times: ``files_s`` (:meth:`LibraryState.files`, the one query), ``walk_s`` (:func:`walk_library`), ``rest_s`` (the
diff and the rest); ``walk_no_excludes_s`` (the walk without ``LIBRARY_EXCLUDE``'s globs) and ``scandir_floor_s``
(a bare ``os.scandir`` + ``stat`` walk of the same tree) say what the walk costs beyond listing folders. Unless
``--no-before-fix``, each profiled rescan alternates with one whose exclusion globs are matched as before this
benchmark's fix (:class:`GlobsBeforeFix`: wcmatch compiled the patterns at every file), reported as ``before_fix_*``.
``--cprofile`` prints the top functions of one unchanged rescan to stderr.

``--part disk``: the service (:meth:`SearchService.open`, real offline model ``EMBEDDER=efficientnet``) on a fresh
``DATA_DIR`` with its own embedded PostgreSQL; a library over ``--dataset`` (read in place) is created and scanned,
then every image's thumbnail is rendered through the service. Reported: ``DATA_DIR`` by part (``pgdata`` before and
after, ``images/`` = the store of originals, ``libraries.sqlite3``, ``cache/``), the ``images`` table with its
indexes, and whether the library folder is byte-for-byte untouched (path, size, mtime of every file).
The model cache (``--model-cache``) is outside ``DATA_DIR`` and not counted.

``--part ingest``: the same folder (``--dataset``, or a copy of its first ``--limit`` files: a library does not
follow symlinks that leave its root) into a fresh ``DATA_DIR`` (embedded PostgreSQL each) by ``bulk_index.py
--direct``'s code (:func:`app.cli.bulk_index.index_direct`, ``--workers`` decode processes) and by a library scan
(``LIBRARY_SCAN_WORKERS`` = ``--workers``), both with the real offline model loaded once beforehand and
``EMBED_BATCH_SIZE`` images per model call; alternated ``--repeat`` times, medians reported. ``direct_ips`` is the
house figure of ``bench/ingest.py`` (from the moment the decode processes have started to the last row);
``library_ips`` is the whole scan (walk, hashing, starting the decode processes, ingest) and
``library_ips_like_direct`` the same scan without the time its pipeline spent starting the decode processes (the
clock of ``direct_ips``). Each round runs both back to back (direct first in even rounds, the library first in odd
ones); ``library_vs_direct_pairs`` are the rounds' ratios, less exposed to a load that changes within minutes.

The LAST line printed by each part is its JSON object; progress goes to stderr. Temporary data goes under
``--tmp`` (default: a new folder in the system's temporary directory), deleted at the end unless ``--keep``.
Top-level imports stay light on purpose: the decode workers are spawned and re-import this module.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE_VERSION = 1  # bump when the generated tree changes
LIBRARY = "bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    """What the figures were measured on: CPUs, load average, date."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": model,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def emit(result: dict) -> None:
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result), flush=True)


# --- the synthetic tree ---------------------------------------------------------------------------------------------
def jpeg_bytes(index: int) -> bytes:
    """A 16x16 JPEG of random pixels seeded by ``index`` (distinct bytes for distinct indices; checked)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(index).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()


_EVENTS = (
    "birthday beach hike wedding zoo garden snow trip party concert museum harbour picnic school market "
    "camping holiday visit dinner parade"
).split()


def layout(n: int, seed: int = 26) -> list[str]:
    """``n`` library paths like a camera roll: ``YYYY/MM-event/IMG_nnnn.jpg``, folders of 10-120 files."""
    rng = random.Random(seed)
    paths: list[str] = []
    counter = 1
    year, month, event = 2008, 1, 0
    while len(paths) < n:
        folder = f"{year}/{month:02d}-{_EVENTS[rng.randrange(len(_EVENTS))]}-{event % 7 + 1}"
        for _ in range(min(rng.randint(10, 120), n - len(paths))):
            paths.append(f"{folder}/IMG_{counter:04d}.jpg")
            counter = counter % 9999 + 1
        event += 1
        if rng.random() < 0.3:
            month += 1
            if month > 12:
                year, month = year + 1, 1
    return paths


def _write_files(job: tuple[str, list[tuple[int, str]]]) -> list[bytes]:
    root, items = job
    import hashlib

    digests = []
    for index, rel in items:
        data = jpeg_bytes(index)
        full = os.path.join(root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        digests.append(hashlib.sha256(data).digest())
    return digests


def write_files(root: Path, items: list[tuple[int, str]], workers: int) -> None:
    """Write ``(index, library path)`` files under ``root`` in ``workers`` processes; checks the bytes are distinct."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(str(root), items[i : i + 2000]) for i in range(0, len(items), 2000)]
    seen: set[bytes] = set()
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        for digests in pool.map(_write_files, chunks):
            seen.update(digests)
    if len(seen) != len(items):
        raise RuntimeError(f"{len(items) - len(seen)} generated files share their bytes")


def pristine_tree(cache: Path, n: int, workers: int) -> tuple[Path, list[str]]:
    """The generated tree of ``n`` files under ``cache`` (made once: a marker file says it is complete)."""
    paths = layout(n)
    marker = cache / f".complete-v{TREE_VERSION}-{n}"
    if marker.exists():
        log(f"tree: reusing {cache}")
        return cache, paths
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    log(f"tree: generating {n:,} files under {cache}")
    t0 = time.monotonic()
    write_files(cache, list(enumerate(paths)), workers)
    marker.touch()
    log(f"tree: {n:,} files in {len({p.rsplit('/', 1)[0] for p in paths}):,} folders, {time.monotonic() - t0:.1f} s")
    return cache, paths


def working_copy(pristine: Path, target: Path) -> None:
    """A copy of the tree made of hard links (fast; removing or renaming in it leaves the original alone)."""
    subprocess.run(["cp", "-al", str(pristine), str(target)], check=True)
    for marker in target.glob(".complete-*"):
        marker.unlink()


# --- the cheap embedder (NOT a model) -------------------------------------------------------------------------------
def pixel_embedder():
    """A :class:`PixelEmbedder` (defined here so the spawned decode workers never import the embedder base)."""
    import numpy as np
    from PIL import Image

    from app.embedders.base import Embedder

    class PixelEmbedder(Embedder):
        """NOT a model: an image's 8x8 RGB pixels (bilinear), centred and L2-normalised, 192 dimensions.
        Deterministic, about 20 us per image; counts the images it is given (``images``) and its calls."""

        model_id = "bench:pixels-8x8"
        dim = 192
        input_size = 16  # JPEG draft target; the tree's files are 16x16

        def __init__(self) -> None:
            self.images = 0
            self.calls = 0
            self._lock = threading.Lock()

        def embed_images(self, images):  # noqa: ANN001, ANN202 - Embedder's signature
            out = np.empty((len(images), self.dim), dtype=np.float32)
            for k, im in enumerate(images):
                a = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)
                v = a.ravel() - 127.5
                v[0] += 0.5  # never the zero vector
                out[k] = v / np.linalg.norm(v)
            with self._lock:
                self.images += len(images)
                self.calls += 1
            return out

    return PixelEmbedder()


# --- helpers --------------------------------------------------------------------------------------------------------
def du(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (``du -s -B1``; 0 when it does not exist)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def apparent(path: Path) -> int:
    """Bytes of the files under ``path`` (sizes, not blocks)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime_ns)`` of every file under ``folder``."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def mb(n: int) -> float:
    return round(n / 1e6, 2)


class Service:
    """The parts a library scan runs with, as :meth:`SearchService.open` builds them (the vector database behind its
    guard, the image store with its id locks) plus the libraries facade. ``close()`` it."""

    DB_CALLS = ("upsert", "get", "delete", "existing_ids")

    def __init__(self, settings, embedder, account_db: bool = False) -> None:  # noqa: ANN001
        from app.library.libraries import Libraries
        from app.storage import from_settings
        from app.vectordb import create_handler
        from app.vectordb.guard import GuardedHandler

        self.settings, self.embedder = settings, embedder
        self.db = GuardedHandler(create_handler(settings))
        self.db.ensure_collection(embedder.model_id, embedder.dim)
        self.store = from_settings(settings)
        self.libraries = Libraries(settings, self.db, self.store, embedder)
        self.db_time: dict[str, list[float]] = {}  # call -> [calls, rows or ids, seconds] (account_db)
        self._db_lock = threading.Lock()
        if account_db:
            for name in self.DB_CALLS:
                setattr(self.db, name, self._accounted(name, getattr(self.db, name)))

    def _accounted(self, name: str, fn):  # noqa: ANN001, ANN202
        def call(arg, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(arg, *a, **kw)
            finally:
                seconds = time.perf_counter() - t0
                n = len(arg) if isinstance(arg, list | tuple | set) else 1
                with self._db_lock:
                    entry = self.db_time.setdefault(name, [0, 0, 0.0])
                    entry[0] += 1
                    entry[1] += n
                    entry[2] += seconds

        return call

    def take_db_time(self) -> dict:
        """``{call: {"calls", "n", "s"}}`` since the last take (vector-database calls, any thread)."""
        with self._db_lock:
            out = {k: {"calls": v[0], "n": v[1], "s": round(v[2], 2)} for k, v in self.db_time.items()}
            self.db_time.clear()
        return out

    def scan(self, create_roots: list[str] | None = None) -> tuple[dict, float]:
        """Create the library (first scan) or scan it again; wait; ``(last_scan dict, wall seconds)``."""
        t0 = time.monotonic()
        if create_roots is not None:
            self.libraries.create(LIBRARY, create_roots)
        else:
            _, started = self.libraries.scan(LIBRARY)
            assert started
        self.libraries.wait(LIBRARY)
        wall = time.monotonic() - t0
        status = self.libraries.status(LIBRARY)
        if status.state != "idle" or status.last_scan is None:
            raise RuntimeError(f"scan ended in state {status.state}: {status.error}")
        return status.last_scan, wall

    def close(self) -> None:
        self.libraries.close()
        self.store.close()
        self.db.close()


# --- part: scan -----------------------------------------------------------------------------------------------------
_COUNTS = (
    "files unchanged new changed indexed linked back_online offline moved_away purged failed deferred skipped "
    "images_restored images_hidden images_removed images_renamed"
).split()


class Tree:
    """The working copy and what changes it: tracks which library paths exist and the next unused file index."""

    def __init__(self, root: Path, paths: list[str], seed: int = 7) -> None:
        self.root = root
        self.paths = list(paths)
        self.next_index = len(paths)
        self.rng = random.Random(seed)
        self.folders = sorted({p.rsplit("/", 1)[0] for p in paths})
        self.new_folders = 0

    def add(self, k: int, workers: int) -> int:
        """``k`` files of new bytes: half in 20 new folders of a new year, half in existing folders."""
        items = []
        for j in range(k):
            if j < k // 2:
                self.new_folders += 1
                folder = f"2031/{(self.new_folders // 50) % 12 + 1:02d}-new-event-{(self.new_folders % 20) + 1}"
            else:
                folder = self.rng.choice(self.folders)
            items.append((self.next_index, f"{folder}/NEW_{self.next_index:07d}.jpg"))
            self.next_index += 1
        write_files(self.root, items, workers)
        self.paths.extend(rel for _, rel in items)
        return k

    def _pick(self, k: int) -> list[int]:
        return sorted(self.rng.sample(range(len(self.paths)), k), reverse=True)

    def remove(self, k: int) -> int:
        for i in self._pick(k):
            os.unlink(self.root / self.paths.pop(i))
        return k

    def move(self, k: int) -> int:
        """``k`` files renamed into another existing folder (same bytes, same mtime)."""
        moved = []
        for i in self._pick(k):
            old = self.paths.pop(i)
            folder = self.rng.choice(self.folders)
            new = f"{folder}/MOVED_{i:07d}_{old.rsplit('/', 1)[1]}"
            os.rename(self.root / old, self.root / new)
            moved.append(new)
        self.paths.extend(moved)
        return k

    def touch(self, k: int) -> int:
        """``k`` files rewritten with the same bytes (a new inode with a new mtime: the hard-linked original is
        untouched)."""
        later = time.time_ns() + 10**9
        for i in self._pick(k):
            full = self.root / self.paths[i]
            data = full.read_bytes()
            tmp = full.with_name(".tmp-" + full.name)
            tmp.write_bytes(data)
            os.utime(tmp, ns=(later, later))
            os.replace(tmp, full)
        return k


class RenamesBeforeFix:
    """While entered, :func:`app.library.visibility.reconcile` writes each renamed row in an upsert of its own, as
    before this benchmark's fix (commit bbc3c11: one transaction per moved file), so one run measures both."""

    class _OneByOne:
        def __init__(self, db) -> None:  # noqa: ANN001
            self._db = db

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self._db, name)

        def upsert(self, records) -> None:  # noqa: ANN001
            for record in records:
                self._db.upsert([record])

    def __enter__(self) -> None:
        import app.library.visibility as visibility

        self.saved = original = visibility._reconcile_chunk

        def chunk(db, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            return original(self._OneByOne(db), *args, **kwargs)

        visibility._reconcile_chunk = chunk

    def __exit__(self, *exc: object) -> None:
        import app.library.visibility as visibility

        visibility._reconcile_chunk = self.saved


def scandir_floor(root: Path) -> tuple[float, int]:
    """A bare recursive ``os.scandir`` + ``stat`` of every file (bytes paths): the floor of any walk."""
    t0 = time.perf_counter()
    stack = [os.fsencode(root)]
    n = 0
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    e.stat()
                    n += 1
    return time.perf_counter() - t0, n


class GlobsBeforeFix:
    """While entered, :class:`Library` matches its exclusion globs as before the fix this benchmark led to (commit
    bbc3c11: ``wcglob.compile(...)`` at every call), so one run measures both."""

    def __enter__(self) -> None:
        import os as _os

        from wcmatch import glob as wcglob

        from app.library.model import GLOB_FLAGS, Library

        def excluded(self, path: bytes, extra=()) -> bool:  # noqa: ANN001
            patterns = self.excludes + tuple(extra)
            if not patterns:
                return False
            return wcglob.compile(patterns, flags=GLOB_FLAGS).match(_os.fsdecode(path))

        def folder_excluded(self, folder: bytes, extra=()) -> bool:  # noqa: ANN001
            patterns = [p[:-3] for p in (*self.excludes, *extra) if p.endswith("/**") and len(p) > 3]
            if not patterns:
                return False
            return wcglob.compile(patterns, flags=GLOB_FLAGS).match(_os.fsdecode(folder))

        self.saved = Library.excluded, Library.folder_excluded
        Library.excluded, Library.folder_excluded = excluded, folder_excluded  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        from app.library.model import Library

        Library.excluded, Library.folder_excluded = self.saved  # type: ignore[method-assign]


def profile_unchanged(svc: Service, tree: Tree, reps: int, cprofile: bool, before: bool) -> dict:
    """Time the parts of an unchanged rescan through :func:`scan_library` directly (see the module docstring);
    ``before``: alternate each rep with one under :class:`GlobsBeforeFix`."""
    import contextlib

    import app.library.scan as scan_module
    from app.library.walk import walk_library

    state = svc.libraries._open_state()
    ctx = svc.libraries._context(state)
    library = state.library(LIBRARY).library
    timings: dict[str, list[float]] = {}
    original_walk, original_files = scan_module.walk_library, state.files
    spent: dict[str, float] = {}

    def timed(name, fn):  # noqa: ANN001, ANN202
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    scan_module.walk_library = timed("walk_s", original_walk)
    state.files = timed("files_s", original_files)  # type: ignore[method-assign]
    try:
        for _ in range(reps):
            for variant in ("", "before_fix_") if before else ("",):
                spent.clear()
                with GlobsBeforeFix() if variant else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    result = scan_module.scan_library(ctx, library)
                    total = time.perf_counter() - t0
                assert result.unchanged == result.files == len(tree.paths) and result.indexed == 0, result
                for key, value in (
                    ("total_s", total),
                    ("files_s", spent["files_s"]),
                    ("walk_s", spent["walk_s"]),
                    ("rest_s", total - spent["files_s"] - spent["walk_s"]),
                ):
                    timings.setdefault(variant + key, []).append(value)
    finally:
        scan_module.walk_library, state.files = original_walk, original_files  # type: ignore[method-assign]
    out: dict = {k: round(statistics.median(v), 3) for k, v in timings.items()}
    out["total_s_runs"] = [round(v, 3) for v in timings["total_s"]]
    if before:
        out["before_fix_total_s_runs"] = [round(v, 3) for v in timings["before_fix_total_s"]]
    t0 = time.perf_counter()
    walk = walk_library(library, ())
    out["walk_no_excludes_s"] = round(time.perf_counter() - t0, 3)
    assert len(walk.files) == len(tree.paths)
    floor, n = scandir_floor(tree.root)
    out["scandir_floor_s"] = round(floor, 3)
    assert n == len(tree.paths), (n, len(tree.paths))
    if cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        scan_module.scan_library(ctx, library)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        print(buf.getvalue(), file=sys.stderr)
    return out


def run_scan_state(args, kind: str, pristine: Path, paths: list[str], tmp: Path) -> dict:  # noqa: ANN001
    """Every phase of ``--part scan`` with one kind of state (``sqlite`` or ``postgres``)."""
    import contextlib

    from app.config import Settings

    work = tmp / f"tree-{kind}"
    t0 = time.monotonic()
    working_copy(pristine, work)
    log(f"[{kind}] working copy in {time.monotonic() - t0:.1f} s")
    tree = Tree(work, paths)
    embedder = pixel_embedder()
    values: dict = dict(_env_file=None, data_dir=tmp / "data", ui_enabled=False, library_scan_workers=args.workers)
    embedded = None
    if kind == "postgres":  # DATABASE_URL: an embedded server of its own (the same package as DATA_DIR's)
        from app.vectordb.embedded_pg import start_embedded_postgres

        embedded = start_embedded_postgres(tmp / "pg" / "pgdata", database="bench_pgstate")
        values.update(database_url=embedded.url, data_dir=tmp / "data-pg")
    settings = Settings(**values)
    svc = Service(settings, embedder, account_db=True)
    phases = []
    k = max(1, args.n // 100)
    try:

        def phase(name: str, expected_new: int, first: bool = False, **changed: int) -> dict:
            before = embedder.images
            svc.take_db_time()
            with RenamesBeforeFix() if name.endswith("before_fix") else contextlib.nullcontext():
                result, wall = svc.scan([str(work)] if first else None)
            db_time = svc.take_db_time()
            row = {"phase": name, **changed, "expected_new": expected_new, "seconds": round(wall, 2)}
            row["scan_seconds"] = result["seconds"]
            row.update({c: result[c] for c in _COUNTS if result[c] or c in ("files", "indexed")})
            row["model_images"] = embedder.images - before
            row["ok"] = result["indexed"] == row["model_images"] == expected_new and result["failed"] == 0
            if result.get("warning"):
                row["warning"] = result["warning"]
            row["db"] = db_time
            log(f"[{kind}] {json.dumps(row)}")
            phases.append(row)
            return row

        phase("first", len(tree.paths), first=True)
        for _ in range(args.rescans):
            phase("unchanged", 0)
        phase("added", tree.add(k, args.workers), added=k)
        phase("removed", 0, removed=tree.remove(k))
        phase("moved", 0, moved=tree.move(k))
        if args.before_fix:
            phase("moved_before_fix", 0, moved=tree.move(k))
        phase("touched", 0, touched=tree.touch(k))
        removed, moved = tree.remove(k), tree.move(k)  # then add: a file added now is neither removed nor moved
        phase("mixed", tree.add(k, args.workers), added=k, removed=removed, moved=moved)
        phase("unchanged", 0)
        counts = svc.libraries.status(LIBRARY).counts
        rows = svc.db.count()
        consistent = rows == counts["online"] == len(tree.paths)
        profile = (
            profile_unchanged(svc, tree, args.profile_reps, args.cprofile, args.before_fix)
            if args.profile_reps
            else None
        )
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        state_bytes = apparent(tmp / "data" / "libraries.sqlite3") + apparent(tmp / "data" / "libraries.sqlite3-wal")
    finally:
        svc.close()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)
    unchanged = [p["seconds"] for p in phases if p["phase"] == "unchanged"]
    out = {
        "state": kind,
        "phases": phases,
        "unchanged_rescan_s_median": round(statistics.median(unchanged), 2),
        "all_ok": all(p["ok"] for p in phases),
        "final_counts": counts,
        "vector_rows": rows,
        "consistent": consistent,
        "max_rss_mb": round(rss / 1024, 1),
    }
    if kind == "sqlite":
        out["state_file_mb"] = mb(state_bytes)
    if profile:
        out["profile_unchanged"] = profile
    return out


def part_scan(args, tmp: Path) -> dict:  # noqa: ANN001
    sys.path.insert(0, str(ROOT))
    result = {"benchmark": "library", "part": "scan", **machine(), "n_files": args.n}
    cache = args.tree_cache or Path(tempfile.gettempdir()) / f"bench-library-tree-{args.n}"
    t0 = time.monotonic()
    pristine, paths = pristine_tree(cache, args.n, args.workers)
    result["tree"] = {
        "folders": len({p.rsplit("/", 1)[0] for p in paths}),
        "file_bytes_mean": round(
            statistics.mean((pristine / p).stat().st_size for p in paths[:: max(1, args.n // 2000)])
        ),
        "layout": "YYYY/MM-event-k/IMG_nnnn.jpg, 16x16 JPEG of random pixels, distinct bytes",
        "prepare_s": round(time.monotonic() - t0, 1),
    }
    result["embedder"] = (
        "bench:pixels-8x8: NOT a model (8x8 RGB pixels, L2-normalised, 192-d); the first scan measures the scan, "
        "not a model; unchanged rescans call no model at all"
    )
    result["workers"] = args.workers
    result["runs"] = [run_scan_state(args, kind, pristine, paths, tmp) for kind in args.state]
    from app.config import Settings

    s = Settings(_env_file=None)
    result["batch_size"] = s.embed_batch_size
    result["library_exclude"] = s.library_exclude
    return result


# --- part: disk -----------------------------------------------------------------------------------------------------
def load_model(cache: Path):  # noqa: ANN201
    from app.config import Settings
    from app.embedders import load_embedder

    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    embedder = load_embedder(Settings(_env_file=None, embedder="efficientnet", data_dir=cache, model_cache_dir=cache))
    log(f"model {embedder.model_id} loaded in {time.monotonic() - t0:.1f} s")
    return embedder


def part_disk(args, tmp: Path) -> dict:  # noqa: ANN001
    sys.path.insert(0, str(ROOT))
    import psycopg

    from app.config import Settings
    from app.service import SearchService

    folder = args.dataset.resolve()
    before_listing = listing(folder)
    embedder = load_model(args.model_cache)
    data = tmp / "disk-data"
    settings = Settings(
        _env_file=None, data_dir=data, embedder="efficientnet", model_cache_dir=args.model_cache, ui_enabled=False
    )
    result = {"benchmark": "library", "part": "disk", **machine(), "dataset": str(args.dataset)}
    service = SearchService.open(settings, embedder=embedder)
    try:
        sizes_before = {"pgdata": du(data / "pgdata")}
        t0 = time.monotonic()
        service.libraries.create(LIBRARY, [str(folder)])
        service.libraries.wait(LIBRARY)
        status = service.libraries.status(LIBRARY)
        scan = status.last_scan or {}
        result["scan"] = {k: scan.get(k) for k in ("files", "indexed", "linked", "failed", "seconds")}
        result["scan_wall_s"] = round(time.monotonic() - t0, 1)
        ids = [r.id for page in service.db.scan() for r in page]
        thumb_bytes = sum(len(service.thumbnail(i)) for i in ids)
        result["thumbnails_rendered"] = len(ids)
        result["thumbnails_bytes_in_memory"] = thumb_bytes
    finally:
        service.close()
    # Sizes with the server stopped (its WAL checkpointed at shutdown).
    sizes = {
        "data_dir": du(data),
        "pgdata": du(data / "pgdata"),
        "pgdata_wal": du(data / "pgdata" / "pg_wal"),
        "images_store": du(data / "images"),
        "images_store_files": sum(1 for p in (data / "images").rglob("*") if p.is_file() and ".locks" not in p.parts)
        if (data / "images").exists()
        else 0,
        "libraries_sqlite3": sum(apparent(p) for p in data.glob("libraries.sqlite3*")),
        "cache": du(data / "cache"),
    }
    # The images table and its indexes, measured on the stopped cluster restarted read-only for a moment.
    from app.vectordb.embedded_pg import start_embedded_postgres

    embedded = start_embedded_postgres(data / "pgdata")
    try:
        with psycopg.connect(embedded.url) as conn:
            table = conn.execute("SELECT pg_total_relation_size('images'), count(*) FROM images").fetchone()
            db_size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    finally:
        embedded.stop()
    after_listing = listing(folder)
    result["sizes_mb"] = {k: mb(v) for k, v in sizes.items() if k != "images_store_files"}
    result["sizes_mb"]["pgdata_before_library"] = mb(sizes_before["pgdata"])
    result["images_store_files"] = sizes["images_store_files"]
    result["images_table_mb"] = mb(table[0])
    result["images_rows"] = table[1]
    result["database_mb"] = mb(db_size)
    result["library_folder"] = {
        "files": len(after_listing),
        "mb": mb(sum(s for s, _ in after_listing.values())),
        "untouched": before_listing == after_listing,
    }
    result["model_cache_mb_not_counted"] = mb(du(args.model_cache))
    return result


# --- part: ingest ---------------------------------------------------------------------------------------------------
def part_ingest(args, tmp: Path) -> dict:  # noqa: ANN001
    sys.path.insert(0, str(ROOT))
    import app.embedders
    from app.cli import bulk_index
    from app.config import Settings
    from app.indexing.pipeline import IngestPipeline

    dataset = args.dataset.resolve()
    files = sorted(p for p in dataset.rglob("*") if p.is_file())
    if args.limit:
        files = files[: args.limit]
    folder = dataset
    if args.limit:  # a copy (a library skips symlinks that leave its root), same tree shape; both paths read it
        folder = tmp / "images"
        for p in files:
            target = folder / p.relative_to(dataset)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
    embedder = load_model(args.model_cache)
    base = dict(
        _env_file=None,
        embedder="efficientnet",
        model_cache_dir=args.model_cache,
        ui_enabled=False,
        library_scan_workers=args.workers,
    )
    result = {"benchmark": "library", "part": "ingest", **machine(), "dataset": str(args.dataset)}
    result.update(n_files=len(files), workers=args.workers, model=embedder.model_id)
    result["batch_size"] = Settings(**base).embed_batch_size
    original_load = app.embedders.load_embedder
    original_start = IngestPipeline.start
    start_s = [0.0]

    def timed_start(self) -> None:  # noqa: ANN001
        t0 = time.monotonic()
        original_start(self)
        start_s[0] += time.monotonic() - t0

    runs: dict[str, list[float]] = {}
    try:
        app.embedders.load_embedder = lambda settings, collection_model=None: embedder  # the model loaded above
        IngestPipeline.start = timed_start  # type: ignore[method-assign]
        for r in range(args.repeat):
            for variant in ("direct", "library") if r % 2 == 0 else ("library", "direct"):
                settings = Settings(data_dir=tmp / f"{variant}-{r}", **base)
                if variant == "direct":
                    run = bulk_index.Run(Path(os.devnull), show_progress=False)
                    bulk_index.index_direct(
                        folder, run, all_files=False, workers=args.workers, batch_size=None, settings=settings
                    )
                    elapsed = time.monotonic() - run.started
                    ips = len(files) / elapsed
                    runs.setdefault("direct_ips", []).append(ips)
                    runs.setdefault("direct_indexed", []).append(run.indexed)
                    log(f"direct: {run.indexed} indexed, {run.already} already, {ips:.1f} img/s")
                else:
                    svc = Service(settings, embedder)
                    try:
                        start_s[0] = 0.0
                        scan, wall = svc.scan([str(folder)])
                    finally:
                        svc.close()
                    runs.setdefault("library_ips", []).append(len(files) / wall)
                    runs.setdefault("library_ips_like_direct", []).append(len(files) / (wall - start_s[0]))
                    runs.setdefault("library_workers_start_s", []).append(start_s[0])
                    runs.setdefault("library_indexed", []).append(scan["indexed"])
                    runs.setdefault("library_linked", []).append(scan["linked"])
                    log(f"library: {json.dumps(scan)} in {wall:.1f} s, workers started in {start_s[0]:.2f} s")
    finally:
        app.embedders.load_embedder = original_load
        IngestPipeline.start = original_start  # type: ignore[method-assign]
    for key, values in runs.items():
        result[key] = round(statistics.median(values), 2)
        if args.repeat > 1:
            result[f"{key}_runs"] = [round(v, 2) for v in values]
    result["library_vs_direct"] = round(result["library_ips"] / result["direct_ips"], 3)
    result["library_like_direct_vs_direct"] = round(result["library_ips_like_direct"] / result["direct_ips"], 3)
    if args.repeat > 1:  # each round ran both, back to back: the load changes less within a pair than across pairs
        pairs = [lib / d for lib, d in zip(runs["library_ips"], runs["direct_ips"], strict=True)]
        result["library_vs_direct_pairs"] = [round(v, 3) for v in pairs]
        result["library_vs_direct_median_pair"] = round(statistics.median(pairs), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("scan", "disk", "ingest"), required=True)
    parser.add_argument("--n", type=int, default=200_000, help="files in the synthetic tree (--part scan)")
    parser.add_argument("--state", default="sqlite", help="comma-separated: sqlite, postgres (--part scan)")
    parser.add_argument("--rescans", type=int, default=3, help="unchanged rescans after the first scan")
    parser.add_argument("--profile-reps", type=int, default=3, help="profiled unchanged rescans (0: none)")
    parser.add_argument("--cprofile", action="store_true", help="print one unchanged rescan's cProfile to stderr")
    parser.add_argument(
        "--no-before-fix",
        dest="before_fix",
        action="store_false",
        help="measure nothing as before this benchmark's fixes (the moved_before_fix phase, the profiled rescans with "
        "the exclusion globs matched as before)",
    )
    parser.add_argument("--tree-cache", type=Path, default=None, help="where the generated tree is kept")
    parser.add_argument("--dataset", type=Path, default=None, help="image folder (--part disk, ingest)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N files of --dataset (0: all)")
    parser.add_argument("--workers", type=int, default=2, help="decode processes (LIBRARY_SCAN_WORKERS, --workers)")
    parser.add_argument("--repeat", type=int, default=2, help="--part ingest: alternated runs of each variant")
    parser.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "bench-library-models")
    parser.add_argument("--tmp", type=Path, default=None, help="temporary folder (default: a new one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    args.state = [s for s in args.state.split(",") if s]
    if args.dataset is None:
        name = "instance_small" if args.part == "disk" else "caltech101_subset"
        args.dataset = ROOT.parent / "shared" / "datasets" / name / "images"
    tmp = Path(tempfile.mkdtemp(prefix="bench-library-", dir=args.tmp))
    try:
        part = {"scan": part_scan, "disk": part_disk, "ingest": part_ingest}[args.part]
        emit(part(args, tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
