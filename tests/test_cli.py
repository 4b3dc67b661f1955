"""The command-line tools end to end: ``scripts/bulk_index.py`` and ``scripts/find_similar.py`` run as subprocesses
against a real uvicorn server (``live_api``), with real images from ``../shared/datasets`` linked into a temp folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.helpers import BULK_SUMMARY as SUMMARY
from tests.helpers import PROJECT_ROOT, free_port, make_settings, run_live_server
from tests.helpers import symlink as _link

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

SCRIPTS = PROJECT_ROOT / "scripts"
IMAGES = "instance_small/images"
# Small real subsets (the model runs on CPU): whole groups, a few formats of one photo, and other containers.
GROUPS = ["ukbench00120", "gdk_bench_photo", "ocv_aero_viewpoint", "plasma_Grey"]
# No two of these embed identically (the three gdk_bench_photo files do), so rankings have no ties.
SEARCH_GROUPS = ["ukbench00120", "ocv_aero_viewpoint", "plasma_Grey"]
HOPPER = [f"pillow_hopper.{ext}" for ext in ("avif", "heif", "webp", "png", "tif", "gif")]
FORMATS = {  # stored name -> dataset file; the upper-case extension checks that the filter ignores case
    "more formats/Autumn.HEIC": "formats/heic/nokia_autumn_1440x960.heic",
    "more formats/rot1mir0.avif": "formats/avif/rot1mir0.avif",
    "more formats/flower.webp": "formats/webp/flower.webp",
    "more formats/deeper/bridge_L.png": "formats/png/bridge_L.png",
}
CORRUPT = "formats/broken/ukbench09268_corrupt.jpg"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def photos(tmp_path, datasets) -> tuple[Path, dict[str, Path]]:
    """A folder of symlinks to real images (23 files, 3 levels deep, some hidden or non-image files to skip).

    Returns the folder and ``{relative POSIX name: dataset file}`` of the files that must be indexed.
    """
    root = tmp_path / "photos"
    expected: dict[str, Path] = {}
    for group in GROUPS:
        for src in sorted((datasets / IMAGES / group).iterdir()):
            expected[f"{group}/{src.name}"] = src
    for name in HOPPER:
        expected[f"hopper/{name}"] = datasets / IMAGES / "grace_hopper" / name
    expected.update({name: datasets / src for name, src in FORMATS.items()})
    for name, src in expected.items():
        _link(src, root / name)
    # Skipped without --all-files: hidden files and folders, and names without an image extension.
    some_image = datasets / IMAGES / "ukbench00120/ukbench00120.jpg"
    _link(some_image, root / ".hidden.jpg")
    _link(some_image, root / ".cache/thumb.jpg")
    (root / "notes.txt").write_text("not an image\n")
    return root, expected


def run_cli(
    script: str,
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check_rc: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a script with this interpreter, as a user would; ``check_rc`` asserts the exit status."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_SEARCH_API", "IMAGE_SEARCH_API_KEY", "BROWSER")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *map(str, args)],
        cwd=cwd or PROJECT_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def bulk_index(api: str, folder: Path, *args: str | Path, cwd: Path, rc: int = 0) -> tuple[int, int, int, int]:
    """Run bulk_index.py and return its summary counts ``(scanned, already indexed, indexed, failed)``."""
    proc = run_cli("bulk_index.py", folder, "--api", api, "--no-progress", *args, cwd=cwd, check_rc=rc)
    match = SUMMARY.search(proc.stdout)
    assert match, proc.stdout
    return tuple(int(n) for n in match.groups()[:4])


def search_json(api: str, query: Path, top_k: int) -> list[dict]:
    proc = run_cli("find_similar.py", query, "--api", api, "--top-k", str(top_k), "--json", check_rc=0)
    return json.loads(proc.stdout)["results"]


def test_bulk_index_full_run_then_nothing_new(live_api, photos, tmp_path):
    folder, expected = photos
    assert bulk_index(live_api, folder, cwd=tmp_path) == (len(expected), 0, len(expected), 0)
    assert not (tmp_path / "bulk_index_failures.log").exists()  # written only when something failed
    assert httpx.get(f"{live_api}/stats").json()["count"] == len(expected)

    # A second run uploads nothing: every file is found by its hash.
    assert bulk_index(live_api, folder, "--concurrency", "2", cwd=tmp_path) == (len(expected), len(expected), 0, 0)

    # The stored filename is the path relative to the folder, in POSIX form, for every file.
    query = "ukbench00120/ukbench00120.jpg"
    results = search_json(live_api, expected[query], top_k=50)  # the query file itself is left out
    assert {r["filename"]: r["id"] for r in results} == {
        name: _sha256(src) for name, src in expected.items() if name != query
    }


def test_bulk_index_resumes_where_it_stopped(live_api, photos, tmp_path):
    folder, expected = photos
    first = [name for name in expected if name.startswith("ukbench00120/")]
    assert bulk_index(live_api, folder / "ukbench00120", cwd=tmp_path) == (len(first), 0, len(first), 0)
    # The whole folder: only the files not indexed yet are uploaded.
    rest = len(expected) - len(first)
    assert bulk_index(live_api, folder, cwd=tmp_path) == (len(expected), len(first), rest, 0)
    assert httpx.get(f"{live_api}/stats").json()["count"] == len(expected)


def test_bulk_index_reports_failures(live_api, datasets, tmp_path):
    folder = tmp_path / "mixed"
    _link(datasets / IMAGES / "plasma_Grey/Grey_screenshot.jpg", folder / "good.jpg")
    _link(datasets / CORRUPT, folder / "bad/corrupt.jpg")
    (folder / "bad/notes.png").write_text("a text file with an image extension\n")
    (folder / "README").write_text("no extension: only sent with --all-files\n")
    log = tmp_path / "logs/failed.log"
    log.parent.mkdir()

    proc = run_cli("bulk_index.py", folder, "--api", live_api, "--failures-log", log, cwd=tmp_path, check_rc=1)
    assert "scanned 3 files: 0 already indexed, 1 indexed, 2 failed" in proc.stdout
    assert str(log) in proc.stdout
    assert "Traceback" not in proc.stderr
    reasons = dict(line.split("\t", 1) for line in log.read_text().splitlines())
    assert set(reasons) == {"bad/corrupt.jpg", "bad/notes.png"}
    for reason in reasons.values():  # "HTTP <status>: <the API's detail>"
        assert re.fullmatch(r"HTTP 4\d\d: \S.*", reason), reason

    # Failed files are retried on the next run; --all-files also sends the file without an extension, and the
    # log goes to ./bulk_index_failures.log by default.
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert bulk_index(live_api, folder, "--all-files", cwd=workdir, rc=1) == (4, 1, 0, 3)
    default_log = (workdir / "bulk_index_failures.log").read_text()
    assert {line.split("\t")[0] for line in default_log.splitlines()} == {"README", "bad/corrupt.jpg", "bad/notes.png"}


@pytest.fixture
def indexed(live_api, photos, tmp_path) -> dict[str, Path]:
    """``SEARCH_GROUPS`` of ``photos`` (9 files) indexed with bulk_index.py; returns ``{stored name: file}``."""
    folder, expected = photos
    subset = tmp_path / "subset"
    chosen = {name: src for name, src in expected.items() if name.split("/")[0] in SEARCH_GROUPS}
    for name, src in chosen.items():
        _link(src, subset / name)
    bulk_index(live_api, subset, cwd=tmp_path)
    return chosen


def test_find_similar_table_and_json(live_api, indexed):
    query_name = "ocv_aero_viewpoint/aero1.jpg"
    query = indexed[query_name]
    plain = run_cli("find_similar.py", query, "--api", live_api, "--top-k", "3", check_rc=0).stdout.splitlines()
    assert plain[0].split() == ["rank", "score", "id", "filename"]
    rows = [line.split(None, 3) for line in plain[1:]]
    assert len(rows) == 3  # --top-k respected
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert all(re.fullmatch(r"0\.\d{4}", row[1]) for row in rows)  # scored 4 decimals
    assert _sha256(query)[:12] not in {row[2] for row in rows}  # the indexed query file itself is left out

    results = search_json(live_api, query, top_k=3)
    assert [(str(i), f"{r['score']:.4f}", r["id"][:12], r["filename"]) for i, r in enumerate(results, 1)] == [
        tuple(row) for row in rows
    ]
    for r in results:
        assert {"rank", "id", "score", "filename", "image_url"} <= set(r) and re.fullmatch(r"[0-9a-f]{64}", r["id"])
        assert r["image_url"] == f"{live_api}/image/{r['id']}"
        assert r["filename"] in indexed
    assert len(search_json(live_api, query, top_k=5)) == 5

    # The default API comes from $IMAGE_SEARCH_API; without --top-k the server's default (5) applies.
    proc = run_cli("find_similar.py", query, "--json", env={"IMAGE_SEARCH_API": live_api}, check_rc=0)
    assert len(json.loads(proc.stdout)["results"]) == 5


def test_find_similar_server_errors(live_api, indexed, datasets):
    proc = run_cli("find_similar.py", datasets / CORRUPT, "--api", live_api, check_rc=1)
    assert re.match(r"error: 4\d\d \S", proc.stderr), proc.stderr  # 415 or 422: the decoder decides
    proc = run_cli("find_similar.py", next(iter(indexed.values())), "--api", live_api, "--top-k", "100000", check_rc=1)
    assert proc.stderr.startswith("error: 422 top_k must be between 1 and"), proc.stderr


def test_find_similar_opens_matches_in_the_browser(live_api, indexed, tmp_path):
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "fake-browser"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> "{opened}"\n')
    browser.chmod(0o755)
    query = indexed["plasma_Grey/Grey_2560x1600.jpg"]

    run_cli(
        "find_similar.py", query, "--api", live_api, "--top-k", "2", "--open", env={"BROWSER": str(browser)}, check_rc=0
    )
    urls = [r["image_url"] for r in search_json(live_api, query, top_k=2)]
    assert opened.read_text().splitlines() == urls
    # The URL serves the original (the query file itself is left out of its results).
    assert httpx.get(urls[0]).content == indexed[search_json(live_api, query, top_k=1)[0]["filename"]].read_bytes()


def test_usage_errors_and_unreachable_api(tmp_path, datasets):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    image = datasets / IMAGES / "plasma_Grey/Grey_screenshot.jpg"
    folder = tmp_path / "photos"
    _link(image, folder / "a.jpg")

    for proc in (
        run_cli("bulk_index.py", folder, "--api", dead, "--retries", "1", cwd=tmp_path, check_rc=2),
        run_cli("find_similar.py", image, "--api", dead, check_rc=2),
    ):
        assert f"cannot reach the API at {dead}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bulk_index_failures.log").exists()

    proc = run_cli("bulk_index.py", tmp_path / "missing", "--api", dead, cwd=tmp_path, check_rc=2)
    assert "not a folder" in proc.stderr
    proc = run_cli("find_similar.py", tmp_path / "missing.jpg", "--api", dead, check_rc=2)
    assert "no such file" in proc.stderr
    run_cli("bulk_index.py", folder, "--concurrency", "0", cwd=tmp_path, check_rc=2)


# --- --api-key against a server that requires a key ------------------------------------------------------------
CLI_KEY = "cli-key-3c9d"
AUTH_GROUP = "instance_small/images/ukbench00120"


def test_cli_send_the_api_key(tmp_path, database_url, offline_embedder, datasets):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((datasets / AUTH_GROUP).iterdir())
    for src in sources:
        (folder / src.name).symlink_to(src)
    settings = make_settings(tmp_path / "data", database_url, api_key=f"other-key,{CLI_KEY}", api_key_reads=True)
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        # Without a key: refused at the first request that needs one, with a hint, exit status 2.
        proc = run_cli("bulk_index.py", folder, "--api", url, "--no-progress", cwd=tmp_path, check_rc=2)
        assert "401" in proc.stderr and "--api-key" in proc.stderr
        proc = run_cli("find_similar.py", sources[0], "--api", url, check_rc=1)
        assert "401" in proc.stderr
        proc = run_cli(
            "bulk_index.py", folder, "--api", url, "--api-key", "wrong", "--no-progress", cwd=tmp_path, check_rc=2
        )
        assert "401" in proc.stderr

        # --api-key, then the environment variable.
        proc = run_cli("bulk_index.py", folder, "--api", url, "--api-key", CLI_KEY, "--no-progress", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert SUMMARY.search(proc.stdout).group(3) == str(len(sources))
        assert CLI_KEY not in proc.stdout + proc.stderr
        proc = run_cli("find_similar.py", sources[0], "--api", url, "--json", env={"IMAGE_SEARCH_API_KEY": CLI_KEY})
        assert proc.returncode == 0, proc.stderr
        assert '"results"' in proc.stdout
        assert httpx.get(f"{url}/stats", headers={"X-API-Key": CLI_KEY}).json()["count"] == len(sources)


def test_bulk_index_stops_at_403_on_non_loopback_host(tmp_path, database_url, offline_embedder, datasets):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((datasets / AUTH_GROUP).iterdir()):
        (folder / src.name).symlink_to(src)
    settings = make_settings(tmp_path / "data", database_url, host="0.0.0.0")  # served on loopback by the fixture
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        proc = run_cli("bulk_index.py", folder, "--api", url, "--no-progress", "--batch-size", "1", cwd=tmp_path)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "403" in proc.stderr and "API_KEY" in proc.stderr
        _assert_summary_adds_up(proc.stdout)


def _assert_summary_adds_up(stdout: str) -> tuple[int, ...]:
    """The summary line accounts for every scanned file; returns (scanned, already, indexed, failed, not done)."""
    match = SUMMARY.search(stdout)
    assert match, stdout
    scanned, already, indexed, failed = map(int, match.groups()[:4])
    not_done = int(match.group(6) or 0)
    assert scanned == already + indexed + failed + not_done, stdout
    return scanned, already, indexed, failed, not_done


def test_bulk_index_summary_adds_up_when_the_api_is_lost(photos, tmp_path):
    """An API that answers /health but is lost for POST /images/exists (503: its database went away): the run stops
    with exit 2, and the summary says how many files it never got to."""
    import http.server
    import threading

    class LostApi(http.server.BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(200, {"status": "ok"})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(503, {"detail": "The database is unavailable"})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), LostApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder, expected = photos
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        proc = run_cli("bulk_index.py", folder, "--api", url, "--no-progress", "--retries", "0", cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert _assert_summary_adds_up(proc.stdout) == (len(expected), 0, 0, 0, len(expected))
