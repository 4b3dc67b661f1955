"""Memory from any baseline (issue #27, item 3), with real processes: a live server (``python -m app``, its own
process) that has indexed photos already takes a real burst of hostile files, and its own peak RSS (the kernel's
``VmHWM``) stays within ``MEMORY_LIMIT_MB``; every request is answered and the memory is handed back afterwards.

The burst is progressive JPEGs: libjpeg holds the DCT coefficients of the whole image while it decodes one, whatever
the draft scale, so each 25 MP file takes about 150 MB while its drafted raster is under 2 MB; the admission used to
charge only the raster. The full-size measurement (bursts of 32 of each hostile class, from 2,000 indexed photos, the
default 1.5 GB) is ``bench/hostile.py`` (docs/benchmarks.md, "Memory from any baseline"); this test runs a smaller
burst under a proportionally smaller limit.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import create_database, free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: the server's memory limit in this test, MB: a fresh server after 32 photos holds about 350 MB
LIMIT_MB = 800
BURST = 8


def _progressive_jpeg(side: int) -> bytes:
    rng = np.random.default_rng(27)
    cells = rng.integers(0, 256, size=(side // 100, side // 100, 3), dtype=np.uint8)
    out = io.BytesIO()
    pixels = np.repeat(np.repeat(cells, 100, axis=0), 100, axis=1)
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, progressive=True, subsampling=0)
    return out.getvalue()


def _status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc (VmHWM, clear_refs)")
def test_a_burst_of_hostile_files_keeps_the_server_within_its_memory_limit(
    tmp_path, pg_server, model_cache_dir, offline_embedder, datasets
):
    del offline_embedder  # made the model's export in model_cache_dir, which the server loads
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMAGE_DIR")}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        DATA_DIR=str(tmp_path / "data"),
        DATABASE_URL=create_database(pg_server),
        MODEL_CACHE_DIR=str(model_cache_dir),
        EMBEDDER="efficientnet",
        UI_ENABLED="false",
        PORT=str(port),
        LOG_LEVEL="WARNING",
        MEMORY_LIMIT_MB=str(LIMIT_MB),
    )
    base = _progressive_jpeg(5000)
    files = [base + f"hostile-{i}".encode() for i in range(BURST)]  # distinct hashes, the same picture
    photos = sorted((datasets / "caltech101_subset" / "images").rglob("*.jpg"))[:32]
    server = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        # Not a fresh start: the baseline includes indexing (the model's batch, the heap it grew).
        with httpx.Client(base_url=url, timeout=120) as http:
            r = http.post("/index_images", files=[("files", (p.name, p.read_bytes())) for p in photos])
            assert r.status_code == 200, r.text
        time.sleep(1.0)
        before = _status(server.pid, "VmRSS")
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM from here on
        statuses: list[int | str] = []

        def post(data: bytes) -> None:
            try:
                r = httpx.post(f"{url}/index_image", files={"file": ("p.jpg", data)}, timeout=120)
                statuses.append(r.status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

        threads = [threading.Thread(target=post, args=(data,)) for data in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        peak = _status(server.pid, "VmHWM")
        time.sleep(1.0)
        after = _status(server.pid, "VmRSS")
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"RSS before {before / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB, after {after / 1e6:.0f} MB; {statuses}")
    assert len(statuses) == BURST and set(statuses) <= {201, 503} and 201 in statuses, statuses
    assert peak <= LIMIT_MB * 1_000_000, f"peak RSS {peak / 1e6:.0f} MB over MEMORY_LIMIT_MB={LIMIT_MB}"
    assert after <= before + 100_000_000, "the burst's memory was not handed back"
