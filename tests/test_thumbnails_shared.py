"""Thumbnails with the originals in object storage (moto's standalone S3 server) and several replicas: the shared
layer in a real redis-server (app/cache/thumbnails.py) -- replica A builds, replica B hits, garbage under a key is
rebuilt, Redis killed still answers 200, a deleted image is 404 though Redis still holds its thumbnail; and
``GET /image/{id}`` of a >= 50 MB TIFF streamed from the bucket without holding it in memory; and the web UI's
"Download original" written to disk once from an object store."""

from __future__ import annotations

import gc
import io
import threading
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from app.cache.thumbnails import MAGIC, ThumbnailRedisLayer, decode_thumbnail, encode_thumbnail
from app.ids import image_id_for
from app.main import create_app
from tests.helpers import FORMATS, INSTANCE, LIVE_REDIS_TIMEOUT_MS, RedisServer, run_live_server, s3_settings

HEIC = FORMATS / "heic" / "iphone_13_pro_max.HEIC"  # a real 12 MP HEIC: about 240 ms to rebuild its thumbnail
PHOTO = INSTANCE / "pdq_desk_exif" / "exif-rotn-1.jpg"  # a real 12 MP JPEG


def test_thumbnail_values_round_trip_and_foreign_data_is_refused():
    jpeg = (FORMATS / "jpeg" / "icc-profile.jpeg").read_bytes()
    assert decode_thumbnail(encode_thumbnail(jpeg)) == jpeg
    raw = encode_thumbnail(jpeg)
    for foreign in (
        b"",
        b"garbage",
        jpeg,  # a JPEG without our header
        raw[:-1],  # truncated
        raw + b"\x00",  # longer than its length says
        b"ISE\x01" + raw[4:],  # the embedding layer's magic
        MAGIC + raw[4:8] + b"\x00" * (len(raw) - 8),  # right length, not a JPEG
        None,
        12,
    ):
        assert decode_thumbnail(foreign) is None
    layer = ThumbnailRedisLayer(
        "redis://127.0.0.1:1/0", "imgsearch", ttl_s=60, timeout_s=0.05, failure_threshold=3, retry_s=0.2
    )
    assert layer.key("ab" * 32, 256) == f"imgsearch:thumb:v1:256:{'ab' * 32}"
    layer.close()


def _replica(tmp_path: Path, name: str, database_url: str, moto, bucket: str, embedder, **overrides) -> TestClient:
    # Each replica has its own DATA_DIR (its own machine); they share the bucket, the database and Redis.
    settings = s3_settings(tmp_path / name, database_url, moto, bucket, cache_retry_s=0.3, **overrides)
    return TestClient(create_app(settings, embedder=embedder))


def _count_decodes(client: TestClient) -> list[int]:
    """Sizes of the thumbnails this replica decoded (a spy around the real decode, which still runs)."""
    service = client.app.state.service
    decodes: list[int] = []
    real = service._thumbnail
    service._thumbnail = lambda data, size: decodes.append(size) or real(data, size)
    return decodes


def test_replica_a_builds_replica_b_hits_and_a_dead_redis_still_answers(
    tmp_path, database_url, moto_s3, offline_embedder
):
    bucket = moto_s3.create_bucket()
    with RedisServer(tmp_path / "redis") as redis_server:
        options = dict(cache_redis_url=redis_server.url, cache_redis_timeout_ms=LIVE_REDIS_TIMEOUT_MS)
        with (
            _replica(tmp_path, "a", database_url, moto_s3, bucket, offline_embedder, **options) as a,
            _replica(tmp_path, "b", database_url, moto_s3, bucket, offline_embedder, **options) as b,
        ):
            data = HEIC.read_bytes()
            image_id = a.post("/index_image", files={"file": (HEIC.name, data)}).json()["id"]
            decodes_a, decodes_b = _count_decodes(a), _count_decodes(b)

            built = a.get(f"/image/{image_id}/thumbnail?size=256")
            assert built.status_code == 200 and built.headers["content-type"] == "image/jpeg"
            hit = b.get(f"/image/{image_id}/thumbnail?size=256")
            assert hit.status_code == 200 and hit.content == built.content
            assert decodes_a == [256] and decodes_b == []  # built once for both replicas
            assert b.app.state.service.shared_thumbnails.stats().hits == 1
            # ... as /stats and /metrics tell (B: one miss in memory, one hit in Redis)
            shown = b.get("/stats").json()["thumbnail_cache"]
            assert (shown["misses"], shown["hits"], shown["redis"]["hits"]) == (1, 0, 1) and shown["bytes"] > 0
            metrics = b.get("/metrics").text
            assert 'image_search_thumbnail_cache_hits_total{layer="redis"} 1.0' in metrics
            assert 'image_search_thumbnail_cache_misses_total{layer="memory"} 1.0' in metrics
            assert b.app.state.service.thumbnails.get(image_id, 256) == built.content  # and now in B's memory
            with Image.open(io.BytesIO(hit.content)) as im:
                assert max(im.size) == 256 and im.size[0] < im.size[1]  # portrait, as the phone held it
            key = f"imgsearch:thumb:v1:256:{image_id}"
            store = redis_server.client()
            assert decode_thumbnail(store.get(key)) == built.content
            assert 0 < store.ttl(key) <= 604800

            # Foreign data under a key: a miss, rebuilt, overwritten with a valid value.
            other = f"imgsearch:thumb:v1:128:{image_id}"
            store.set(other, b"not a thumbnail")
            assert b.get(f"/image/{image_id}/thumbnail?size=128").status_code == 200
            assert decodes_b == [128] and decode_thumbnail(store.get(other)) is not None
            assert b.app.state.service.shared_thumbnails.stats().invalid == 1
            store.close()

            # Redis killed: still 200, rebuilt from the original, never an error; then the breaker skips Redis.
            redis_server.kill()
            for size in (64, 96, 112, 120):
                started = time.monotonic()
                assert a.get(f"/image/{image_id}/thumbnail?size={size}").status_code == 200
                assert time.monotonic() - started < 5
            assert decodes_a == [256, 64, 96, 112, 120]
            assert a.app.state.service.shared_thumbnails.problem is not None
            assert b.get(f"/image/{image_id}/thumbnail?size=256").status_code == 200  # B's memory still has it

            # Redis back (empty): the layer reconnects by itself and fills again.
            redis_server.start()
            deadline = time.monotonic() + 10
            while a.app.state.service.shared_thumbnails.problem is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert a.get(f"/image/{image_id}/thumbnail?size=80").status_code == 200
            assert decode_thumbnail(redis_server.client().get(f"imgsearch:thumb:v1:80:{image_id}")) is not None

            # Deleted through A: B answers 404 although Redis (and B's memory) still hold the thumbnail.
            assert a.delete(f"/image/{image_id}").status_code == 200
            assert redis_server.client().exists(f"imgsearch:thumb:v1:80:{image_id}")
            assert b.get(f"/image/{image_id}/thumbnail?size=80").status_code == 404
            assert b.get(f"/image/{image_id}/thumbnail?size=256").status_code == 404


def test_thumbnails_stay_out_of_redis_when_their_ttl_is_zero(tmp_path, database_url, moto_s3, offline_embedder):
    bucket = moto_s3.create_bucket()
    with RedisServer(tmp_path / "redis") as redis_server:
        options = dict(
            cache_redis_url=redis_server.url, thumbnail_redis_ttl_s=0, cache_redis_timeout_ms=LIVE_REDIS_TIMEOUT_MS
        )
        with _replica(tmp_path, "a", database_url, moto_s3, bucket, offline_embedder, **options) as a:
            assert a.app.state.service.shared_thumbnails is None
            image_id = a.post("/index_image", files={"file": (PHOTO.name, PHOTO.read_bytes())}).json()["id"]
            assert a.get(f"/image/{image_id}/thumbnail?size=64").status_code == 200
            assert redis_server.client().keys("imgsearch:thumb:*") == []


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_50_mb_tiff_is_streamed_from_the_bucket_not_held_in_memory(tmp_path, database_url, moto_s3, offline_embedder):
    """``GET /image/{id}`` through a real HTTP server: this process's RSS (server and client) grows by far less
    than the original while the whole of it goes through."""
    with Image.open(PHOTO) as im:
        photo = ImageOps.exif_transpose(im).convert("RGB")
    big = photo.resize((round(photo.width * 1.2), round(photo.height * 1.2)), Image.Resampling.BILINEAR)
    del photo
    out = io.BytesIO()
    big.save(out, format="TIFF")  # uncompressed: 17.6 MP x 3 bytes
    del big
    data = out.getvalue()
    del out
    size = len(data)
    assert size >= 50_000_000
    image_id = image_id_for(data)
    # A memory test, not a deadline test: moto (Python) on a busy CI box may take longer than the 1.5 s request
    # deadline to start sending 50 MB, which would answer 503 (tests/test_object_store.py tests the deadline).
    settings = s3_settings(tmp_path / "data", database_url, moto_s3, moto_s3.create_bucket(), s3_request_timeout_s=20.0)
    app = create_app(settings, embedder=offline_embedder)
    with run_live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        app.state.service.store.put(image_id, data, "tif")  # over MAX_UPLOAD_MB: put straight into the bucket
        del data
        assert client.get(f"/image/{image_id}", headers={"Range": "bytes=0-1023"}).status_code == 206  # warm up

        def peak_growth(read) -> int:  # noqa: ANN001 - a callable that reads the original
            """Peak RSS growth (bytes) of this process, sampled every 2 ms while ``read()`` runs. The C heap's free
            memory is handed back first (malloc_trim): memory earlier tests freed would otherwise be reused without
            showing in RSS (a whole read then grew RSS by only 32 of 52.7 MB in a full-suite run)."""
            from app.imaging.admission import release_memory

            gc.collect()
            release_memory()
            baseline = peak = _rss_bytes()
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, _rss_bytes())
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                read()
            finally:
                done.set()
                sampler.join()
            return peak - baseline

        received = 0

        def stream() -> None:
            nonlocal received
            with client.stream("GET", f"/image/{image_id}") as response:
                assert response.status_code == 200 and int(response.headers["content-length"]) == size
                assert response.headers["content-type"] == "image/tiff"
                for chunk in response.iter_raw():
                    received += len(chunk)

        def read_whole() -> None:
            assert image_id_for(client.get(f"/image/{image_id}").content) == image_id

        growth = peak_growth(stream)
        # The control: the same answer read whole by the client shows up in the same measure.
        held = peak_growth(read_whole)
    print(f"streamed {size / 1e6:.1f} MB: peak RSS growth {growth / 1e6:.1f} MB (read whole: {held / 1e6:.1f} MB)")
    assert received == size and held > size * 0.8
    assert growth < size / 4, f"RSS grew by {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB original"


def test_ui_download_of_an_s3_original_is_written_once(tmp_path, database_url, moto_s3, offline_embedder, monkeypatch):
    from ui.files import original_file

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    data = HEIC.read_bytes()
    settings = s3_settings(tmp_path / "data", database_url, moto_s3, moto_s3.create_bucket())
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        image_id = client.post("/index_image", files={"file": ("trips/IMG_0001.HEIC", data)}).json()["id"]
        service = client.app.state.service
        gets = []
        real_get = service.store.get
        service.store.get = lambda *a, **kw: gets.append(a) or real_get(*a, **kw)
        path = Path(original_file(service, image_id, "trips/IMG_0001.HEIC"))
        assert path.name == "IMG_0001.HEIC" and path.read_bytes() == data
        assert path.is_relative_to(tmp_path / "gradio")
        assert len(gets) == 1  # one GET from the bucket ...
        assert not (settings.data_dir / "cache" / "originals").exists()  # ... straight into the file, no 2nd copy
        assert [p.name for p in path.parent.iterdir()] == ["IMG_0001.HEIC"]  # no temporary file left
        assert original_file(service, image_id, "trips/IMG_0001.HEIC") == str(path) and len(gets) == 1
