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
    # bench/decode_cost.py measured (docs/benchmarks.md, "Decode cost"): 17, 16, 9, 17 and 5 bytes per pixel, and
    # 4 for an RGB photo (its raster, no copy).
    assert ratios["webp_rgba"] >= 4.2 and ratios["tiff_float"] >= 4.2
    assert 3.9 <= ratios["webp_rgb"] <= 4.1 and 2.2 <= ratios["png_rgba"] <= 2.3
    assert 1.2 <= ratios["gif_palette"] <= 1.3
    # Refused input costs nothing (it is never decoded), as header_pixels says.
    assert decode_cost(b"not an image", max_pixels=10**8) == 0
    assert (
        decode_cost(_encode("RGB", "PNG"), max_pixels=1000)
        == 0
        == header_pixels(_encode("RGB", "PNG"), max_pixels=1000)
    )


def _progressive_jpeg(side: int, **options) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(2)
    arr = np.repeat(np.repeat(rng.integers(0, 256, size=(side // 50, side // 50, 3), dtype=np.uint8), 50, 0), 50, 1)
    Image.fromarray(arr).save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


def test_a_progressive_jpeg_is_charged_its_whole_image_coefficients_at_any_draft_scale():
    # libjpeg keeps every DCT coefficient of a progressive file while it decodes it: 2 bytes x 64 per 8x8 block of
    # each component, however small the draft (issue #27: a 100 MP one took 307 MB where 12 MB was charged).
    side = 4000
    sequential = _progressive_jpeg(side, subsampling=0)
    progressive = _progressive_jpeg(side, subsampling=0, progressive=True)
    subsampled = _progressive_jpeg(side, subsampling=2, progressive=True)  # 4:2:0: chroma at a quarter
    drafted = header_pixels(progressive, max_pixels=10**8, draft_size=260) * RGB_DECODE_BYTES_PER_PIXEL
    assert decode_cost(sequential, max_pixels=10**8, draft_size=260) == drafted
    assert decode_cost(progressive, max_pixels=10**8, draft_size=260) == drafted + 3 * side * side * 2
    assert decode_cost(subsampled, max_pixels=10**8, draft_size=260) == drafted + 1.5 * side * side * 2
    # A truncated file allocates as much as the whole: the header alone decides.
    assert decode_cost(progressive[:2000], max_pixels=10**8, draft_size=260) == decode_cost(
        progressive, max_pixels=10**8, draft_size=260
    )
    # And the charge is what the decode really takes: the peak RSS growth of decoding it (80-125 %).
    peak = _peak_rss_growth_of_decode(progressive, draft_size=260)
    assert 0.8 * peak <= decode_cost(progressive, max_pixels=10**8, draft_size=260) <= 1.25 * peak + 8e6, peak


def _peak_rss_growth_of_decode(data: bytes, draft_size: int) -> int:
    """Peak RSS growth (bytes) of decoding ``data`` in a fresh Python process (this one's heap is warm)."""
    import subprocess
    import sys

    code = (
        "import sys, threading, time\n"
        "from app.imaging.decode import decode_image\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "data = sys.stdin.buffer.read()\n"
        "peak = [rss()]; before = peak[0]; done = threading.Event()\n"
        "def sample():\n"
        "    while not done.is_set():\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.001)\n"
        "t = threading.Thread(target=sample); t.start()\n"
        f"decode_image(data, max_pixels=10**8, draft_size={draft_size})\n"
        "done.set(); t.join(); print(peak[0] - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, check=True, cwd=Path(__file__).parents[1]
    )
    return int(out.stdout.split()[-1])


def test_the_service_admits_a_webp_with_alpha_at_its_real_cost(tmp_path, database_url, offline_embedder):
    settings = make_settings(tmp_path / "data", database_url)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        service = client.app.state.service
        webp = _encode("RGBA", "WEBP", lossless=True)
        png = _encode("RGB", "PNG")
        assert service._pixels(png) == 400 * 400
        assert service._pixels(webp) >= 4.2 * 400 * 400


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


def test_a_truncated_image_lets_go_of_its_raster_before_the_error_leaves_the_decoder():
    # Pillow allocates the whole raster for what the header claims, then fails part-way; the error's traceback held
    # the raster (Pillow's frames keep the decoder and the image file) until the garbage collector found it: after
    # the request's admission had ended and its heap trim had run (issue #27: 400 MB stayed after a burst).
    from app.errors import CorruptImageError
    from app.imaging.decode import decode_image

    out = io.BytesIO()
    Image.new("RGB", (4000, 4000), (30, 90, 160)).save(out, format="PNG")
    data = out.getvalue()
    truncated = data[: len(data) // 2]

    def live_blocks() -> int:
        stats = Image.core.get_stats()
        return stats["allocated_blocks"] - stats["freed_blocks"]

    with pytest.raises(CorruptImageError):
        decode_image(truncated, max_pixels=10**8)  # once first: Pillow keeps a small image of its own after it
    before = live_blocks()
    with pytest.raises(CorruptImageError) as failed:
        decode_image(truncated, max_pixels=10**8)
    assert failed.value.__cause__ is not None  # the cause is kept for the logs...
    assert live_blocks() == before  # ...without the 64 MB raster (4 blocks of 16 MB) it had allocated
