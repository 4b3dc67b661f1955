"""Helpers the tests share: paths of the project and the real datasets, settings and servers for a test, images.

Fixtures live in ``conftest.py``; plain functions and constants live here, so test modules import them from one
place (``from tests.helpers import ...``) instead of from each other.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image, ImageOps
from psycopg import sql

from app.config import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
"""``../shared/datasets``: real images with ground truth. The whole suite refuses to run without it (conftest)."""
INSTANCE = DATASETS / "instance_small" / "images"
FORMATS = DATASETS / "formats"

BULK_SUMMARY = re.compile(
    r"scanned (\d+) files: (\d+) already indexed, (\d+) indexed, (\d+) failed \(([\d.]+) img/s\)(?:; (\d+) not done)?"
)
"""The last line ``scripts/bulk_index.py`` prints (group 6: files a stopped run never got to, when there are any)."""


def load_rgb(path: Path) -> Image.Image:
    """A dataset image as the service sees it: EXIF orientation applied, RGB."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def assert_unit_rows(emb: np.ndarray, n: int, d: int) -> None:
    """``emb`` is ``(n, d)`` float32, finite, every row of unit L2 norm."""
    assert emb.shape == (n, d) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two ``(N, D)`` arrays of unit rows."""
    return np.sum(a * b, axis=1)


def symlink(target: Path, link: Path) -> None:
    """``link`` -> ``target``, creating ``link``'s folders: builds test folder trees without copying datasets."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def create_database(pg_server) -> str:
    """Create an empty database on the session server and return its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_server.get_uri(name)


def make_settings(data_dir: Path, database_url: str, **overrides) -> Settings:
    """Settings for a test: its own data dir and database, the offline model, no UI unless asked, and TestClient's
    Host (``testserver``) allowed next to the loopback names of live servers (ALLOWED_HOSTS)."""
    values = dict(
        data_dir=data_dir,
        database_url=database_url,
        embedder="efficientnet",
        ui_enabled=False,
        allowed_hosts="testserver,localhost,127.0.0.1,[::1]",
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def free_port(ports: range | None = None) -> int:
    """A free loopback port: any the system picks, or one of ``ports`` (a range a test was given to stay in)."""
    if ports is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in random.sample(ports, len(ports)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


@contextmanager
def run_live_server(app, ports: range | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port (one of ``ports`` if given) in a thread; yields the base
    URL."""
    import uvicorn

    port = free_port(ports)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
