"""The million-image ingest path: JPEG draft decoding, the dynamic batcher, ``POST /index_images`` and
``bulk_index.py --direct``, including a real ``kill -9`` in the middle of a run followed by a resume."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest

from app.batching import BatcherClosedError, DynamicBatcher
from app.imaging.decode import decode_image
from app.indexing.store import ImageStore
from tests.helpers import BULK_SUMMARY as SUMMARY
from tests.helpers import PROJECT_ROOT, run_live_server
from tests.helpers import symlink as _link

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

PORTRAIT = "instance_small/images/exif_portrait/Portrait_5.jpg"  # 1200x1800 after EXIF orientation
CORRUPT = "formats/broken/ukbench09268_corrupt.jpg"


# --- decoding ----------------------------------------------------------------------------------------------
def test_draft_decoding_keeps_the_original_size_and_orientation(datasets):
    data = (datasets / PORTRAIT).read_bytes()
    full = decode_image(data, max_pixels=10**8)
    draft = decode_image(data, max_pixels=10**8, draft_size=260)
    assert (draft.width, draft.height) == (full.width, full.height)  # metadata: the original's size
    assert min(draft.image.size) >= 260 and draft.image.width * 4 == full.image.width  # decoded at 1/4 scale
    assert draft.image.height > draft.image.width  # EXIF orientation applied: still a portrait
    # Same picture: the full decode shrunk to the draft's size is close to it pixel for pixel.
    small = np.asarray(full.image.resize(draft.image.size), dtype=np.float32)
    assert np.abs(small - np.asarray(draft.image, dtype=np.float32)).mean() < 6


def test_draft_is_ignored_for_other_formats_and_small_jpegs(datasets):
    png = (datasets / "formats/png/bridge_L.png").read_bytes()
    a, b = decode_image(png, max_pixels=10**8, draft_size=16), decode_image(png, max_pixels=10**8)
    assert a.image.size == b.image.size
    small_jpeg = next((datasets / "caltech101_subset/images").rglob("*.jpg")).read_bytes()
    c = decode_image(small_jpeg, max_pixels=10**8, draft_size=260)
    assert c.image.size == (c.width, c.height)  # under 2x the draft size: decoded at full scale
    with pytest.raises(ValueError):
        decode_image(png, max_pixels=10**8, draft_size=0)


# --- dynamic batcher ---------------------------------------------------------------------------------------
def test_batcher_combines_concurrent_requests():
    calls: list[int] = []

    def embed(images):
        calls.append(len(images))
        time.sleep(0.02)
        return np.array([[float(im)] for im in images], dtype=np.float32)

    batcher = DynamicBatcher(embed, max_batch=8, max_wait_s=0.05)
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        results[i] = batcher.embed([i, i + 100])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert all(results[i].ravel().tolist() == [i, i + 100] for i in range(8))  # each caller gets its own rows
    assert sum(calls) == 16 and len(calls) < 8 and max(calls) <= 8  # combined, never over max_batch
    with pytest.raises(BatcherClosedError):
        batcher.submit([1])


def test_batcher_passes_model_errors_to_every_caller():
    def embed(images):
        raise RuntimeError("model broke")

    batcher = DynamicBatcher(embed, max_batch=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="model broke"):
        batcher.embed([1])
    batcher.close()
    batcher.close()  # idempotent


# --- POST /index_images ------------------------------------------------------------------------------------
def test_index_images_per_file_results(client, datasets, settings):
    caltech = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:3]
    files = [("files", (p.name, p.read_bytes())) for p in caltech]
    files.append(("files", ("bad.jpg", (datasets / CORRUPT).read_bytes())))
    files.append(("files", ("notes.png", b"not an image at all")))
    files.append(("files", ("again.jpg", caltech[0].read_bytes())))  # duplicate inside the batch
    names = ["a/1.jpg", "a/2.jpg", "b/3.jpg", "bad.jpg", "notes.png", "again.jpg"]
    r = client.post("/index_images", files=files, data={"filenames": names})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == names
    assert [x["status"] for x in results] == ["indexed"] * 3 + ["error", "error", "exists"]
    assert results[3]["code"] in (415, 422) and results[4]["code"] == 415  # the decoder decides for the first
    assert all(x["detail"] for x in results[3:5]) and results[0]["detail"] is None
    assert results[0]["id"] == hashlib.sha256(caltech[0].read_bytes()).hexdigest() == results[5]["id"]
    assert client.get("/stats").json()["count"] == 3
    store = ImageStore(settings.resolved_image_dir)
    assert all(store.find(x["id"]) for x in results[:3]) and not store.find(results[3]["id"])
    # Same search result as a one-by-one upload would give: the stored name is the one given.
    form = {"top_k": "1", "exclude_self": "false"}
    hit = client.post("/search_image", files={"file": caltech[1].read_bytes()}, data=form).json()
    assert hit["results"][0]["filename"] == "a/2.jpg"

    # Again: everything known is "exists"; the limits answer 413 / 422 for the whole request.
    again = client.post("/index_images", files=files[:3]).json()["results"]
    assert [x["status"] for x in again] == ["exists"] * 3
    too_many = [("files", (f"{i}.jpg", b"x")) for i in range(settings.max_batch_files + 1)]
    r = client.post("/index_images", files=too_many)
    assert r.status_code == 413 and "MAX_BATCH_FILES" in r.json()["detail"]
    r = client.post("/index_images", files=files[:2], data={"filenames": ["only-one"]})
    assert r.status_code == 422


# --- bulk_index.py --direct and kill -9 ------------------------------------------------------------------
def _count_rows(database_url: str) -> int:
    try:
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


def _stored_ids(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM images")}


@pytest.fixture
def caltech_folder(tmp_path, datasets) -> tuple[Path, set[str]]:
    """A folder of symlinks to 200 real Caltech-101 JPEGs over all categories; returns it and their SHA-256s."""
    files = sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))
    picks = files[:: max(1, len(files) // 200)][:200]
    folder = tmp_path / "caltech"
    for src in picks:
        _link(src, folder / src.parent.name / src.name)
    return folder, {hashlib.sha256(p.read_bytes()).hexdigest() for p in picks}


def _env(data_dir: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_SEARCH_API",)}
    env.update(
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        EMBEDDER="efficientnet",
        CPU_ENCODER="torch",  # no per-test model export; the ingest path is what is tested here
        VECTOR_DB="pgvector",
    )
    return env


def _kill_when_partly_written(proc: subprocess.Popen, database_url: str, total: int) -> int:
    """SIGKILL ``proc`` once some but not all rows are written; returns the row count seen just after."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be killed: {proc.communicate()}")
        if _count_rows(database_url) >= 20:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("nothing was written in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    written = _count_rows(database_url)
    assert 0 < written < total, written
    return written


def _check_exactly_once(database_url: str, image_dir: Path, expected: set[str]) -> None:
    ids = _stored_ids(database_url)
    assert ids == expected and _count_rows(database_url) == len(expected)
    store = ImageStore(image_dir)
    assert all(store.find(i) is not None for i in ids)  # every row has its original
    stored_files = [p for p in image_dir.rglob("*") if p.is_file() and not any(q.startswith(".") for q in p.parts)]
    assert sorted(p.stem for p in stored_files) == sorted(ids)  # and no original without its row


def test_direct_mode_survives_kill_9(caltech_folder, database_url, tmp_path):
    folder, expected = caltech_folder
    data_dir = tmp_path / "data"
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts/bulk_index.py"), str(folder), "--direct", "--no-progress"]
    cmd += ["--workers", "2", "--batch-size", "16"]
    env = _env(data_dir, database_url)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = _kill_when_partly_written(proc, database_url, len(expected))

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr)
    scanned, already, indexed, failed = map(int, SUMMARY.search(done.stdout).groups()[:4])
    assert (scanned, failed) == (200, 0) and already >= written and indexed == len(expected) - already
    _check_exactly_once(database_url, data_dir / "images", expected)

    # A third run writes nothing.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert re.search(r"0 indexed, 0 failed", again.stdout), again.stdout


def test_api_mode_survives_kill_9_of_the_client(caltech_folder, settings, offline_embedder, database_url, tmp_path):
    from app.main import create_app

    folder, expected = caltech_folder
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts/bulk_index.py"), str(folder), "--no-progress"]
    cmd += ["--batch-size", "8", "--concurrency", "2"]
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        cmd += ["--api", url]
        env = {k: v for k, v in os.environ.items() if k != "IMAGE_SEARCH_API"}
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _kill_when_partly_written(proc, database_url, len(expected))
        time.sleep(1.0)  # requests the server had already received finish on their own
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout, done.stderr)
        _check_exactly_once(database_url, settings.resolved_image_dir, expected)


def test_fitting_in_the_worker_gives_the_embedders_own_pixels(datasets, offline_embedder):
    import torch
    from torchvision import transforms

    from app.imaging.prepare import fit_to_model

    size = offline_embedder.input_size
    reference = transforms.Compose(
        [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
    )
    paths = [datasets / PORTRAIT, *sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:40:8]]
    images = [decode_image(p.read_bytes(), max_pixels=10**8, draft_size=size).image for p in paths]
    for image in images:  # tall, wide, smaller than the input (upscaled)
        assert np.array_equal(np.asarray(fit_to_model(image, size)), np.asarray(reference(image)))
    fitted = offline_embedder.embed_images([fit_to_model(im, size) for im in images])
    assert torch.allclose(torch.from_numpy(fitted), torch.from_numpy(offline_embedder.embed_images(images)))
