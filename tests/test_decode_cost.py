"""Memory (issue #20, item 3): the decode admission charges what each format and mode really costs to decode, stored
thumbnails are cached so a repeat does not decode again, and the optional per-client rate limit. Real images and
the real app on a real database."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from app.imaging.decode import RGB_DECODE_BYTES_PER_PIXEL, decode_cost, header_pixels
from app.main import create_app
from tests.helpers import make_settings

HOPPER = "instance_small/images/grace_hopper"
KEY = "cost-key-5e21"


def _encode(mode: str, fmt: str, side: int = 400, **options) -> bytes:
    rng = np.random.default_rng(1)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    if mode == "F":
        arr = rng.random((side, side), dtype=np.float32)
    else:
        arr = rng.integers(0, 256, size=(side, side, channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(arr, mode if mode in ("RGB", "RGBA", "F") else None)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).quantize(64)
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_the_charge_follows_the_measured_cost_of_format_and_mode():
    pixels = 400 * 400
    rgb_png = decode_cost(_encode("RGB", "PNG"), max_pixels=10**8)
    assert rgb_png == pixels * RGB_DECODE_BYTES_PER_PIXEL  # an RGB photo: the unit of the admission
    costs = {
        "webp_rgba": decode_cost(_encode("RGBA", "WEBP", lossless=True), max_pixels=10**8),
        "webp_rgb": decode_cost(_encode("RGB", "WEBP"), max_pixels=10**8),
        "png_rgba": decode_cost(_encode("RGBA", "PNG"), max_pixels=10**8),
        "tiff_float": decode_cost(_encode("F", "TIFF"), max_pixels=10**8),
        "gif_palette": decode_cost(_encode("P", "GIF"), max_pixels=10**8),
    }
    ratios = {name: cost / rgb_png for name, cost in costs.items()}
    # bench/decode_cost.py measured (docs/benchmarks.md, "Decode cost"): 17, 16, 9, 17 and 5 bytes per pixel.
    assert ratios["webp_rgba"] >= 2.1 and ratios["tiff_float"] >= 2.1
    assert 1.9 <= ratios["webp_rgb"] <= 2.1 and 1.1 <= ratios["png_rgba"] <= 1.2
    assert 0.6 <= ratios["gif_palette"] <= 0.7
    # Refused input costs nothing (it is never decoded), as header_pixels says.
    assert decode_cost(b"not an image", max_pixels=10**8) == 0
    assert (
        decode_cost(_encode("RGB", "PNG"), max_pixels=1000)
        == 0
        == header_pixels(_encode("RGB", "PNG"), max_pixels=1000)
    )


def test_the_service_admits_a_webp_with_alpha_at_its_real_cost(tmp_path, database_url, offline_embedder):
    settings = make_settings(tmp_path / "data", database_url)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        service = client.app.state.service
        webp = _encode("RGBA", "WEBP", lossless=True)
        png = _encode("RGB", "PNG")
        assert service._pixels(png) == 400 * 400
        assert service._pixels(webp) >= 2.1 * 400 * 400


def _image(datasets: Path, n: int = 0) -> tuple[str, bytes]:
    path = sorted((datasets / HOPPER).iterdir())[n]
    return path.name, path.read_bytes()


def test_thumbnails_of_stored_images_are_decoded_once(client, datasets, monkeypatch):
    service = client.app.state.service
    image_id = client.post("/index_image", files={"file": _image(datasets)}).json()["id"]
    decodes = []
    original = service._thumbnail
    monkeypatch.setattr(service, "_thumbnail", lambda data, size: decodes.append(size) or original(data, size))
    first = client.get(f"/image/{image_id}/thumbnail?size=64")
    again = client.get(f"/image/{image_id}/thumbnail?size=64")
    other = client.get(f"/image/{image_id}/thumbnail?size=128")
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.content == again.content and decodes == [64, 128]  # the repeat came from the cache
    assert service.thumbnails.hits == 1 and service.thumbnails.bytes_held == len(first.content) + len(other.content)
    # A deleted image's thumbnail is gone at once, cached or not.
    assert client.delete(f"/image/{image_id}").status_code == 200
    assert client.get(f"/image/{image_id}/thumbnail?size=64").status_code == 404
    assert service.thumbnails.bytes_held == 0


def test_the_thumbnail_cache_can_be_disabled(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, thumbnail_cache_mb=0)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        image_id = client.post("/index_image", files={"file": _image(datasets)}).json()["id"]
        for _ in range(2):
            assert client.get(f"/image/{image_id}/thumbnail?size=64").status_code == 200
        assert client.app.state.service.thumbnails.bytes_held == 0


def test_rate_limit_on_expensive_routes(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, rate_limit="3/minute", api_key=KEY)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        image_id = client.post("/index_image", files={"file": _image(datasets)}, headers={"X-API-Key": KEY}).json()[
            "id"
        ]
        calls = [
            lambda: client.post("/search_text", json={"query": "x"}),  # 400 without CLIP: still counted (it ran)
            lambda: client.get(f"/image/{image_id}/thumbnail?size=64"),
            lambda: client.post("/search_image", files={"file": _image(datasets)}),
        ]
        assert [call().status_code for call in calls] == [400, 200, 200]
        r = client.get(f"/image/{image_id}/similar")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "RATE_LIMIT" in r.json()["detail"]
        # Cheap routes are not counted, and a valid key is exempt.
        assert client.get("/stats").status_code == 200 and client.get(f"/image/{image_id}").status_code == 200
        r = client.get(f"/image/{image_id}/similar", headers={"X-API-Key": KEY})
        assert r.status_code == 200
        r = client.get(f"/image/{image_id}/similar", headers={"X-API-Key": "wrong"})
        assert r.status_code == 429


def test_rate_limit_must_parse(tmp_path):
    with pytest.raises(ValidationError, match="RATE_LIMIT"):
        make_settings(tmp_path, None, rate_limit="lots")
    assert make_settings(tmp_path, None, rate_limit=" 10/second;600/hour ").rate_limit == "10/second;600/hour"


def test_an_image_whose_decode_alone_exceeds_max_decode_mb_is_refused(tmp_path, database_url, offline_embedder):
    # 400 x 400 WebP with alpha: about 2.7 MB to decode (17 bytes per pixel); a 300 x 300 RGB PNG: 0.72 MB.
    settings = make_settings(tmp_path / "data", database_url, max_decode_mb=1)
    webp = _encode("RGBA", "WEBP", lossless=True)
    png = _encode("RGB", "PNG", side=300)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        for path in ("/index_image", "/search_image", "/preview"):
            r = client.post(path, files={"file": ("big.webp", webp)})
            assert r.status_code == 413, (path, r.text)
            assert "MAX_DECODE_MB" in r.json()["detail"]
        r = client.post("/index_images", files=[("files", ("big.webp", webp)), ("files", ("ok.png", png))])
        assert [i["status"] for i in r.json()["results"]] == ["error", "indexed"]
        assert client.get("/stats").json()["count"] == 1  # nothing of the refused file stored
