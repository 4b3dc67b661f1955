"""The web UI's server side: its static files at /ui/, /ui/config.json, and POST /preview (the query image as a JPEG
for any format), through the real app on a real database. The page itself is driven in a browser in
tests/test_browser.py."""

from __future__ import annotations

import io

import pillow_heif
import pytest
from PIL import Image, ImageOps

from app.main import create_app
from tests.helpers import FORMATS, INSTANCE, make_settings

# Loads a model and a database: left out of `make test-fast`.
pytestmark = pytest.mark.slow

pillow_heif.register_heif_opener()  # to read the HEIC test file's size here


@pytest.fixture
def ui_client(tmp_path, database_url, offline_embedder):
    from fastapi.testclient import TestClient

    settings = make_settings(tmp_path / "data", database_url, ui_enabled=True)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        yield client


def test_ui_files_are_served(ui_client):
    assert ui_client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    r = ui_client.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = ui_client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "img-src 'self' blob:" in csp and "frame-ancestors 'none'" in csp
    for name in ("app.js", "api.js", "search.js", "add.js", "duplicates.js", "util.js"):
        r = ui_client.get(f"/ui/{name}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"], name
    # Nothing outside ui/static is reachable through the mount.
    assert ui_client.get("/ui/../app/config.py").status_code == 404
    assert ui_client.get("/ui/%2e%2e/__init__.py").status_code == 404


def test_ui_config(ui_client):
    config = ui_client.get("/ui/config.json").json()
    settings = ui_client.app.state.settings
    assert config == {
        "reads_need_key": False,
        "writes_need_key": False,
        "writes_refused": None,
        "default_top_k": settings.default_top_k,
        "max_top_k": settings.max_top_k,
        "max_upload_mb": settings.max_upload_mb,
        "max_batch_files": settings.max_batch_files,
        "max_batch_mb": settings.max_batch_mb,
    }


def test_no_ui_when_disabled(client):
    assert client.get("/ui/").status_code == 404
    assert client.get("/ui/config.json").status_code == 404


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

    settings = make_settings(
        tmp_path / "data", database_url, ui_enabled=True, max_decode_pixels_in_flight=4_000_000, decode_wait_s=0.2
    )
    path = INSTANCE / "exif_portrait" / "Portrait_6.jpg"
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        gate = client.app.state.service.admission
        with gate.admit(4_000_000):
            r = client.post("/preview", files={"file": (path.name, path.read_bytes())})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert client.post("/preview", files={"file": (path.name, path.read_bytes())}).status_code == 200
        assert gate.in_flight == 0
