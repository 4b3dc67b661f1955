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
