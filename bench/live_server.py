"""The server the load benches start for themselves (``bench/hang.py``, ``bench/hostile.py``): ``python -m app`` on a
loopback port with a temporary ``DATA_DIR`` (embedded PostgreSQL, offline model, no web UI), waited for until
``/health`` answers 200, and stopped.

Imported by name (``from live_server import ...``): a bench run as a script has ``bench/`` on ``sys.path``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A free loopback port, picked by the system."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(
    data_dir: str, port: int, *, project_root: Path, model_cache_dir: Path, log_level: str, **extra: str
) -> dict[str, str]:
    """This process's environment for a server of its own: ``DATA_DIR`` (so the embedded PostgreSQL and the
    originals live there; ``DATABASE_URL`` and ``IMAGE_DIR`` are dropped), code from ``project_root`` (another
    checkout runs a baseline), the offline model from ``model_cache_dir``, no web UI, ``PORT``, ``LOG_LEVEL``, then
    ``extra`` settings (``NAME="value"``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMAGE_DIR")}
    env.update(
        PYTHONPATH=str(project_root.resolve()),
        DATA_DIR=data_dir,
        MODEL_CACHE_DIR=str(model_cache_dir.resolve()),
        EMBEDDER="efficientnet",
        UI_ENABLED="false",
        PORT=str(port),
        LOG_LEVEL=log_level,
        **extra,
    )
    return env


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    """Poll ``url``/health every 0.5 s until it answers 200; ``SystemExit`` if ``server`` exits or ``timeout_s``
    seconds pass first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited during start-up (code {server.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def start_server(env: dict[str, str], cwd: str) -> subprocess.Popen:
    """``python -m app`` with ``env`` in ``cwd`` (its output goes to this process's)."""
    return subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=cwd)


def stop_server(server: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (the server shuts down cleanly), then SIGKILL if it has not exited within ``timeout_s`` seconds."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()


#: where the benches take real photos from (``../shared/datasets`` next to the project)
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def baseline_photos(n: int, exclude: set[Path] | frozenset[Path] = frozenset()) -> list[Path]:
    """``n`` real photos for a baseline (issue #27: memory and deadlines must hold after indexing, not only from a
    fresh start): the Caltech-101 subset's JPEGs (2,020), then ``instance_small``'s, sorted, without ``exclude``.
    ``SystemExit`` when there are fewer."""
    found = [
        path
        for folder in ("caltech101_subset/images", "instance_small/images")
        for path in sorted((DATASETS / folder).rglob("*"))
        if path.suffix.lower() in (".jpg", ".jpeg") and path not in exclude
    ]
    if len(found) < n:
        raise SystemExit(f"only {len(found)} photos under {DATASETS}, {n} asked for")
    return found[:n]


def index_photos(url: str, photos: list[Path], batch: int = 32, retries: int = 10) -> dict:
    """Index ``photos`` through ``POST /index_images``, ``batch`` per request (the way ``bulk_index.py`` uploads);
    the count indexed (or already there), the 503s retried (after their ``Retry-After``, up to ``retries`` per
    batch: a baseline is not what a bench measures) and the seconds it took. Raises ``httpx.HTTPStatusError`` on
    another refusal, or on a 503 after the last retry."""
    started = time.monotonic()
    indexed = retried = 0
    with httpx.Client(base_url=url, timeout=600) as http:
        for start in range(0, len(photos), batch):
            files = [("files", (p.name, p.read_bytes())) for p in photos[start : start + batch]]
            for attempt in range(retries + 1):
                r = http.post("/index_images", files=files)
                if r.status_code != 503 or attempt == retries:
                    break
                retried += 1
                time.sleep(float(r.headers.get("retry-after", "1")))
            r.raise_for_status()
            indexed += sum(1 for item in r.json()["results"] if item["status"] in ("indexed", "exists"))
    return {
        "photos": len(photos),
        "indexed": indexed,
        "retried_503": retried,
        "index_s": round(time.monotonic() - started, 1),
    }
