"""A library created from ``LIBRARY_ROOTS`` gets its first scan when the service starts, not at the scheduler's
first tick 30 s later (Docker Compose creates ``photos=/photos`` this way: docs/docker.md).

The scan itself is replaced by a stand-in that records its call, so this needs no model, database or vector store:
what is checked is :meth:`app.library.libraries.Libraries.start`'s scheduling, on the SQLite state in DATA_DIR.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import app.library.libraries as libraries_module
from app.config import Settings
from app.errors import LibraryNotFoundError
from app.library.libraries import Libraries
from app.library.scan import ScanResult


class _Stub:
    """Stands in for the vector database and the uploads' image store: the stubbed scan touches neither."""


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, threading.Event]]:
    """Replace the scan with one that records (library name, its release event) and waits for the event."""
    calls: list[tuple[str, threading.Event]] = []

    def fake_scan(ctx, library, *, force, settle_s, stop, progress):  # noqa: ANN001
        release = threading.Event()
        calls.append((library.name, release))
        release.wait(10)
        return ScanResult(files=1)

    monkeypatch.setattr(libraries_module, "scan_library", fake_scan)
    return calls


def _wait_for(scans: list, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(scans) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(scans) >= n, scans


def _libraries(tmp_path: Path, **overrides) -> Libraries:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    values = {"data_dir": tmp_path / "data", "library_roots": f"photos={photos}", **overrides}
    settings = Settings(_env_file=None, **values)
    settings.data_dir.mkdir(exist_ok=True)
    return Libraries(settings, _Stub(), _Stub(), None)


def test_start_scans_a_library_from_library_roots_at_once(tmp_path: Path, scans) -> None:
    libs = _libraries(tmp_path)
    try:
        libs.start()
        # start() itself started the first scan: it is running when start() returns, not 30 s later.
        status = libs.status("photos")
        assert status.library.source == "env" and status.state == "scanning", status
        _wait_for(scans, 1)
        for _, release in scans:
            release.set()
        assert libs.wait("photos", timeout=10)
        done = libs.status("photos")
        assert done.state == "idle" and done.scan_finished_at is not None and done.last_scan["files"] == 1, done
        assert [name for name, _ in scans] == ["photos"]
    finally:
        for _, release in scans:
            release.set()
        libs.close()


def test_a_second_start_does_not_scan_a_library_scanned_within_the_interval(tmp_path: Path, scans) -> None:
    first = _libraries(tmp_path)
    try:
        first.start()
        _wait_for(scans, 1)
        for _, release in scans:
            release.set()
        assert first.wait("photos", timeout=10)
    finally:
        first.close()
    again = _libraries(tmp_path)
    try:
        again.start()
        assert len(scans) == 1, "a library scanned a moment ago is not due at the next start"
        assert again.status("photos").state == "idle"
    finally:
        again.close()


def test_due_scans_skip_a_library_deleted_meanwhile(tmp_path: Path, scans, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = _libraries(tmp_path, library_roots=f"gone={tmp_path},photos={tmp_path / 'photos'}")
    real_scan = Libraries.scan

    def scan(self, name, **kwargs):  # noqa: ANN001
        if name == "gone":  # as if another replica deleted it between the listing and the scan
            raise LibraryNotFoundError(f"No library called '{name}'.")
        return real_scan(self, name, **kwargs)

    monkeypatch.setattr(Libraries, "scan", scan)
    try:
        libs.start()  # must neither raise nor leave the other library unscanned
        _wait_for(scans, 1)
        assert [name for name, _ in scans] == ["photos"]
    finally:
        for _, release in scans:
            release.set()
        libs.close()
