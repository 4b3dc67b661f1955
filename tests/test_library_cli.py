"""``image-search-library`` end to end: ``scripts/library.py`` run as a subprocess against a real uvicorn server
(one per module, with ``API_KEY`` set) over a real folder of small JPEGs copied from ``../shared/datasets``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.helpers import PROJECT_ROOT, create_database, free_port, make_settings, run_live_server

# Loads a model, a database and a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

SCRIPT = PROJECT_ROOT / "scripts" / "library.py"
KEY = "library-cli-test-key"
CALTECH = "caltech101_subset/images"
PICKS = {"cup": 4, "ant": 3, "brain": 3}  # 10 small JPEGs of three classes


@pytest.fixture(scope="module")
def api(pg_server, offline_embedder, tmp_path_factory) -> Iterator[str]:
    """Base URL of one live server for the module: a fresh database, ``API_KEY`` set, no periodic scans."""
    settings = make_settings(
        tmp_path_factory.mktemp("library-cli") / "data",
        create_database(pg_server),
        api_key=KEY,
        library_scan_interval="0",
    )
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        yield url


@pytest.fixture
def photos(tmp_path, datasets) -> Path:
    """A folder of 10 copied JPEGs (copies, not links: a link leaving the root is skipped), distinct bytes each, in
    one sub-folder per class."""
    root = tmp_path / "photos"
    for folder, n in PICKS.items():
        for src in sorted((datasets / CALTECH / folder).glob("*.jpg"))[:n]:
            (root / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / folder / src.name)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 10 and len({hashlib.sha256(f.read_bytes()).digest() for f in files}) == 10
    return root


def run_cli(*args: str | Path, api: str | None = None, key: str | None = KEY, rc: int | None = 0) -> tuple[str, str]:
    """Run scripts/library.py with this interpreter (this checkout's code first on the path); the key goes through
    ``$IMAGE_SEARCH_API_KEY``. Asserts the exit status ``rc`` and returns ``(stdout, stderr)``."""
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_SEARCH_API", "IMAGE_SEARCH_API_KEY")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    if key is not None:
        env["IMAGE_SEARCH_API_KEY"] = key
    argv = [sys.executable, str(SCRIPT), *map(str, args)]
    if api is not None:
        argv += ["--api", api]
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if rc is not None:
        assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout, proc.stderr


def counts(summary: str) -> dict[str, int]:
    """The numbers of a scan summary, by their words: ``{"files": 10, "unchanged": 0, "indexed": 10, ...}``."""
    text = " ".join(summary.split())
    match = re.search(r"(\d+) files? scanned in [\d.]+ s: (.*?)\.(?: |$)", text)
    assert match, summary
    found = {"files": int(match[1])}
    for number, words in re.findall(r"(\d+) ([a-z ]+?)(?: \([^)]*\))?(?:[,;]|$)", match[2]):
        found[words] = int(number)
    keys = ["unchanged", "new", "changed", "indexed", "linked", "back online", "offline", "moved away", "purged"]
    assert set(keys + ["failed", "deferred", "skipped"]) <= set(found), (found, summary)
    return found


def library(api: str, name: str) -> dict:
    return httpx.get(f"{api}/libraries/{name}").json()


def test_add_scan_rename_delete_purge_remove(api, photos):
    if not httpx.get(f"{api}/libraries").json():  # the module's first test
        assert run_cli("list", api=api) == (
            "",
            "no libraries yet: `image-search-library add NAME /folder` creates one\n",
        )
    out, _ = run_cli("add", "trip", photos, "--exclude", "**/ant/image_0001.jpg", api=api)
    assert "trip: library created on" in out and str(photos) in out
    first = counts(out)
    assert first == first | {"files": 9, "new": 9, "indexed": 9, "unchanged": 0, "failed": 0, "offline": 0}
    assert "trip now holds 9 files: 9 online, 0 offline, 0 failed; 9 images." in out

    out, _ = run_cli("list", api=api)
    assert out.split()[:8] == ["name", "roots", "state", "online", "offline", "failed", "images", "last"]
    row = row_of(out, "trip")
    assert row[:7] == ["trip", str(photos), "idle", "9", "0", "0", "9"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", " ".join(row[7:])), row
    listed = {lib["name"]: lib for lib in json.loads(run_cli("list", "--json", api=api)[0])}
    assert listed["trip"]["exclude"] == ["**/ant/image_0001.jpg"] and listed["trip"]["counts"]["online"] == 9

    # Nothing changed: nothing read, no model call.
    out, _ = run_cli("scan", "trip", "--no-progress", api=api)
    assert counts(out) | {"files": 9, "unchanged": 9, "new": 0, "indexed": 0} == counts(out)

    # A rename: the bytes are known, so the new path is linked with no model call and the old one moved away.
    (photos / "cup" / "image_0001.jpg").rename(photos / "cup" / "renamed.jpg")
    out, _ = run_cli("scan", "trip", api=api)
    assert counts(out) | {"new": 1, "linked": 1, "indexed": 0, "moved away": 1, "offline": 0} == counts(out)
    names = filenames(api, photos / "cup" / "image_0002.jpg")
    assert "trip/cup/renamed.jpg" in names and "trip/cup/image_0001.jpg" not in names

    # A deletion: offline (hidden, vector kept).
    (photos / "brain" / "image_0002.jpg").unlink()
    out, _ = run_cli("scan", "trip", api=api)
    assert counts(out) | {"offline": 1, "unchanged": 8, "indexed": 0} == counts(out)
    assert "trip now holds 9 files: 8 online, 1 offline, 0 failed; 9 images." in out
    assert row_of(run_cli("list", api=api)[0], "trip")[2:7] == ["idle", "8", "1", "0", "9"]

    out, _ = run_cli("purge", "trip", api=api)
    assert "trip: forgot 1 offline file; 1 image left the collection" in out and "No file was touched" in out
    assert run_cli("purge", "trip", api=api)[0].strip() == "trip: no offline files to forget"

    out, _ = run_cli("remove", "trip", api=api)
    assert f"trip: library removed ({photos}; 8 files known); 8 images left the collection" in out
    assert "The files themselves were not touched." in out
    assert len(list(photos.rglob("*.jpg"))) == 9  # 8 indexed and the excluded one
    assert "trip" not in {lib["name"] for lib in json.loads(run_cli("list", "--json", api=api)[0])}


def filenames(api: str, query: Path) -> set[str]:
    """The filenames of every visible image like ``query`` (up to 50; an indexed query file itself is left out)."""
    response = httpx.post(f"{api}/search_image", files={"file": (query.name, query.read_bytes())}, data={"top_k": "50"})
    assert response.status_code == 200, response.text
    return {hit["filename"] for hit in response.json()["results"]}


def row_of(out: str, name: str) -> list[str]:
    """The cells (split at blanks) of library ``name``'s row in ``list``'s table."""
    rows = [line.split() for line in out.splitlines()[1:] if line.split()[:1] == [name]]
    assert len(rows) == 1, out
    return rows[0]


def test_no_wait_then_follow(api, photos):
    out, err = run_cli("add", "later", photos, "--no-wait", api=api)
    assert "later: library created on" in out and "scanned in" not in out
    # `scan` now follows the running scan, or starts another (nothing new: the first one recorded everything).
    out, _ = run_cli("scan", "later", "--no-progress", api=api)
    first = counts(out)
    assert first["files"] == 10 and first["failed"] == 0
    out, _ = run_cli("scan", "later", "--no-wait", api=api)
    assert "scanned in" not in out
    deadline = time.monotonic() + 60
    while library(api, "later")["state"] != "idle" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert library(api, "later")["counts"] == {"files": 10, "online": 10, "offline": 0, "failed": 0, "images": 10}
    run_cli("remove", "later", api=api)


def test_mount_safety_warning_exits_1_and_force(api, photos, datasets):
    for src in sorted((datasets / CALTECH / "cup").glob("*.jpg"))[4:16]:  # 22 files: the mass check applies
        shutil.copy2(src, photos / "cup" / src.name)
    run_cli("add", "nas", photos, "--no-progress", api=api)

    # 16 of 22 files missing at once (a share partly mounted?): nothing marked offline, a warning, exit 1.
    away = photos.with_name("away")
    (photos / "cup").rename(away)
    out, _ = run_cli("scan", "nas", "--no-progress", api=api, rc=1)
    text = " ".join(out.split())
    assert "warning: 16 of 22 files (73%) are missing, more than LIBRARY_MAX_OFFLINE_FRACTION (50%)" in text, text
    assert counts(out) | {"files": 6, "unchanged": 6, "offline": 0} == counts(out)
    assert "nas now holds 22 files: 22 online, 0 offline" in out
    assert "nas: warning: 16 of 22 files (73%) are missing" in run_cli("list", api=api)[0]
    # They really were deleted: --force marks them offline.
    out, _ = run_cli("scan", "nas", "--force", "--no-progress", api=api)
    assert counts(out)["offline"] == 16 and "warning" not in out
    assert "nas now holds 22 files: 6 online, 16 offline" in out

    # An unmounted share looks like an empty folder: nothing changes.
    away.rename(photos / "cup")
    photos.rename(photos.with_name("unmounted"))
    photos.mkdir()
    out, _ = run_cli("scan", "nas", "--no-progress", api=api, rc=1)
    assert f"warning: root {photos} " in " ".join(out.split()) and "nothing was changed" in out
    assert "nas now holds 22 files: 6 online, 16 offline" in out
    photos.rmdir()
    photos.with_name("unmounted").rename(photos)
    out, _ = run_cli("scan", "nas", "--no-progress", api=api)
    assert counts(out) | {"unchanged": 6, "back online": 16, "indexed": 0, "offline": 0} == counts(out)
    assert "nas now holds 22 files: 22 online, 0 offline" in out and "warning" not in out
    run_cli("remove", "nas", api=api)


def test_unknown_library_and_server_refusals(api, photos):
    for args in (["scan", "nope"], ["purge", "nope"], ["remove", "nope"], ["scan", "Not A Name"]):
        out, err = run_cli(*args, api=api, rc=3)
        assert out == "" and err.startswith("error: No library called '"), err
        assert "image-search-library list shows the libraries" in err
    # The server's own refusals: a root it cannot see, a name taken, a bad name (exit 1, its detail).
    _, err = run_cli("add", "ghost", photos / "missing", api=api, rc=1)
    assert "is not a folder the service can see" in err
    _, err = run_cli("add", "Bad Name", photos, api=api, rc=1)
    assert "a library name is 1-48 lower-case letters" in err
    run_cli("add", "once", photos, "--no-wait", api=api)
    _, err = run_cli("add", "once", photos, api=api, rc=1)
    assert "answered 409" in err and "exists" in err
    run_cli("scan", "once", "--no-progress", api=api)  # waits for it to be idle: removing a scanning one is a 409
    run_cli("remove", "once", api=api)


def test_usage_errors_exit_2(api, photos):
    _, err = run_cli(rc=2)
    assert "required: COMMAND" in err or "COMMAND" in err
    _, err = run_cli("add", "rel", "relative/folder", api=api, rc=2)
    assert "ROOT must be an absolute path as the service sees it" in err
    _, err = run_cli("scan", "x", "--poll", "0", api=api, rc=2)
    assert "--poll must be > 0" in err


def test_unreachable_api_exits_2():
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (["list"], ["add", "photos", "/photos"]):
        out, err = run_cli(*args, api=dead, rc=2)
        assert out == "" and err.startswith(f"error: cannot reach the API at {dead} (ConnectError"), err


def test_api_key(api, photos):
    # Reads need no key; writes do (exit 2 with a hint), and a wrong one is refused the same way.
    run_cli("list", api=api, key=None)
    for key in (None, "wrong"):
        out, err = run_cli("add", "keyed", photos, api=api, key=key, rc=2)
        assert out == "" and re.match(r"error: POST /libraries answered 401 \S", err), err
        assert "pass the server's key with --api-key or IMAGE_SEARCH_API_KEY" in err
    assert "keyed" not in {lib["name"] for lib in httpx.get(f"{api}/libraries").json()}
    # --api-key on the command line works like the variable.
    out, _ = run_cli("add", "keyed", photos, "--no-progress", "--api-key", KEY, api=api, key=None)
    assert counts(out)["files"] == 10
    _, err = run_cli("remove", "keyed", api=api, key=None, rc=2)
    assert "DELETE /libraries/keyed answered 401" in err
    run_cli("remove", "keyed", "--api-key", KEY, api=api, key=None)
