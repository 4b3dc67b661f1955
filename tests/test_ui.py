"""The Gradio UI at /ui, driven like a browser would through a real server: gradio_client against a live uvicorn
with the offline model, a real embedded PostgreSQL and real images from the shared datasets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app.main import create_app
from tests.helpers import create_database, make_settings, run_live_server
from ui.app import THUMBNAIL_SIZE, _uploaded_image, format_stats

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

HOPPER = "instance_small/images/grace_hopper"
# Three variants of one portrait crop, indexed: a PNG, a JPEG with EXIF orientation 6 and a HEIF (which browsers
# cannot show, so the gallery must get a JPEG thumbnail of it).
HOPPER_INDEXED = ["pillow_hopper.png", "pillow_hopper_orientation_6.jpg", "pillow_hopper.heif"]
DISTRACTORS = [
    "instance_small/images/plasma_Kite/Kite_2560x1600.jpg",
    "instance_small/images/ocv_graffiti_viewpoint/graf1.png",
    "instance_small/images/exif_landscape/Landscape_0.jpg",
    "instance_small/images/pdq_bridge/aaa-orig.jpg",
]


@dataclass
class UiServer:
    url: str
    app: object
    datasets: Path

    def client(self) -> Client:
        return Client(f"{self.url}/ui/", verbose=False)


@pytest.fixture(scope="module")
def ui_server(pg_server, offline_embedder, datasets, tmp_path_factory) -> Iterator[UiServer]:
    """One live server with the UI for the whole module (starting one is the slow part), 7 images indexed."""
    settings = make_settings(tmp_path_factory.mktemp("ui") / "data", create_database(pg_server), ui_enabled=True)
    app = create_app(settings, embedder=offline_embedder)
    with run_live_server(app) as url:
        paths = [datasets / HOPPER / name for name in HOPPER_INDEXED] + [datasets / p for p in DISTRACTORS]
        for path in paths:
            r = httpx.post(f"{url}/index_image", files={"file": (path.name, path.read_bytes())}, timeout=60)
            assert r.status_code == 201, r.text
        yield UiServer(url, app, datasets)


def _captions(gallery: list[dict]) -> list[str]:
    return [item["caption"] for item in gallery]


def test_ui_page_is_served(ui_server):
    r = httpx.get(f"{ui_server.url}/ui/", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "gradio" in r.text.lower()


def test_search_by_image_returns_thumbnails_of_the_same_group_first(ui_server):
    query = ui_server.datasets / HOPPER / "pillow_hopper.jpg"  # not indexed itself
    gallery = ui_server.client().predict(handle_file(str(query)), 4, api_name="/search_image")

    captions = _captions(gallery)
    assert len(captions) == 4
    # "score · filename", best first; the three indexed variants of the query's picture come before any distractor.
    assert {c.split(" · ", 1)[1] for c in captions[:3]} == set(HOPPER_INDEXED)
    scores = [float(c.split(" · ", 1)[0]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert all(len(c.split(" · ", 1)[0].split(".")[1]) == 3 for c in captions)
    # Every result is delivered as a JPEG thumbnail, also for the HEIF original.
    for item in gallery:
        with Image.open(item["image"]) as im:
            assert im.format == "JPEG"
            assert max(im.size) <= THUMBNAIL_SIZE


def test_search_by_image_passes_the_original_bytes(ui_server):
    # The exact bytes of an indexed file are recognised as that file, which is left out of its own results (as in
    # the API). Any re-encoding on the way (the stock gr.Image converts to RGB and drops EXIF) would change the
    # bytes, so the file would come back first, scored about 1.
    query = ui_server.datasets / HOPPER / "pillow_hopper_orientation_6.jpg"
    gallery = ui_server.client().predict(handle_file(str(query)), 3, api_name="/search_image")
    names = [c.split(" · ", 1)[1] for c in _captions(gallery)]
    assert len(names) == 3 and "pillow_hopper_orientation_6.jpg" not in names


def test_bad_upload_shows_the_service_message(ui_server, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is not an image, just text in a .jpg file\n" * 4)
    api = httpx.post(f"{ui_server.url}/search_image", files={"file": (bad.name, bad.read_bytes())}, timeout=30)
    assert api.status_code in (415, 422)

    with pytest.raises(AppError) as info:
        ui_server.client().predict(handle_file(str(bad)), 3, api_name="/search_image")
    assert info.value.message == api.json()["detail"]  # the service's own words, not a traceback


def test_text_search_is_disabled_for_the_image_only_model(ui_server):
    with pytest.raises(AppError) as info:
        ui_server.client().predict("a woman in uniform", 3, api_name="/search_text")
    assert info.value.message == (
        "Text search needs a CLIP model; the loaded model efficientnet-lite2:imagenet is image-only."
    )

    # On page load the text box and its button are switched off and the explanation shown.
    demo = _mounted_blocks(ui_server.app)
    (load,) = [f for f in demo.fns.values() if f.name == "load_state"]
    line, slider, note, textbox, button = load.fn()
    assert textbox["interactive"] is False and button["interactive"] is False
    assert "image-only" in note["value"]
    settings = ui_server.app.state.settings
    assert slider["maximum"] == settings.max_top_k and slider["value"] == settings.default_top_k
    assert line == format_stats(ui_server.app.state.service.stats())


def test_stats_and_add_to_index(ui_server):
    client = ui_server.client()
    before = httpx.get(f"{ui_server.url}/stats", timeout=30).json()
    line = client.predict(api_name="/stats")
    assert line == f"{before['count']} images · model {before['model']} (dim {before['dimension']}) · backend pgvector"

    new = ui_server.datasets / HOPPER / "pillow_hopper.webp"
    known = ui_server.datasets / HOPPER / "pillow_hopper.png"
    summary, line = client.predict([handle_file(str(new)), handle_file(str(known))], api_name="/index_images")
    assert summary == "Added 1, already indexed 1, failed 0."
    assert line.startswith(f"{before['count'] + 1} images · ")
    assert httpx.get(f"{ui_server.url}/stats", timeout=30).json()["count"] == before["count"] + 1
    assert line == format_stats(ui_server.app.state.service.stats())


def _mounted_blocks(app):
    """The gr.Blocks mounted at /ui (gradio keeps it on the sub-app's ``blocks``)."""
    for route in app.routes:
        if getattr(route, "path", None) == "/ui":
            return route.app.blocks
    raise AssertionError("no /ui mount")


def test_uploaded_image_payloads():
    assert _uploaded_image(None) is None
    assert _uploaded_image({"path": "/tmp/gradio/abc/cat.jpg", "url": "http://x/file=cat.jpg"}) == (
        "/tmp/gradio/abc/cat.jpg"
    )
    assert _uploaded_image({"path": None, "url": "data:image/png;base64,iVBORw0K"}) == b"\x89PNG\r\n"
