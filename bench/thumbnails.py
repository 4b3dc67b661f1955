#!/usr/bin/env python
"""Thumbnails with the originals in object storage: rebuild each time, or fetch from a shared layer? ONE JSON line.

    flock /tmp/bench.lock .venv/bin/python bench/thumbnails.py [--reps 7] [--sizes 256,384]

Starts moto's standalone S3 server and a ``redis-server`` as their own processes on free loopback ports (as the
tests do, tests/helpers.py), stores every original in a fresh bucket through the service's own
:class:`app.storage.s3.S3ImageStore`, then measures, per original and thumbnail size (pixels, longest side):

- ``rebuild_p50_ms`` / ``rebuild_p95_ms``: what ``SearchService.thumbnail`` does on a miss: ``GET`` of the whole
  original from the bucket (``get_p50_ms``, ``bytes_read``) + header cost check + decode + resize + JPEG encode
  (``render_p50_ms``: :func:`app.imaging.thumbnails.render_thumbnail`, the service's own code);
- ``thumb_bytes``: the JPEG's size;
- ``redis_get_p50_ms`` (top level): ``GET`` of an encoded thumbnail from Redis with redis-py, over every thumbnail;
- ``s3_head_p50_ms``: the existence check (one ``HEAD``) the service makes before answering from any cache.

Originals (``--datasets``, read in place): real 12-16 MP JPEGs (one progressive) and HEICs, the largest real PNG
and WebP (1.6 MP), a real small TIFF, and -- no real large TIFF/PNG/WebP being in the sets -- the real 12 MP JPEG
re-encoded in a temporary folder as an uncompressed TIFF (36 MB), a PNG and a WebP, plus that photo upscaled to a
>= 50 MB uncompressed TIFF ("the 50 MB TIFF" of issue #21).

``two_replicas``: the arithmetic for 2 replicas behind a round-robin load balancer, with each replica's own memory
cache (THUMBNAIL_CACHE_MB) every thumbnail is eventually rebuilt on both (2 x N rebuilds and 2 x N whole-original
GETs) instead of once; the extra work per 1,000 thumbnails of each format is 1,000 x ``rebuild_p50_ms`` (CPU
seconds, one core) and 1,000 x ``bytes_read``, against 1,000 x ``redis_get_p50_ms`` for a shared layer's hits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (label, path relative to --datasets): real files, read in place
REAL = [
    ("jpeg_12mp", "instance_small/images/pdq_desk_exif/exif-rotn-1.jpg"),
    (
        "jpeg_16mp_progressive",
        "instance_small/images/single_seeding_by_Clements_Engelhardt/lomiri_seeding_by_Clements_Engelhardt.jpg",
    ),
    ("heic_12mp", "formats/heic/iphone_13_pro_max.HEIC"),
    ("heic_16mp", "formats/heic/HMD_Nokia_8.3_5G.heif"),
    ("heic_1.4mp", "formats/heic/nokia_autumn_1440x960.heic"),
    ("png_1.6mp", "formats/png/bridge_rgba.png"),
    ("webp_1.6mp", "formats/webp/bridge_F.webp"),
    ("tiff_0.02mp", "formats/tiff/hopper_lzw.tif"),
]
#: the real photo the derived originals are made from
SOURCE = "instance_small/images/pdq_desk_exif/exif-rotn-1.jpg"


def _derived(datasets: Path, folder: Path) -> list[tuple[str, Path]]:
    """Large TIFF / PNG / WebP originals re-encoded from the real 12 MP JPEG (there are no real ones in the sets)."""
    from PIL import Image, ImageOps

    photo = ImageOps.exif_transpose(Image.open(datasets / SOURCE)).convert("RGB")
    out = []
    for label, name, kwargs in [
        ("tiff_12mp_raw", "photo.tif", {"format": "TIFF"}),
        ("png_12mp", "photo.png", {"format": "PNG"}),
        ("webp_12mp", "photo.webp", {"format": "WEBP", "quality": 90}),
    ]:
        path = folder / name
        photo.save(path, **kwargs)
        out.append((label, path))
    # >= 50 MB uncompressed: 17.6 MP x 3 bytes
    big = photo.resize((round(photo.width * 1.2), round(photo.height * 1.2)), Image.Resampling.BILINEAR)
    path = folder / "big.tif"
    big.save(path, format="TIFF")
    out.append((f"tiff_{big.width * big.height / 1e6:.1f}mp_raw", path))
    return out


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--reps", type=int, default=7, help="rebuilds per original and size (first one not timed)")
    parser.add_argument("--sizes", default="256,384", help="thumbnail sizes, pixels (API default 256, UI 384)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import redis

    from app.config import Settings
    from app.ids import image_id_for
    from app.imaging.decode import decode_cost
    from app.imaging.thumbnails import render_thumbnail
    from app.storage import from_settings
    from tests.helpers import MotoS3, RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-thumbs-"))
    moto = MotoS3().start()
    redis_server = RedisServer(tmp / "redis").start()
    try:
        settings = Settings(
            _env_file=None,
            data_dir=tmp / "data",
            image_store_url=f"s3://{moto.create_bucket()}/originals",
            aws_endpoint_url=moto.endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        store = from_settings(settings)
        client = redis.Redis(port=redis_server.port, socket_timeout=1)
        files = [(label, args.datasets / rel) for label, rel in REAL] + _derived(args.datasets, tmp)
        results: dict[str, dict] = {}
        redis_gets: list[float] = []
        heads: list[float] = []
        for label, path in files:
            data = path.read_bytes()
            image_id = image_id_for(data)
            store.put(image_id, data, path.suffix.lower().lstrip("."))
            del data
            from PIL import Image

            with Image.open(path) as im:
                fmt, pixels = im.format, im.width * im.height
            entry: dict = {"format": fmt, "megapixels": round(pixels / 1e6, 2), "bytes_read": path.stat().st_size}
            for size in sizes:
                totals, gets, renders = [], [], []
                for rep in range(args.reps + 1):
                    t0 = time.perf_counter()
                    original = store.read(image_id)
                    t1 = time.perf_counter()
                    decode_cost(original, max_pixels=settings.max_image_pixels, draft_size=size)
                    jpeg = render_thumbnail(original, size, max_pixels=settings.max_image_pixels)
                    t2 = time.perf_counter()
                    del original
                    if rep:  # the first one warms the decoder and the connection
                        totals.append(t2 - t0)
                        gets.append(t1 - t0)
                        renders.append(t2 - t1)
                key = f"bench:thumb:{image_id}:{size}"
                client.set(key, jpeg)
                for _ in range(50):
                    t0 = time.perf_counter()
                    assert client.get(key) == jpeg
                    redis_gets.append(time.perf_counter() - t0)
                entry[str(size)] = {
                    "rebuild_p50_ms": _ms(totals, 0.5),
                    "rebuild_p95_ms": _ms(totals, 0.95),
                    "get_p50_ms": _ms(gets, 0.5),
                    "render_p50_ms": _ms(renders, 0.5),
                    "thumb_bytes": len(jpeg),
                }
            for _ in range(20):
                t0 = time.perf_counter()
                assert store.head(image_id) is not None
                heads.append(time.perf_counter() - t0)
            results[label] = entry
            print(f"{label}: {json.dumps(entry)}", file=sys.stderr, flush=True)
        redis_p50 = _ms(redis_gets, 0.5)
        size = str(sizes[-1])
        two = {
            "size": int(size),
            "note": "per 1,000 distinct thumbnails: per-replica caches rebuild each on both replicas (2,000 "
            "rebuilds), a shared layer once (1,000 rebuilds + 1,000 Redis GETs); extra = 1,000 x rebuild",
            "extra_rebuild_s_per_1000": {k: round(v[size]["rebuild_p50_ms"], 1) for k, v in results.items()},
            "extra_mb_read_per_1000": {k: round(v["bytes_read"] / 1000, 1) for k, v in results.items()},
            "shared_hits_s_per_1000": round(redis_p50, 2),
        }
        store.close()
        client.close()
        print(
            json.dumps(
                {
                    "bench": "thumbnails",
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                    "store": "moto_server (same machine)",
                    "reps": args.reps,
                    "sizes": sizes,
                    "redis_get_p50_ms": redis_p50,
                    "redis_get_p95_ms": _ms(redis_gets, 0.95),
                    "s3_head_p50_ms": _ms(heads, 0.5),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "formats": results,
                    "two_replicas": two,
                }
            )
        )
    finally:
        redis_server.stop()
        moto.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
