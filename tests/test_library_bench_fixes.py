"""What bench/library.py found in app/library and what was changed for it (issue #26's measurements).

- The exclusion globs were compiled by wcmatch for every file the walk saw (about 90 us per file with the default
  ``LIBRARY_EXCLUDE``: 92 % of an unchanged rescan). :func:`app.library.model.compiled_patterns` compiles them once
  and tries a pattern only on paths holding its literal components; it must answer exactly as wcmatch does.
- A moved file's row was renamed in an upsert (a transaction, a commit) of its own: 5 ms per moved file.
  :func:`app.library.visibility.reconcile` now renames a chunk's rows in one upsert.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from wcmatch import glob as wcglob

from app.embedders.base import Embedder
from app.library.model import GLOB_FLAGS, Library, compiled_patterns
from app.library.scan import ScanContext, scan_library
from app.library.state import LibraryState
from app.library.walk import walk_library
from app.storage import from_settings
from app.vectordb import create_handler
from app.vectordb.guard import GuardedHandler
from tests.helpers import make_settings

PATTERNS = [
    "**/@eaDir/**",
    "**/#recycle/**",
    "**/#snapshot/**",
    "**/*.tmp",
    "*.part",
    "2019/**",
    "2019/*/IMG_1*.jpg",
    "**/{raw,RAW}/**",
    "**/raw/**",
    "a/b/c.jpg",
    "**/[Tt]humbs/**",
    "**/IMG_00?.jpg",
    "**/x,y/**",
    "**/.hidden/**",
    "**",
    "**/*",
    "@eaDir",
    "**/eaDir/**",
    "**/EADIR/**",
    "nas1/**",
    "**/a b/**",
    "**/é/**",
    "./a/**",
    "a//b/**",
    "**/\\#weird/**",
]
PARTS = (
    "2019 2020 a b c.jpg @eaDir #recycle raw RAW x,y Thumbs thumbs IMG_001.jpg IMG_1234.jpg f.tmp g.part .hidden é "
    "eaDir EADIR nas1 #weird x@eaDirx"
).split() + ["a b"]


def test_compiled_patterns_answers_as_wcmatch() -> None:
    rng = random.Random(26)
    paths = {"/".join(rng.choice(PARTS) for _ in range(rng.randint(1, 5))) for _ in range(3000)}
    paths |= {"a/b/c.jpg", "2019/x/IMG_1.jpg", "x/@eaDir/y.jpg", "@eaDir/y.jpg", "@eaDir", "f.tmp", "g.part"}
    pattern_sets = [(p,) for p in PATTERNS] + [tuple(rng.sample(PATTERNS, rng.randint(2, 5))) for _ in range(40)]
    checked = matched = 0
    for patterns in pattern_sets:
        ours = compiled_patterns(patterns)
        theirs = wcglob.compile(patterns, flags=GLOB_FLAGS)
        for path in paths:
            expected = theirs.match(path)
            assert ours(path) == expected, (patterns, path)
            checked += 1
            matched += expected
    assert matched > 1000 and checked - matched > 1000  # both answers were exercised


def test_library_excludes_use_the_compiled_patterns(tmp_path) -> None:
    library = Library.create("photos", [str(tmp_path)], ["**/*.tmp.jpg", "2019/**"])
    extra = ("**/@eaDir/**",)
    assert library.excluded(b"a/b.tmp.jpg", extra)
    assert library.excluded(b"x/@eaDir/y.jpg", extra)
    assert not library.excluded(b"x/eaDir/y.jpg", extra)
    assert library.folder_excluded(b"2019", extra) and library.folder_excluded(b"a/@eaDir", extra)
    assert not library.folder_excluded(b"2020", extra)
    assert not library.excluded(b"\xff/a.jpg", extra)  # not UTF-8: matched on its escaped text, no error
    for rel in ["2019/a.jpg", "2020/a.jpg", "2020/@eaDir/t.jpg", "2020/b.tmp.jpg", "2021/c.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert sorted(walk_library(library, extra).files) == [b"2020/a.jpg", b"2021/c.jpg"]


@pytest.mark.parametrize("pattern", ["**/[", "{a,b"])
def test_odd_patterns_behave_as_in_wcmatch(pattern: str) -> None:
    path = os.fsdecode(b"x/[/{a,b/y.jpg")
    assert compiled_patterns((pattern,))(path) == wcglob.compile(pattern, flags=GLOB_FLAGS).match(path)


class _PixelEmbedder(Embedder):
    """Not a model: 4x4 RGB pixels, centred and L2-normalised (48 dimensions)."""

    model_id = "test:pixels-4x4"
    dim = 48

    def embed_images(self, images):  # noqa: ANN001, ANN202
        out = []
        for im in images:
            v = np.asarray(im.convert("RGB").resize((4, 4)), dtype=np.float32).ravel() - 127.5
            v[0] += 0.5
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32).reshape(len(images), self.dim)


class _CountingUpserts:
    """The vector database, with the sizes of its upserts recorded."""

    def __init__(self, db) -> None:  # noqa: ANN001
        self._db = db
        self.upserts: list[int] = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._db, name)

    def upsert(self, records) -> None:  # noqa: ANN001
        self.upserts.append(len(records))
        self._db.upsert(records)


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_moved_files_are_renamed_in_one_upsert(tmp_path, database_url) -> None:
    settings = make_settings(tmp_path / "data", database_url)
    embedder = _PixelEmbedder()
    db = GuardedHandler(create_handler(settings))
    store = from_settings(settings)
    state = LibraryState.open(settings)
    try:
        db.ensure_collection(embedder.model_id, embedder.dim)
        root = tmp_path / "photos"
        (root / "2024").mkdir(parents=True)
        for i in range(8):
            (root / "2024" / f"IMG_{i}.jpg").write_bytes(_jpeg(i))
        library = Library.create("photos", [str(root)])
        state.create_library(library)
        ctx = ScanContext(db=db, uploads=store, state=state, embedder=embedder, workers=1, batch_size=4)
        assert scan_library(ctx, library).indexed == 8

        (root / "2025").mkdir()
        for i in range(5):
            os.rename(root / "2024" / f"IMG_{i}.jpg", root / "2025" / f"moved_{i}.jpg")
        counting = _CountingUpserts(db)
        result = scan_library(replace(ctx, db=counting), library)

        assert (result.indexed, result.linked, result.moved_away, result.images_renamed) == (0, 5, 5, 5)
        assert counting.upserts == [5]  # one upsert for the five renamed rows, no model call
        names = {r.metadata.filename for page in db.scan() for r in page}
        assert names == {f"photos/2025/moved_{i}.jpg" for i in range(5)} | {
            f"photos/2024/IMG_{i}.jpg" for i in range(5, 8)
        }
    finally:
        state.close()
        store.close()
        db.close()
