"""Moving a collection's originals between the file store and a bucket (``scripts/move_originals.py``, issue #21):
every original copied once, read back and checked by SHA-256 before the source's is removed; a real ``kill -9``
of the tool in the middle and a re-run finish it with nothing copied twice; the service then serves the
collection from the new store (``IMAGE_STORE_URL``) and ``fsck`` finds both agree. Real images, moto's
standalone S3 server (its own process), the embedded PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.ids import image_id_for
from app.indexing.fsck import check
from app.service import SearchService
from app.storage import from_settings
from app.storage.local import TEMP_PREFIX, LocalImageStore
from app.storage.move import move_originals
from tests.helpers import INSTANCE, PROJECT_ROOT, S3_TEST_ENV, make_settings, s3_settings

SMALL = sorted(p for p in INSTANCE.rglob("*.jpg") if p.stat().st_size < 60_000)


def _bucket_store(tmp_path: Path, moto_s3, bucket: str):
    return from_settings(s3_settings(tmp_path / "s3data", None, moto_s3, bucket))


def test_disk_to_bucket_and_back_verified_and_resumable(tmp_path, moto_s3):
    disk = LocalImageStore(tmp_path / "disk")
    datas = {image_id_for(d): d for d in (p.read_bytes() for p in SMALL[:8])}
    for image_id, data in datas.items():
        disk.put(image_id, data, "jpg")
    # An original whose bytes are not what its name says (bit rot), and a temporary file of a killed upload.
    rotten_id = image_id_for(b"the real bytes")
    rotten = disk.root / rotten_id[:2] / rotten_id[2:4] / f"{rotten_id}.png"
    rotten.parent.mkdir(parents=True)
    rotten.write_bytes(b"other bytes")
    (rotten.parent / f"{TEMP_PREFIX}x").write_bytes(b"half")
    bucket = _bucket_store(tmp_path, moto_s3, moto_s3.create_bucket())
    try:
        first = move_originals(disk, bucket, workers=3)
        assert (first.copied, first.present, first.deleted) == (8, 0, 0)
        assert first.bytes_copied == sum(map(len, datas.values()))
        assert [reason for _, reason in first.failures] == [
            "the source's bytes do not hash to their name (left where it is)"
        ]
        assert {e.image_id for e in bucket.walk()} == set(datas) and rotten.exists()
        assert all(bucket.read(i) == d for i, d in datas.items())
        assert bucket.head(next(iter(datas))).name.endswith(".jpg")

        again = move_originals(disk, bucket)  # a re-run copies nothing
        assert (again.copied, again.present, len(again.failures)) == (0, 8, 1)

        # A copy in the target that is not what its name says: found by --verify (and by --delete-source).
        bad = sorted(datas)[0]
        bucket.delete(bad)
        bucket.put(bad, b"not the original", "jpg")
        verified = move_originals(disk, bucket, verify=True)
        assert (verified.copied, verified.replaced, verified.present) == (0, 1, 7)
        assert bucket.read(bad) == datas[bad]

        moved = move_originals(disk, bucket, delete_source=True)
        assert (moved.present, moved.deleted, len(moved.failures)) == (8, 8, 1)
        assert [e.image_id for e in disk.walk() if e.image_id] == [rotten_id]  # only the rotten one stays

        back = LocalImageStore(tmp_path / "back")
        home = move_originals(bucket, back, delete_source=True, workers=2)
        assert (home.copied, home.deleted, home.failures) == (8, 8, [])
        assert list(bucket.walk()) == [] and all(back.read(i) == d for i, d in datas.items())
        with pytest.raises(ValueError, match="same store"):
            move_originals(back, LocalImageStore(tmp_path / "back"))
    finally:
        bucket.close()


def _cli_env(data_dir: Path, database_url: str, moto_s3) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "IMAGE_", "DATA_", "AWS_"))}
    env.update(PYTHONPATH=str(PROJECT_ROOT), DATA_DIR=str(data_dir), DATABASE_URL=database_url, **S3_TEST_ENV)
    env["AWS_ENDPOINT_URL"] = moto_s3.endpoint
    return env


@pytest.mark.slow
def test_kill_9_in_the_middle_then_rerun_moves_each_original_once(tmp_path, database_url, moto_s3, offline_embedder):
    settings = make_settings(tmp_path / "data", database_url)
    service = SearchService.open(settings, embedder=offline_embedder)
    try:
        results = service.index_images([(p.read_bytes(), p.name) for p in SMALL[:40]])
    finally:
        service.close()
    stored = {r.id: r.filename for r in results if r.status == "indexed"}
    assert len(stored) >= 30
    bucket = moto_s3.create_bucket()
    url = f"s3://{bucket}/originals"
    env = _cli_env(tmp_path / "data", database_url, moto_s3)
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts/move_originals.py"), "--to", url, "--delete-source"]
    cmd += ["--no-progress", "--workers", "1"]
    proc = subprocess.Popen(cmd + ["--verbose"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    copied_lines = 0
    while copied_lines < 3:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"it ended before it could be killed: {proc.communicate()}")
        copied_lines += line.startswith("copied ")
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGKILL)  # kill -9: no clean-up of any kind
    proc.wait(timeout=30)
    target = from_settings(s3_settings(tmp_path / "data", database_url, moto_s3, bucket))
    try:
        landed = {e.image_id: target.head(e.image_id).mtime for e in target.walk()}
        assert 3 <= len(landed) < len(stored) and set(landed) <= set(stored)
        disk = LocalImageStore(settings.resolved_image_dir)
        left = {e.image_id for e in disk.walk() if e.image_id}
        assert left | set(landed) == set(stored)  # nothing lost: every original is in one store or both

        time.sleep(1.1)  # an object written again would get a later Last-Modified (seconds)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout, done.stderr)
        summary = done.stdout.splitlines()[-2]
        # Nothing copied twice: the re-run copies exactly what had not landed, and leaves what had untouched.
        assert f": {len(stored) - len(landed)} copied (" in summary, summary
        assert f"{len(left)} removed from the source" in summary  # those the killed run had not removed yet
        assert f"IMAGE_STORE_URL={url}" in done.stdout.splitlines()[-1]
        assert all(target.head(i).mtime == mtime for i, mtime in landed.items())
        assert [e for e in disk.walk() if e.image_id] == []
    finally:
        target.close()

    # The service on the bucket serves the same collection, and fsck finds store and database agree.
    moved = SearchService.open(s3_settings(tmp_path / "data", database_url, moto_s3, bucket), embedder=offline_embedder)
    try:
        report = check(moved.db, moved.store)
        assert report.clean and report.rows == report.originals == len(stored), report.lines()
        some = sorted(stored)[:5]
        by_id = {r.id: p for r, p in zip(results, SMALL[:40], strict=True)}
        assert all(moved.read_original(i) == (by_id[i].read_bytes(), stored[i]) for i in some)
    finally:
        moved.close()
    fsck = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts/fsck.py")],
        env=env | {"IMAGE_STORE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fsck.returncode == 0, (fsck.stdout, fsck.stderr)
