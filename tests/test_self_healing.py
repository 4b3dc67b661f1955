"""The embedded database heals itself (issue #8, item 2): a postmaster killed with -9 under a search loop is
restarted by the watchdog and the service recovers without a restart, answering 503 + Retry-After within 1 s
meanwhile; a service killed with -9 leaves a PostgreSQL that the next start adopts and its shutdown stops.
Real embedded PostgreSQL, real HTTP server, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.main import create_app
from app.vectordb.watchdog import postmaster_pid
from tests.helpers import PROJECT_ROOT, free_port, make_settings, run_live_server

pytestmark = pytest.mark.slow

RECOVERY_LIMIT_S = 15.0
#: the issue's bound for a 503, and for an answer that needs no database, while the database is down
FAST_S = 1.0
#: a request that waits on the dead database waits on every round of the outage; a shared 2-core CI machine stalls
#: the whole process now and then (stop 23: one local file read of 1.04 s among about 50 requests, where a
#: local run's slowest is 0.05 s). So one answer between FAST_S and STALL_S is a stall; two, or one past it, a bug.
STALL_S = 2 * FAST_S


@pytest.fixture
def images(datasets) -> list[Path]:
    return sorted((datasets / "caltech101_subset/images").rglob("*.jpg"))[:6]


def _wait_gone(pid: int, timeout: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_kill_9_of_the_postmaster_under_a_search_loop(tmp_path, offline_embedder, images):
    settings = make_settings(tmp_path / "data", None)  # no DATABASE_URL: the service starts its embedded server
    pgdata = settings.data_dir / "pgdata"
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url, httpx.Client(timeout=30) as http:
        ids = []
        for path in images:
            r = http.post(f"{url}/index_image", files={"file": (path.name, path.read_bytes())})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        query = images[0].read_bytes()
        before = http.get(f"{url}/stats").json()["count"]
        old_pid = postmaster_pid(pgdata)
        assert old_pid is not None

        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        searches: list[tuple[float, int, dict]] = []  # (seconds since the kill, status, headers)
        slow: list[tuple[str, int, float]] = []
        recovered_at = None
        while time.monotonic() - killed_at < RECOVERY_LIMIT_S + 5:
            start = time.monotonic()
            r = http.post(f"{url}/search_image?exclude_self=false", files={"file": ("q.jpg", query)})
            took = time.monotonic() - start
            assert r.status_code in (200, 503), r.text
            searches.append((start - killed_at, r.status_code, dict(r.headers)))
            if r.status_code == 503:
                assert r.json()["detail"] and "Retry-After" in r.headers
                if took >= FAST_S:
                    slow.append(("search 503", 503, took))
            elif start > killed_at + 0.2:  # a 200 that started after the kill: the database is back
                recovered_at = start - killed_at
                assert r.json()["results"][0]["id"] == ids[0]
                break
            # Endpoints that need no database stay fast and correct meanwhile; /health answers fast and says why.
            for path in (f"/image/{ids[1]}", f"/image/{ids[1]}/thumbnail?size=64", "/health"):
                start = time.monotonic()
                r = http.get(url + path)
                took = time.monotonic() - start
                if path == "/health":
                    assert r.status_code in (200, 503)
                    if r.status_code == 503:
                        assert r.json()["database"] == "unavailable" and r.json()["problems"][0].startswith("database")
                else:
                    assert r.status_code == 200, (path, r.text)
                if took >= FAST_S:
                    slow.append((path, r.status_code, took))
            time.sleep(0.05)

        unavailable = [s for s in searches if s[1] == 503]
        print(f"recovered after {recovered_at} s; {len(unavailable)} of {len(searches)} searches answered 503")
        assert recovered_at is not None and recovered_at <= RECOVERY_LIMIT_S, searches[-3:]
        assert len(slow) <= 1 and all(took < STALL_S for *_, took in slow), slow
        new_pid = postmaster_pid(pgdata)
        assert new_pid is not None and new_pid != old_pid
        # Nothing lost: every committed row survived the crash, and writes work again.
        assert http.get(f"{url}/stats").json()["count"] == before
        assert sorted(http.post(f"{url}/images/exists", json={"ids": ids}).json()["existing"]) == sorted(ids)
        assert http.get(f"{url}/health").json()["status"] == "ok"
        r = http.delete(f"{url}/image/{ids[-1]}")
        assert r.status_code == 200
    # The service's shutdown stopped the server it started.
    assert postmaster_pid(pgdata) is None and _wait_gone(new_pid, 10)


def _start_service(data_dir: Path, port: int, model_cache_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMAGE_DIR")}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT),
        DATA_DIR=str(data_dir),
        MODEL_CACHE_DIR=str(model_cache_dir),
        EMBEDDER="efficientnet",
        UI_ENABLED="false",
        PORT=str(port),
        LOG_LEVEL="WARNING",
    )
    return subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=data_dir.parent)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the service exited during start-up"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("the service did not become healthy")


def test_kill_9_of_the_service_leaves_no_orphan(tmp_path, offline_embedder, model_cache_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    pgdata = data_dir / "pgdata"
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    first = _start_service(data_dir, port, model_cache_dir)
    try:
        _wait_healthy(url, first)
        orphan = postmaster_pid(pgdata)
        assert orphan is not None
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(1.0)
        assert postmaster_pid(pgdata) == orphan  # what a kill -9 leaves: PostgreSQL still running

        second = _start_service(data_dir, port, model_cache_dir)
        try:
            _wait_healthy(url, second)
            assert postmaster_pid(pgdata) == orphan  # adopted, not a second server
            handles = json.loads((pgdata / ".handle_pids.json").read_text())
            assert first.pid not in handles and second.pid in handles  # the dead handle is forgotten
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        # A clean shutdown of the adopting service stops the server it adopted.
        assert _wait_gone(orphan, 15), "the embedded PostgreSQL outlived the service"
        assert postmaster_pid(pgdata) is None
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
        pid = postmaster_pid(pgdata)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
