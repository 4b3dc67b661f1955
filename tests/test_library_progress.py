"""The progress a running library scan shows (``GET /libraries/{name}``: phase, done, total), as
``image-search-library`` follows it: each new phase is written at once, not up to a second later."""

from __future__ import annotations

import threading

from app.config import Settings
from app.library import libraries as libraries_module
from app.library.libraries import Libraries
from app.library.scan import ScanResult


def test_a_new_phase_is_shown_at_once(tmp_path, monkeypatch):
    in_index = threading.Event()
    release = threading.Event()

    def fake_scan(ctx, library, *, force, settle_s, stop, progress):  # the real one's signature, no database
        progress("walk", 0, 0)
        progress("hash", 0, 5)
        progress("hash", 5, 5)  # the last hash step: written (done == total)
        progress("index", 0, 5)  # a moment later: the decoding processes start, the first batch is embedded...
        in_index.set()
        release.wait(30)
        return ScanResult(files=5, new=5, indexed=5)

    monkeypatch.setattr(libraries_module, "scan_library", fake_scan)
    (tmp_path / "photos").mkdir()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", embedder="none", library_scan_interval="0")
    libraries = Libraries(settings, db=object(), uploads=object(), embedder=None)  # type: ignore[arg-type]
    try:
        libraries.create("photos", [str(tmp_path / "photos")])
        assert in_index.wait(10)
        status = libraries.status("photos")
        # ...and meanwhile the status says so, instead of showing the hash phase finished (5/5).
        assert (status.state, status.phase, status.done, status.total) == ("scanning", "index", 0, 5)
        release.set()
        assert libraries.wait("photos", timeout=10)
        status = libraries.status("photos")
        assert (status.state, status.phase, status.last_scan["indexed"]) == ("idle", "", 5)
    finally:
        release.set()
        libraries.close()
