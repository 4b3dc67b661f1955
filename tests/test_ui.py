"""The Gradio UI's server side: mounted at /ui with gr.mount_gradio_app, its handlers driven with gradio_client by
their API names (the same handlers the page calls), its login with API_KEY_READS, Gradio never imported without the
UI, and POST /preview (the query image as a JPEG for any format, for API clients). The page itself is driven in a
browser in tests/test_browser.py; the pure query/link rules are tested in tests/test_ui_query.py."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pillow_heif
import pytest
from PIL import Image, ImageOps

from app.main import create_app
from tests.helpers import DATASETS, FORMATS, INSTANCE, PROJECT_ROOT, make_settings, run_live_server

# Loads a model and a database: left out of `make test-fast`.
pytestmark = pytest.mark.slow

pillow_heif.register_heif_opener()  # to read the HEIC test file's size here

HOPPER = INSTANCE / "grace_hopper"
KEY = "ui-test-key-81c2"
# gradio_client's httpx default of 5 s timed out fetching the page config while the 2-core box ran at load 5-10
SLOW_BOX = {"timeout": 60}
CALTECH = DATASETS / "caltech101_subset" / "images"


def caltech_folder(folder: Path, n: int = 6) -> Path:
    """``folder`` made with ``n`` caltech photos of distinct categories (``Faces.jpg``...): a library's root."""
    folder.mkdir(parents=True)
    for source in sorted(CALTECH.glob("*/image_0001.jpg"))[:n]:
        shutil.copyfile(source, folder / f"{source.parent.name}.jpg")
    return folder


def gate_scans(monkeypatch) -> threading.Event:
    """Hold every library scan started from now on before its first step until the returned event is set (the
    library shows ``scanning`` meanwhile): a test then sees a running scan for sure, however fast the machine. A
    service that stops meanwhile (the test failed) lets the scan go at once, to stop at its first step."""
    import app.library.libraries as libraries_module

    gate = threading.Event()
    real = libraries_module.scan_library

    def gated(*args, stop: threading.Event | None = None, **kwargs):
        deadline = time.monotonic() + 120
        while not gate.wait(0.05) and not (stop is not None and stop.is_set()):
            assert time.monotonic() < deadline, "the test never let the scan go"
        return real(*args, stop=stop, **kwargs)

    monkeypatch.setattr(libraries_module, "scan_library", gated)
    return gate


@pytest.fixture(scope="module")
def ui_client(tmp_path_factory, pg_server, offline_embedder):
    """One app with the UI for the module's read-only tests (the page, its config, POST /preview, which stores
    nothing): building the UI and opening the service for each of them took 1-3 s a test."""
    from fastapi.testclient import TestClient

    from tests.helpers import create_database

    settings = make_settings(tmp_path_factory.mktemp("ui-client") / "data", create_database(pg_server), ui_enabled=True)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        yield client


def test_ui_is_the_gradio_app(ui_client):
    assert ui_client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    r = ui_client.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = ui_client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    config = ui_client.get("/ui/config").json()  # Gradio's own app config
    assert config["version"].startswith("6.") and config["title"] == "Image similarity search"
    assert config["analytics_enabled"] is False and not config.get("auth_required")
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Words", "But not", "Formats", "Results per page", "API key", "Library to scan"} <= labels
    endpoints = set(ui_client.get("/ui/gradio_api/info").json()["named_endpoints"])
    assert {"/search", "/similar", "/add", "/find_duplicates", "/stats", "/libraries", "/scan_library"} <= endpoints
    # Nothing in the page's theme is fetched from outside (the default theme would load Google Fonts).
    theme = ui_client.get("/ui/theme.css").text
    assert "googleapis" not in theme and "@import" not in theme
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", theme)  # only data: URLs (inline SVG icons)
    # The service's own API is untouched by the mount.
    assert ui_client.get("/health").json()["status"] == "ok"
    assert ui_client.get("/openapi.json").status_code == 200


def test_no_gradio_without_the_ui(client):
    assert client.get("/ui/").status_code == 404
    assert client.get("/", follow_redirects=False).headers["location"] == "/docs"
    # A fresh process that builds and serves the app with UI_ENABLED=false never imports Gradio.
    code = (
        "import sys; from app.config import Settings; from app.main import create_app; import app.service, "
        "app.api.routes; create_app(Settings(_env_file=None, ui_enabled=False)); "
        "assert 'gradio' not in sys.modules, 'gradio imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.fixture
def live_ui(tmp_path, database_url, offline_embedder):
    # MAX_UPLOAD_MB=1 and MAX_BATCH_MB=5: a 3 MB phone photo is over one file's limit, two of them over a request's.
    settings = make_settings(
        tmp_path / "data",
        database_url,
        ui_enabled=True,
        api_key=KEY,
        max_batch_files=2,
        max_upload_mb=1,
        max_batch_mb=5,
    )
    # A closed gradio_client's heartbeat stream stays open until its next beat (up to 15 s): the server stops
    # without waiting for it.
    with run_live_server(create_app(settings, embedder=offline_embedder), timeout_graceful_shutdown=2) as url:
        yield url


DESK = INSTANCE / "pdq_desk_exif"  # 12 MP phone photos, about 3.2 MB each


def _gradio_call(url: str, api_name: str, data: list) -> str:
    """Call a Gradio endpoint over plain HTTP (``/gradio_api/call``), as any client may: the event stream's text."""
    r = httpx.post(f"{url}/ui/gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    with httpx.stream("GET", f"{url}/ui/gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=60) as stream:
        return "".join(stream.iter_text())


def test_gradio_client_calls_the_handlers_by_api_name(live_ui, tmp_path, caplog, capfd, request):
    from gradio_client import Client, handle_file

    ui = Client(f"{live_ui}/ui/", verbose=False, httpx_kwargs=SLOW_BOX)
    request.addfinalizer(ui.close)  # before the server stops: its heartbeat stream held the shutdown 30 s
    names = ["pillow_hopper.png", "pillow_hopper.webp", "pillow_hopper_orientation_6.jpg"]
    files = [handle_file(str(HOPPER / n)) for n in names]
    # Adding needs the key (API_KEY is set): refused without it, nothing stored. An expected mistake (also adding
    # nothing) is one log line, not a traceback.
    caplog.set_level("INFO", logger="ui.context")
    with pytest.raises(Exception, match="API key"):
        ui.predict(photos=files, api_name="/add")
    with pytest.raises(Exception, match="Choose, drop or paste photos"):
        ui.predict(photos=[], api_key=KEY, api_name="/add")
    assert httpx.get(f"{live_ui}/stats").json()["count"] == 0
    refused = [r for r in caplog.records if r.name == "ui.context"]
    assert [r.levelname for r in refused] == ["WARNING", "INFO"] and not any(r.exc_info for r in refused)
    assert "Traceback" not in capfd.readouterr().err

    # Each file judged on its own, as POST /index_images does: a corrupt one and one over MAX_UPLOAD_MB are refused
    # in their own entries, in the order given; the others are added (in batches of MAX_BATCH_FILES=2).
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes((HOPPER / "pillow_hopper.jpg").read_bytes()[:500])
    big = DESK / "exif-rotn-1.jpg"
    chosen = [files[0], handle_file(str(big)), *files[1:], handle_file(str(corrupt))]
    summary, entries, line = ui.predict(photos=chosen, api_key=KEY, api_name="/add")
    assert [(e["file"], e["ok"]) for e in entries] == [
        ("pillow_hopper.png", True),
        ("exif-rotn-1.jpg", False),
        ("pillow_hopper.webp", True),
        ("pillow_hopper_orientation_6.jpg", True),
        ("broken.jpg", False),
    ]
    assert entries[1]["result"] == "The file is 3.1 MB; the limit is 1 MB (MAX_UPLOAD_MB)."  # MB of 10^6 bytes
    assert entries[4]["result"] and entries[0]["result"] == "added" and len(entries[0]["id"]) == 64
    assert line.startswith("3 photos · model ") and summary == "3 of 5 added or already there; 2 refused."
    # One request of the page's upload route may carry MAX_BATCH_MB (all files chosen at once), not more.
    upload = f"{live_ui}/ui/gradio_api/upload"
    two = [("files", (f"{n}.jpg", big.read_bytes())) for n in range(2)]
    r = httpx.post(upload, files=two, timeout=60)
    assert r.status_code == 413 and "5 MB (MAX_BATCH_MB)" in r.json()["detail"], r.text
    assert httpx.post(upload, files=two[:1], timeout=60).status_code == 200

    # Search by a photo: results as data, with their ids, ranked as the REST API ranks them.
    results, status = ui.predict(
        photo=handle_file(str(HOPPER / "pillow_hopper.jpg")), results_per_page=5, api_name="/search"
    )
    assert status.startswith("3 results") and [r["rank"] for r in results] == [1, 2, 3]
    assert {r["filename"] for r in results} == set(names)
    with (HOPPER / "pillow_hopper.jpg").open("rb") as f:
        rest = httpx.post(f"{live_ui}/search_image", files={"file": f}, data={"top_k": 5}).json()["results"]
    assert [(r["id"], r["filename"]) for r in results] == [(r["id"], r["filename"]) for r in rest]
    # A filter narrows it like the REST API's.
    webp, _ = ui.predict(photo=handle_file(str(HOPPER / "pillow_hopper.jpg")), formats=["WEBP"], api_name="/search")
    assert [r["filename"] for r in webp] == ["pillow_hopper.webp"]
    # The minimum size and the added dates as well (the REST API's min_width/min_height, indexed_after/_before;
    # days in UTC, "until" including its day): the three photos are 128 x 128 pixels, added today.
    today = datetime.now(UTC).date()
    sized, _ = ui.predict(
        photo=handle_file(str(HOPPER / "pillow_hopper.jpg")),
        min_width=128,
        min_height=128,
        added_from=today.isoformat(),
        added_until=today.isoformat(),
        api_name="/search",
    )
    with (HOPPER / "pillow_hopper.jpg").open("rb") as f:
        since = {"min_width": 128, "min_height": 128, "indexed_after": f"{today}T00:00:00Z"}
        rest = httpx.post(f"{live_ui}/search_image", files={"file": f}, data={"top_k": 20, **since}).json()
    assert [r["id"] for r in sized] == [r["id"] for r in rest["results"]] and len(sized) == 3
    for narrower in ({"min_height": 129}, {"added_until": (today - timedelta(days=1)).isoformat()}):
        nothing, status = ui.predict(image_id=sized[0]["id"], **narrower, api_name="/similar")
        assert nothing == [] and status.startswith("No results"), (narrower, status)
    _, status = ui.predict(image_id=sized[0]["id"], min_width=-1, api_name="/similar")
    assert status == "✗ Minimum width must be a whole number of pixels from 0 to 1,000,000, got -1.", status
    # A file the decoder refuses, and one over MAX_UPLOAD_MB, are reported in the status, in the setting's units.
    for photo, why in ((corrupt, "✗"), (big, "✗ The upload is 3.1 MB; the limit is 1 MB (MAX_UPLOAD_MB).")):
        nothing, status = ui.predict(photo=handle_file(str(photo)), api_name="/search")
        assert nothing == [] and status.startswith(why), status
    # More like this, by id; a result opened by id.
    similar, status = ui.predict(image_id=results[0]["id"], api_name="/similar")
    assert status.startswith("2 results") and results[0]["id"] not in {r["id"] for r in similar}
    _, status = ui.predict(image_id=results[0]["id"], results_per_page=1, api_name="/similar")
    assert status.startswith("1 result · "), status  # one result is not "1 results"
    details, large, original = ui.predict(image_id=results[0]["id"], api_name="/open")
    assert results[0]["filename"] in details and results[0]["id"] in details
    assert Path(original).read_bytes() == (HOPPER / results[0]["filename"]).read_bytes()
    with pytest.raises(Exception, match="No photo of the collection has this id"):
        ui.predict(image_id="0" * 64, api_name="/open")
    assert ui.predict(api_name="/stats").startswith("3 photos · model efficientnet")

    # A client may name only files uploaded to this service: not another file of the server (a mounted Gradio app
    # skips that check unless told it has launched).
    elsewhere = str(HOPPER / "pillow_hopper.jpg")
    named = {"path": elsewhere, "meta": {"_type": "gradio.FileData"}}
    answer = _gradio_call(live_ui, "search", [named, "", "", "", [], "", "", "", "", None, None, 0, False, 5])
    assert "event: error" in answer and "not uploaded by a user" in answer, answer
    answer = _gradio_call(live_ui, "add", [[named], KEY])
    assert "event: error" in answer and httpx.get(f"{live_ui}/stats").json()["count"] == 3, answer


def test_the_gradio_api_examples_of_the_docs_run(live_ui, tmp_path, monkeypatch):
    """Every ```python block of docs/web-ui.md's "Gradio API" section, in order, against a live server; the files
    they name are the test data's (a JPEG and the same picture as a HEIC)."""
    text = (PROJECT_ROOT / "docs" / "web-ui.md").read_text()
    section = text.split("## Gradio API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 9, blocks
    shutil.copyfile(HOPPER / "pillow_hopper.jpg", tmp_path / "cat.jpg")
    shutil.copyfile(HOPPER / "pillow_hopper.heif", tmp_path / "IMG_0001.HEIC")
    # The library the examples scan: an empty folder, so that its scans add nothing to the other examples' photos.
    (tmp_path / "photos").mkdir()
    r = httpx.post(
        f"{live_ui}/libraries", json={"name": "photos", "roots": [str(tmp_path / "photos")]}, headers={"X-API-Key": KEY}
    )
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 60
    while httpx.get(f"{live_ui}/libraries/photos").json()["state"] != "idle":  # its first scan
        assert time.monotonic() < deadline, "the library's first scan did not end"
        time.sleep(0.1)
    monkeypatch.chdir(tmp_path)
    names: dict = {"URL": live_ui, "KEY": KEY}
    for block in blocks:
        exec(compile(block, "docs/web-ui.md", "exec"), names)  # noqa: S102 - the docs' own examples
    try:
        assert names["summary"].startswith("2 of 2") and names["best"]["filename"] == "IMG_0001.HEIC"
        assert names["pngs"] == [] and names["similar"][0]["filename"] == "cat.jpg"
        assert (
            "IMG_0001.HEIC" in names["details"]
            and Path(names["original"]).read_bytes() == (tmp_path / "IMG_0001.HEIC").read_bytes()
        )
        assert set(names["groups"][0]["filenames"]) == {"cat.jpg", "IMG_0001.HEIC"}
        assert "groups at similarity" in names["status"]
        assert names["large"] == []  # no photo 1920 pixels wide
        assert names["names"] == ["photos"] and names["scanning"] is False and "#### photos" in names["libraries"]
        assert names["message"] == "Scan of **photos** started."
    finally:
        names["ui"].close()


def test_libraries_tab_lists_and_scans_with_the_key(tmp_path, database_url, offline_embedder, monkeypatch):
    from gradio_client import Client

    settings = make_settings(tmp_path / "data", database_url, ui_enabled=True, api_key=KEY)
    app = create_app(settings, embedder=offline_embedder)
    with run_live_server(app, timeout_graceful_shutdown=2) as url:  # see live_ui
        ui = Client(f"{url}/ui/", verbose=False, httpx_kwargs=SLOW_BOX)
        try:
            text, names, scanning = ui.predict(api_name="/libraries")
            assert "No photo library yet" in text and "image-search-library add NAME FOLDER" in text
            assert names == [] and scanning is False
            folder = caltech_folder(tmp_path / "photos")
            libraries = app.state.service.libraries
            libraries.create("photos", [str(folder)])
            assert libraries.wait("photos", 300)
            text, names, scanning = ui.predict(api_name="/libraries")
            assert names == ["photos"] and scanning is False
            assert "#### photos" in text and "✓ **Idle**" in text
            assert "**6 online** · **0 offline** · 0 failed · 6 distinct photos" in text
            assert "6 files found; 6 new, 6 indexed (model calls)" in text

            (folder / "Faces.jpg").unlink()
            gate = gate_scans(monkeypatch)
            # A scan is a write: refused without the key, with a wrong one, and for a library that does not exist.
            for key in (None, "wrong"):
                with pytest.raises(Exception, match="Scanning a library needs the service's API key"):
                    ui.predict(library="photos", api_key=key, api_name="/scan_library")
            assert libraries.status("photos").state == "idle"
            with pytest.raises(Exception, match="No library called 'nope'"):
                ui.predict(library="nope", api_key=KEY, api_name="/scan_library")
            message, text = ui.predict(library="photos", api_key=KEY, api_name="/scan_library")
            assert message == "Scan of **photos** started." and "⏳ **Scanning**" in text
            assert ui.predict(api_name="/libraries")[2] is True  # a scan runs
            message, _ = ui.predict(library="photos", force=True, api_key=KEY, api_name="/scan_library")
            assert message.startswith("A scan of **photos** is already running")
            gate.set()
            assert libraries.wait("photos", 300)
            text, *_ = ui.predict(api_name="/libraries")
            assert "**5 online** · **1 offline**" in text and "5 unchanged, 1 newly offline" in text
            offline = "**1 file offline**: missing since a scan. It is hidden from search results and kept for 30 days"
            assert offline in text
        finally:
            ui.close()  # else its heartbeat stream holds the server's shutdown 30 s (now: until the next beat)


def test_api_key_reads_puts_every_gradio_route_behind_the_login(tmp_path, database_url, offline_embedder):
    settings = make_settings(tmp_path / "data", database_url, ui_enabled=True, api_key=KEY, api_key_reads=True)
    with run_live_server(create_app(settings, embedder=offline_embedder), timeout_graceful_shutdown=2) as url:
        anonymous = httpx.Client(base_url=url, timeout=10)
        # The page shell and its scripts hold no data; they load, and show Gradio's login form.
        assert anonymous.get("/ui/").status_code == 200
        for method, path in [
            ("GET", "/ui/config"),
            ("GET", "/ui/gradio_api/info"),
            ("GET", "/ui/gradio_api/openapi.json"),
            ("POST", "/ui/gradio_api/upload"),
            ("GET", "/ui/gradio_api/upload_progress?upload_id=x"),
            ("GET", "/ui/gradio_api/file=/tmp/gradio/image-search/thumbs/x.jpg"),
            ("POST", "/ui/gradio_api/queue/join"),
            ("POST", "/ui/gradio_api/call/search"),
            ("POST", "/ui/gradio_api/run/predict"),
            ("POST", "/ui/gradio_api/component_server"),
            ("GET", "/ui/monitoring"),
            # Routes Gradio itself leaves open (issue #27 item 6): behind the login too.
            ("POST", "/ui/gradio_api/reset"),
            ("POST", "/ui/gradio_api/cancel"),
            ("GET", "/ui/gradio_api/app_id"),
            ("GET", "/ui/gradio_api/user"),
            ("GET", "/ui/gradio_api/token"),
            ("GET", "/ui/gradio_api/startup-events"),
            ("POST", "/ui/gradio_api/stream/x"),
            ("POST", "/ui/gradio_api/stream/x/close"),
            ("GET", "/ui/gradio_api/login_check"),
            ("GET", "/ui/monitoring/summary"),
        ]:
            r = anonymous.request(method, path)
            assert r.status_code == 401, path
            assert "Log in" in str(r.json()["detail"]), (path, r.text)
        # Gradio's event streams refuse too (read with a timeout: an accepted stream would stay open).
        for path in ("/ui/gradio_api/queue/data?session_hash=x", "/ui/gradio_api/heartbeat/x"):
            with anonymous.stream("GET", path) as r:
                assert r.status_code == 401, path
        # A forged or stale session cookie is no login.
        forged = httpx.Client(base_url=url, timeout=10, cookies={"access-token-x": "y"})
        assert forged.get("/ui/gradio_api/app_id").status_code == 401
        # What the login page itself loads still does: its theme, scripts and the login form.
        page = anonymous.get("/ui/").text
        assert anonymous.get("/ui/theme.css").status_code == 200
        from urllib.parse import urljoin

        scripts = [src for src in re.findall(r'(?:src|href)="([^"]+)"', page) if "assets/" in src]
        assert scripts, page[:500]
        for src in scripts:
            assert anonymous.get(urljoin(f"{url}/ui/", src)).status_code == 200, src
        assert anonymous.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code == 400
        logged_in = httpx.Client(base_url=url, timeout=30)
        assert logged_in.post("/ui/login", data={"username": "me", "password": KEY}).json() == {"success": True}
        assert logged_in.get("/ui/config").status_code == 200
        assert logged_in.get("/ui/gradio_api/info").status_code == 200
        assert logged_in.get("/ui/gradio_api/app_id").status_code == 200
        assert logged_in.get("/ui/gradio_api/user").json() == "me"
        with logged_in.stream("GET", "/ui/gradio_api/heartbeat/s1") as r:  # the session's heartbeat opens
            assert r.status_code == 200 and next(r.iter_text()).startswith("data: ALIVE")

        # gradio_client logs in the same way, and a logged-in user may write: the login was the key.
        from gradio_client import Client, handle_file

        ui = Client(f"{url}/ui/", auth=("me", KEY), verbose=False, httpx_kwargs=SLOW_BOX)
        try:
            _, entries, line = ui.predict(photos=[handle_file(str(HOPPER / "pillow_hopper.png"))], api_name="/add")
            assert entries[0]["ok"] and line.startswith("1 photo · ")
        finally:
            ui.close()  # else its heartbeat stream holds the server's shutdown until the next beat


@pytest.mark.parametrize(
    "path",
    [
        FORMATS / "heic" / "IMG_5195.HEIC",  # upper case, as iPhones name them
        FORMATS / "tiff" / "hopper.tif",
        INSTANCE / "exif_portrait" / "Portrait_6.jpg",  # EXIF orientation 6: the preview is upright
    ],
    ids=lambda p: p.name,
)
def test_preview_is_a_jpeg_for_any_format(ui_client, path):
    with Image.open(path) as original:
        upright = ImageOps.exif_transpose(original).size
    r = ui_client.post("/preview?size=200", files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg" and r.headers["cache-control"] == "no-store"
    with Image.open(io.BytesIO(r.content)) as preview:
        assert preview.format == "JPEG" and max(preview.size) <= 200
        # Same orientation as the upright original (landscape stays landscape, portrait portrait).
        assert (preview.width >= preview.height) == (upright[0] >= upright[1])
    assert ui_client.get("/stats").json()["count"] == 0  # nothing stored


def test_preview_refuses_what_it_cannot_read(ui_client):
    r = ui_client.post("/preview", files={"file": ("notes.HEIC", b"not an image at all\n" * 20)})
    assert r.status_code == 415 and "detail" in r.json()
    truncated = (INSTANCE / "exif_portrait" / "Portrait_6.jpg").read_bytes()[:400]
    r = ui_client.post("/preview", files={"file": ("cut.jpg", truncated)})
    assert r.status_code in (415, 422) and r.json()["detail"]
    assert ui_client.post("/preview?size=5000", files={"file": ("a.jpg", b"x")}).status_code == 422


def test_preview_waits_for_decode_capacity(tmp_path, database_url, offline_embedder):
    # /preview decodes through the same pixel admission as searches: while the capacity is taken, it waits up to
    # DECODE_WAIT_S and then answers 503 with Retry-After instead of decoding beside everything else.
    from fastapi.testclient import TestClient

    settings = make_settings(tmp_path / "data", database_url, max_decode_pixels_in_flight=4_000_000, decode_wait_s=0.2)
    path = INSTANCE / "exif_portrait" / "Portrait_6.jpg"
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        gate = client.app.state.service.admission
        with gate.admit(4_000_000):
            r = client.post("/preview", files={"file": (path.name, path.read_bytes())})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert client.post("/preview", files={"file": (path.name, path.read_bytes())}).status_code == 200
        assert gate.in_flight == 0


def _serve_in_a_process(tmp_path: Path, name: str, database_url: str, model_cache_dir: Path, **env: str):
    """``python -m app`` with the UI, in a process of its own (its own environment, as an instance on a host), on a
    free port; no GRADIO_TEMP_DIR in its environment. Returns ``(process, base URL, data dir)``."""
    from tests.helpers import free_port

    port = free_port()
    data = tmp_path / name
    environment = {k: v for k, v in os.environ.items() if k not in ("GRADIO_TEMP_DIR", "DATABASE_URL")}
    environment.update(
        DATA_DIR=str(data),
        DATABASE_URL=database_url,
        MODEL_CACHE_DIR=str(model_cache_dir),
        EMBEDDER="efficientnet",
        UI_ENABLED="true",
        HOST="127.0.0.1",
        PORT=str(port),
        LOG_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        **env,
    )
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "app"], cwd=PROJECT_ROOT, env=environment, stdout=log, stderr=log)
    return process, f"http://127.0.0.1:{port}", data


def _wait_healthy_then_ui(process, url: str) -> list[int]:
    """Wait for ``/health`` to answer 200, then ask for ``/ui/`` at once: the status codes ``/ui/`` answered until
    the page came (the UI is built after the API is healthy; meanwhile a request waits for it)."""
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    codes = []
    while not codes or codes[-1] != 200:
        codes.append(httpx.get(f"{url}/ui/", timeout=60).status_code)
        assert len(codes) < 20 and time.monotonic() < deadline, codes
    return codes


def test_two_instances_on_one_host_keep_their_ui_files_apart(tmp_path, pg_server, offline_embedder, model_cache_dir):
    """Instance A asks for a key for everything (API_KEY_READS); B, on the same host, asks for none. A's uploads,
    thumbnails and originals are under A's DATA_DIR, and B neither serves them nor accepts them in a call."""
    from gradio_client import Client, handle_file

    from tests.helpers import create_database

    a, a_url, a_data = _serve_in_a_process(
        tmp_path, "a", create_database(pg_server), model_cache_dir, API_KEY=KEY, API_KEY_READS="true"
    )
    b, b_url, b_data = _serve_in_a_process(tmp_path, "b", create_database(pg_server), model_cache_dir)
    try:
        # /ui/ right after /health: it waits for the UI being built, never a 404 or a 500.
        assert _wait_healthy_then_ui(a, a_url)[-1] == 200 and _wait_healthy_then_ui(b, b_url) == [200]
        photo = HOPPER / "pillow_hopper.png"
        r = httpx.post(
            f"{a_url}/index_images", files=[("files", (photo.name, photo.read_bytes()))], headers={"X-API-Key": KEY}
        )
        assert r.status_code == 200, r.text
        ui = Client(f"{a_url}/ui/", auth=("me", KEY), verbose=False, httpx_kwargs=SLOW_BOX)
        try:
            results, _ = ui.predict(photo=handle_file(str(HOPPER / "pillow_hopper.jpg")), api_name="/search")
            ui.predict(image_id=results[0]["id"], api_name="/open")  # A makes its large view and original
        finally:
            ui.close()
        made = [p for p in (a_data / "ui-files").rglob("*") if p.is_file()]
        names = {p.name for p in made}
        assert {"pillow_hopper.jpg", "pillow_hopper.png"} <= names, names  # the upload, the original
        assert not any((b_data / "ui-files").rglob("pillow_hopper*")), "B's folder holds A's files"
        for path in made:
            # Not through B's file route (a 403 of Gradio's own), nor named in a call to B.
            assert httpx.get(f"{b_url}/ui/gradio_api/file={path}").status_code == 403, path
        named = {"path": str(made[0]), "meta": {"_type": "gradio.FileData"}}
        answer = _gradio_call(b_url, "search", [named, "", "", "", [], "", "", "", "", None, None, 0, False, 5])
        assert "event: error" in answer and "not uploaded by a user" in answer, answer
        # And A serves its own only after the login.
        assert httpx.get(f"{a_url}/ui/gradio_api/file={made[0]}").status_code == 401
    finally:
        for process in (a, b):
            process.terminate()
        for process in (a, b):
            process.wait(timeout=60)


def test_ui_gate_answers_503_with_retry_after_when_the_ui_cannot_start():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ui.mount import UI_RETRY_AFTER_S, UiGate

    gate = UiGate()
    app = FastAPI()
    app.mount("/ui", gate)
    gate.fail("ImportError")
    r = TestClient(app).get("/ui/")
    assert r.status_code == 503 and r.headers["retry-after"] == str(UI_RETRY_AFTER_S)
    assert "could not start (ImportError)" in r.json()["detail"]
