"""Photo libraries indexed in place (issue #26): real folders of real photos, the real service and pgvector.

The lifecycle (index in place, reads, rescans, moves, copies, offline and back, edits, purge, delete), mount safety,
the walk's safety rules, LIBRARY_ROOTS, watching, and fsck beside a library. Fault and multi-process cases are in
tests/test_library_faults.py.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.ids import image_id_of_file
from app.library.model import Library, display_name, parse_library_roots
from app.library.walk import resolve, walk_library
from app.main import create_app
from tests.helpers import DATASETS, make_settings

CALTECH = DATASETS / "caltech101_subset" / "images"


def _photos(n: int, offset: int = 0) -> list[Path]:
    """``n`` distinct real photos (one per Caltech class, so no two are near-identical)."""
    files = []
    for folder in sorted(p for p in CALTECH.iterdir() if p.is_dir()):
        jpgs = sorted(folder.glob("*.jpg"))
        if jpgs:
            files.append(jpgs[0])
    return files[offset : offset + n]


def _fill(root: Path, photos: list[Path], folders: tuple[str, ...] = ("a", "b")) -> dict[str, Path]:
    """Copy ``photos`` into ``root``, spread over ``folders``; returns library path -> file."""
    placed = {}
    for i, photo in enumerate(photos):
        rel = f"{folders[i % len(folders)]}/{photo.parent.name}_{photo.name}"
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, target)
        placed[rel] = target
    return placed


def _wait(c: TestClient, name: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = c.get(f"/libraries/{name}").json()
        if status["state"] not in ("scanning", "waiting"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"the scan of {name} did not end within {timeout} s: {status}")


def _scan(c: TestClient, name: str, **params) -> dict:
    r = c.post(f"/libraries/{name}/scan", params=params)
    assert r.status_code in (200, 202), r.text
    status = _wait(c, name)
    assert status["state"] == "idle", status
    return status


def _count(c: TestClient) -> int:
    return c.get("/stats").json()["count"]


@pytest.fixture
def lib_client(tmp_path, database_url, offline_embedder):
    settings = make_settings(
        tmp_path / "data", database_url, library_scan_workers=1, library_scan_interval="0", library_settle_s=0
    )
    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        yield c


@pytest.mark.slow
def test_a_library_is_indexed_in_place_and_kept_in_sync(lib_client, tmp_path):
    c = lib_client
    root = tmp_path / "photos"
    placed = _fill(root, _photos(8))
    ids = {rel: image_id_of_file(p) for rel, p in placed.items()}

    r = c.post("/libraries", json={"name": "photos", "roots": [str(root)]})
    assert r.status_code == 201, r.text
    status = _wait(c, "photos")
    assert status["counts"] == {"files": 8, "online": 8, "offline": 0, "failed": 0, "images": 8}
    assert status["last_scan"]["indexed"] == 8
    assert _count(c) == 8

    # Nothing is copied: the image store holds no original.
    store = tmp_path / "data" / "images"
    assert [p for p in store.rglob("*") if p.is_file() and ".locks" not in p.parts] == []

    # Reads stream the library file itself: whole, a byte range, a thumbnail.
    rel, path = next(iter(placed.items()))
    data = path.read_bytes()
    r = c.get(f"/image/{ids[rel]}")
    assert r.status_code == 200 and r.content == data
    r = c.get(f"/image/{ids[rel]}", headers={"Range": "bytes=10-99"})
    assert r.status_code == 206 and r.content == data[10:100]
    r = c.get(f"/image/{ids[rel]}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"

    # Results name the library file; a folder filter on the library (or a folder of it) works.
    r = c.post("/search_image", files={"file": ("q.jpg", data)}, data={"top_k": "20", "exclude_self": "false"})
    hits = r.json()["results"]
    assert hits[0]["id"] == ids[rel] and hits[0]["filename"] == f"photos/{rel}"
    r = c.post("/search_image", files={"file": ("q.jpg", data)}, data={"top_k": "20", "path_prefix": "photos/b/"})
    assert {h["filename"].split("/")[1] for h in r.json()["results"]} == {"b"}

    # An unchanged rescan reads nothing and calls no model.
    last = _scan(c, "photos")["last_scan"]
    assert (last["unchanged"], last["new"], last["indexed"]) == (8, 0, 0)

    # A rename: the path follows, no model call; results show the new name.
    old_rel, new_rel = "a/" + placed_name(placed, "a", 0), "a/renamed.jpg"
    os.rename(root / old_rel, root / new_rel)
    last = _scan(c, "photos")["last_scan"]
    assert (last["linked"], last["indexed"], last["moved_away"], last["offline"]) == (1, 0, 1, 0)
    service = c.app.state.service
    assert service.db.get(ids[old_rel]).metadata.filename == f"photos/{new_rel}"

    # A copy of the same bytes: one image, two files.
    copy_src = next(r for r in placed if r.startswith("b/"))
    shutil.copy2(root / copy_src, root / "b" / "copy.jpg")
    status = _scan(c, "photos")
    assert status["last_scan"]["linked"] == 1 and status["last_scan"]["indexed"] == 0
    assert status["counts"]["files"] == 9 and status["counts"]["images"] == 8 and _count(c) == 8

    # A deleted file goes offline: hidden from results, exists and reads; its vector kept.
    gone_rel = next(r for r in placed if r.startswith("b/") and r != copy_src)
    gone_id = ids[gone_rel]
    kept = (root / gone_rel).read_bytes(), os.stat(root / gone_rel)
    os.unlink(root / gone_rel)
    status = _scan(c, "photos")
    assert status["last_scan"]["offline"] == 1 and status["counts"]["offline"] == 1
    assert _count(c) == 7
    assert c.post("/images/exists", json={"ids": [gone_id]}).json()["existing"] == []
    assert c.get(f"/image/{gone_id}").status_code == 404
    r = c.post("/search_image", files={"file": ("q.jpg", kept[0])}, data={"top_k": "20", "exclude_self": "false"})
    assert gone_id not in {h["id"] for h in r.json()["results"]}

    # Back with the same size and mtime: online again, no read, no model call.
    (root / gone_rel).write_bytes(kept[0])
    os.utime(root / gone_rel, ns=(kept[1].st_atime_ns, kept[1].st_mtime_ns))
    last = _scan(c, "photos")["last_scan"]
    assert (last["back_online"], last["images_restored"], last["indexed"], last["new"]) == (1, 1, 0, 0)
    assert _count(c) == 8 and c.get(f"/image/{gone_id}").content == kept[0]

    # An edit (other bytes at the same path): re-embedded once; the old bytes leave the collection.
    edited_rel = next(r for r in placed if r.startswith("a/") and r != old_rel)
    shutil.copy2(_photos(1, offset=20)[0], root / edited_rel)
    last = _scan(c, "photos")["last_scan"]
    assert (last["changed"], last["indexed"], last["images_removed"]) == (1, 1, 1)
    assert c.post("/images/exists", json={"ids": [ids[edited_rel]]}).json()["existing"] == []
    assert _count(c) == 8

    # A file changed since its scan is never served: 409, not other bytes.
    victim_rel = next(r for r in placed if r.startswith("b/") and r not in (copy_src, gone_rel))
    victim_id = ids[victim_rel]
    with open(root / victim_rel, "ab") as f:
        f.write(b"\0" * 10)
    r = c.get(f"/image/{victim_id}")
    assert r.status_code == 409 and "changed since it was indexed" in r.json()["detail"]

    # A library photo cannot be deleted through the API: its next scan would bring it back.
    r = c.delete(f"/image/{ids[copy_src]}")
    assert r.status_code == 409 and "library" in r.json()["detail"]

    # Purge: offline files are forgotten at once, with their images.
    os.unlink(root / "a" / "renamed.jpg")
    assert _scan(c, "photos")["counts"]["offline"] == 1
    r = c.post("/libraries/photos/purge")
    assert r.json() == {"files": 1, "images": 1}
    assert _count(c) == 7

    # Deleting the library removes its images and never touches its files.
    before = sorted(p.name for p in root.rglob("*") if p.is_file())
    r = c.delete("/libraries/photos")
    assert r.status_code == 200 and r.json()["images_removed"] == 7
    assert _count(c) == 0 and c.get("/libraries").json() == []
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == before


def placed_name(placed: dict[str, Path], folder: str, index: int) -> str:
    """The ``index``-th file name placed in ``folder``."""
    return [rel.split("/", 1)[1] for rel in placed if rel.startswith(f"{folder}/")][index]


@pytest.mark.slow
def test_mount_safety_marks_nothing_offline_when_a_root_cannot_be_trusted(lib_client, tmp_path):
    c = lib_client
    root = tmp_path / "share"
    _fill(root, _photos(24), folders=("x", "y", "z"))
    assert c.post("/libraries", json={"name": "nas", "roots": [str(root)]}).status_code == 201
    assert _wait(c, "nas")["counts"]["online"] == 24

    # The share is unmounted: the root is gone, then an empty mount point.
    os.rename(root, tmp_path / "elsewhere")
    status = _scan(c, "nas")
    assert "does not exist" in status["warning"] and status["counts"]["offline"] == 0 and _count(c) == 24
    health = c.get("/health").json()
    assert health["libraries"] == "warning" and any("nas" in p for p in health["problems"])
    root.mkdir()
    status = _scan(c, "nas")
    assert "is empty" in status["warning"] and status["counts"]["offline"] == 0
    status = _scan(c, "nas", force="true")  # really emptied: force believes it (files offline, kept)
    assert status["warning"] is None and status["counts"]["offline"] == 24 and _count(c) == 0
    root.rmdir()
    os.rename(tmp_path / "elsewhere", root)
    status = _scan(c, "nas")
    assert status["warning"] is None and c.get("/health").json()["libraries"] == "ok"
    assert status["last_scan"]["back_online"] == 24 and status["last_scan"]["indexed"] == 0 and _count(c) == 24

    # Most files vanish at once: nothing goes offline unless the scan is forced.
    removed = sorted(root.rglob("*.jpg"))[:15]
    for p in removed:
        p.unlink()
    status = _scan(c, "nas")
    assert "15 of 24 files" in status["warning"] and status["counts"]["offline"] == 0 and _count(c) == 24
    status = _scan(c, "nas", force="true")
    assert status["warning"] is None and status["counts"]["offline"] == 15 and _count(c) == 9


def test_the_walk_stays_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "@eaDir").mkdir(parents=True)
    (root / ".hidden").mkdir()
    photo = _photos(1)[0]
    shutil.copy2(photo, root / "a" / "one.jpg")
    shutil.copy2(photo, root / "a" / "@eaDir" / "thumb.jpg")
    shutil.copy2(photo, root / ".hidden" / "h.jpg")
    shutil.copy2(photo, root / "a" / ".dot.jpg")
    (root / "a" / "notes.txt").write_text("not an image")
    os.symlink("/etc", root / "etc-link")  # leaves the root: skipped
    os.symlink("..", root / "a" / "loop")  # a loop back to the root: listed once
    os.symlink(root / "a" / "one.jpg", root / "inside.jpg")  # stays inside: followed
    os.symlink(tmp_path / "missing.jpg", root / "dangling.jpg")
    odd = os.fsencode(root) + b"/caf\xe9.jpg"  # a Latin-1 name: not UTF-8
    with open(odd, "wb") as f:
        f.write(photo.read_bytes())
    long_name = "x" * 250 + ".jpg"
    shutil.copy2(photo, root / long_name)

    library = Library.create("t", [str(root)], ["**/@eaDir/**"])
    walk = walk_library(library)
    assert set(walk.files) == {b"a/one.jpg", b"inside.jpg", b"caf\xe9.jpg", long_name.encode()}
    assert walk.skipped >= 3  # /etc, the loop, the dangling link
    assert display_name("t", b"caf\xe9.jpg") == "t/caf\\xe9.jpg"
    assert resolve(library, b"caf\xe9.jpg") == odd
    for bad in (b"../outside.jpg", b"/etc/passwd", b"a/../../x", b"etc-link/passwd", b"", b"a//one.jpg"):
        assert resolve(library, bad) is None, bad


def test_library_definitions_are_checked():
    assert [lib.name for lib in parse_library_roots("photos=/a, photos=/b ,old=/c")] == ["photos", "old"]
    assert parse_library_roots("photos=/a,photos=/b")[0].root_prefixes() == [("/a", b"a/"), ("/b", b"b/")]
    for bad in ("photos", "Photos=/a", "p=relative", "p=/x/a,p=/y/a"):
        with pytest.raises(ValueError):
            parse_library_roots(bad)
    with pytest.raises(ValueError, match="at most 64"):
        Library.create("p", ["/a"], [f"*.x{i}" for i in range(65)])


@pytest.mark.slow
def test_bad_library_requests_get_clear_4xx(lib_client, tmp_path):
    c = lib_client
    r = c.post("/libraries", json={"name": "Bad Name", "roots": [str(tmp_path)]})
    assert r.status_code == 422 and "library name" in r.json()["detail"]
    r = c.post("/libraries", json={"name": "p", "roots": [str(tmp_path / "nope")]})
    assert r.status_code == 422 and "not a folder" in r.json()["detail"]
    r = c.post("/libraries", json={"name": "p", "roots": ["relative/path"]})
    assert r.status_code == 422
    assert c.get("/libraries/nope").status_code == 404
    assert c.post("/libraries/nope/scan").status_code == 404
    assert c.delete("/libraries/nope").status_code == 404
    (tmp_path / "empty").mkdir()
    assert c.post("/libraries", json={"name": "p", "roots": [str(tmp_path / "empty")]}).status_code == 201
    r = c.post("/libraries", json={"name": "p", "roots": [str(tmp_path / "empty")]})
    assert r.status_code == 409 and "exists" in r.json()["detail"]
    assert _wait(c, "p")["warning"] is None  # an empty folder the library never knew files in is just empty


@pytest.mark.slow
def test_library_roots_from_the_environment_and_watching(tmp_path, database_url, offline_embedder):
    root = tmp_path / "mounted"
    _fill(root, _photos(3))
    settings = make_settings(
        tmp_path / "data",
        database_url,
        library_roots=f"mounted={root}",
        library_watch=True,
        library_settle_s=0.5,
        library_scan_workers=1,
        library_scan_interval="0",
    )
    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        status = _wait(c, "mounted")
        assert status["source"] == "env"
        deadline = time.monotonic() + 60
        while c.get("/libraries/mounted").json()["counts"]["online"] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.get("/libraries/mounted").json()["watching"] is True
        # A photo copied in is found without asking: inotify, then a scan once the folder is quiet.
        new = _photos(1, offset=30)[0]
        shutil.copy2(new, root / "a" / "new.jpg")
        new_id = image_id_of_file(new)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if c.post("/images/exists", json={"ids": [new_id]}).json()["existing"] == [new_id]:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the watched copy was not indexed: {c.get('/libraries/mounted').json()}")
        assert c.get("/libraries/mounted").json()["counts"]["online"] == 4


@pytest.mark.slow
def test_fsck_leaves_library_rows_to_the_scans(tmp_path, database_url, offline_embedder, monkeypatch):
    from app.cli import fsck

    root = tmp_path / "photos"
    _fill(root, _photos(4))
    settings = make_settings(tmp_path / "data", database_url, library_scan_workers=1, library_scan_interval="0")
    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        c.post("/libraries", json={"name": "photos", "roots": [str(root)]})
        assert _wait(c, "photos")["counts"]["online"] == 4
        upload = _photos(1, offset=40)[0].read_bytes()
        assert c.post("/index_image", files={"file": ("up.jpg", upload)}).status_code == 201
        assert _count(c) == 5
    for key, value in {"DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": database_url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert fsck.main(["--repair"]) == 0
    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        assert _count(c) == 5  # nothing "repaired" away


@pytest.fixture(params=["sqlite", "postgresql"])
def library_state(request, tmp_path):
    from app.library.state import LibraryState

    url = request.getfixturevalue("database_url") if request.param == "postgresql" else None
    state = LibraryState(database_url=url, data_dir=tmp_path / "data", wait_s=5)
    yield state
    state.close()


@pytest.mark.slow
def test_library_state_on_both_stores(library_state):
    """The one SQL text on SQLite (one machine) and PostgreSQL (replicas): files, offline, counts, hidden, leases."""
    s = library_state
    lib = Library.create("p", ["/photos"], ["**/@eaDir/**"])
    assert s.create_library(lib) and not s.create_library(lib)
    assert s.library("p").library == lib and [r.name for r in s.libraries()] == ["p"]
    a, b = "a" * 64, "b" * 64
    s.put_files("p", [(b"x/1.jpg", a, 10, 111, None), (b"x/2.jpg", a, 10, 111, None), (b"caf\xe9.jpg", b, 5, 7, None)])
    s.put_files("p", [(b"bad.jpg", None, 3, 4, "CorruptImageError: truncated")])
    assert s.files("p")[b"caf\xe9.jpg"].image_id == b and s.files("p")[b"bad.jpg"].error.startswith("Corrupt")
    s.set_offline("p", [b"x/2.jpg"], 1000.0)
    assert s.counts("p") == {"files": 4, "online": 2, "offline": 1, "failed": 1, "images": 2}
    assert [(r.path, r.offline_since) for r in s.paths_of([a])[a]] == [(b"x/1.jpg", None), (b"x/2.jpg", 1000.0)]
    assert s.expired("p", 2000.0) == [(b"x/2.jpg", a)] and s.expired("p", 500.0) == []
    assert s.held_ids() == {a, b}
    s.hide("images", [(b, b"\0" * 8, "{}")])
    assert s.hidden("images", [a, b]) == {b: (b"\0" * 8, "{}")} and s.count_hidden("images") == 1
    s.unhide("images", [b])
    assert s.hidden("images", [b]) == {}
    s.update_library("p", state="scanning", phase="hash", done=3, total=9, last_result={"files": 3}, warning="w")
    row = s.library("p")
    assert (row.state, row.phase, row.done, row.total, row.last_result, row.warning) == (
        "scanning",
        "hash",
        3,
        9,
        {"files": 3},
        "w",
    )
    lease = s.acquire_lease("p")
    assert lease is not None and s.acquire_lease("p") is None and s.lease_held("p")
    lease.close()
    assert not s.lease_held("p")
    assert sorted(s.delete_library("p")) == [a, b]
    assert s.library("p") is None and s.files("p") == {}


@pytest.mark.slow
def test_reindex_reads_library_photos_from_their_files(
    tmp_path, database_url, offline_embedder, model_cache_dir, monkeypatch
):
    """scripts/reindex.py re-embeds library photos from the library files (nothing copied) and uploads from the
    store, into a new collection it switches to."""
    from app.cli import reindex

    root = tmp_path / "photos"
    placed = _fill(root, _photos(4))
    settings = make_settings(tmp_path / "data", database_url, library_scan_workers=1, library_scan_interval="0")
    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        c.post("/libraries", json={"name": "photos", "roots": [str(root)]})
        assert _wait(c, "photos")["counts"]["online"] == 4
        upload = _photos(1, offset=40)[0].read_bytes()
        assert c.post("/index_image", files={"file": ("up.jpg", upload)}).status_code == 201
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "EMBEDDER": "efficientnet",
        "MODEL_CACHE_DIR": str(model_cache_dir),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    assert reindex.main(["--target", "second", "--workers", "1", "--no-progress"]) == 0
    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        assert c.app.state.service.db.collection_name == "second" and _count(c) == 5
        rel, path = next(iter(placed.items()))
        hits = c.post(
            "/search_image", files={"file": ("q.jpg", path.read_bytes())}, data={"exclude_self": "false"}
        ).json()["results"]
        assert hits[0]["filename"] == f"photos/{rel}" and hits[0]["score"] > 0.999
        assert c.get(f"/image/{hits[0]['id']}").content == path.read_bytes()
