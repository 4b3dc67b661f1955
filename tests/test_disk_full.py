"""Disk full (issue #8, item 5), on a real small tmpfs IMAGE_DIR: a write that does not fit answers 507 and stores
nothing; below MIN_FREE_MB, /health says storage: low and writes answer 507 before they start. Skipped, with the
reason, where this process may not mount a tmpfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.locks import LOCK_DIR_NAME
from app.main import create_app
from tests.helpers import make_settings

pytestmark = pytest.mark.slow

SIZE_MB = 20
BIG = "formats/jpeg_exif_orientation/Landscape_1.jpg"  # a few hundred KB
SMALL = "formats/jpeg_exif_orientation/Landscape_4.jpg"


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 20 MB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "images"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on ``disk``."""
    import shutil

    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - leave_bytes
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, size))
    return filler


def _stored(disk: Path) -> list[Path]:
    return [p for p in disk.rglob("*") if p.is_file() and p.name != "filler" and LOCK_DIR_NAME not in p.parts]


def test_a_write_that_does_not_fit_is_507_and_stores_nothing(
    small_disk, tmp_path, database_url, offline_embedder, datasets
):
    settings = make_settings(tmp_path / "data", database_url, image_dir=small_disk, min_free_mb=0)
    big, small = (datasets / BIG).read_bytes(), (datasets / SMALL).read_bytes()
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        filler = _fill(small_disk, leave_bytes=len(big) // 2)
        r = client.post("/index_image", files={"file": ("big.jpg", big)})
        assert r.status_code == 507, r.text
        assert "full" in r.json()["detail"] and "nothing was stored" in r.json()["detail"]
        assert client.get("/stats").json()["count"] == 0 and _stored(small_disk) == []

        # A batch whose second file does not fit stores neither (all or nothing).
        filler.unlink()
        filler = _fill(small_disk, leave_bytes=len(small) + len(big) // 2)
        r = client.post("/index_images", files=[("files", ("s.jpg", small)), ("files", ("b.jpg", big))])
        assert r.status_code == 507, r.text
        assert client.get("/stats").json()["count"] == 0 and _stored(small_disk) == []

        filler.unlink()
        assert client.post("/index_image", files={"file": ("big.jpg", big)}).status_code == 201
        assert client.get("/stats").json()["count"] == 1


def test_under_min_free_mb_health_says_low_and_writes_are_refused(
    small_disk, tmp_path, database_url, offline_embedder, datasets
):
    settings = make_settings(tmp_path / "data", database_url, image_dir=small_disk, min_free_mb=SIZE_MB - 5)
    data = (datasets / SMALL).read_bytes()
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        assert client.get("/health").json()["storage"] == "ok"
        filler = _fill(small_disk, leave_bytes=(SIZE_MB - 6) * 1_000_000)
        health = client.get("/health")
        assert health.status_code == 200, health.text
        body = health.json()
        assert (body["status"], body["database"], body["storage"]) == ("degraded", "ok", "low")
        assert "MIN_FREE_MB" in body["problems"][0]
        r = client.post("/index_image", files={"file": ("a.jpg", data)})
        assert r.status_code == 507 and "MIN_FREE_MB" in r.json()["detail"]
        r = client.post("/index_images", files=[("files", ("a.jpg", data))])
        assert r.status_code == 507
        assert _stored(small_disk) == [] and client.get("/stats").json()["count"] == 0
        # Reads still work.
        assert client.post("/search_image", files={"file": ("a.jpg", data)}).status_code == 200

        filler.unlink()
        assert client.get("/health").json()["storage"] == "ok"
        assert client.post("/index_image", files={"file": ("a.jpg", data)}).status_code == 201


def test_bulk_index_direct_refuses_at_once_without_a_traceback(tmp_path, database_url, datasets):
    # No tmpfs needed: MIN_FREE_MB above any real disk's free space. The refusal comes before the model loads.
    from tests.test_cli import run_cli

    folder = datasets / "formats/jpeg_exif_orientation"
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "EMBEDDER": "efficientnet",
        "MIN_FREE_MB": str(10**12),
    }
    proc = run_cli("bulk_index.py", folder, "--direct", "--no-progress", env=env, check_rc=2)
    assert "MIN_FREE_MB" in proc.stderr and "run the same command again" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.is_file() for p in (tmp_path / "data").rglob("*.jpg"))
