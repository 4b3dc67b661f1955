"""The web UI's Libraries tab in Chromium (the fixtures and waits of tests/test_browser.py): none at first (how to
make one), then a library on a folder of caltech photos with its counts after the first scan, a deleted file,
"Scan now" refused without the API key and run with it, the progress shown by the tab's own polling while the scan
runs, "1 offline" once it ends, and the polling stopped once nothing runs."""

from __future__ import annotations

import pytest

import tests.test_browser as tb
from app.main import create_app
from tests.helpers import create_database, make_settings, run_live_server
from tests.test_ui import caltech_folder, gate_scans
from ui.libraries_tab import POLL_S

pytestmark = pytest.mark.slow

browser = tb.browser  # the module-scoped Chromium of tests/test_browser.py (skips without Chromium)

#: The library list once a scan ended and its result is shown.
IDLE = r"✓ Idle"


def test_libraries_tab_shows_counts_and_scans_now(pg_server, offline_embedder, tmp_path, browser, request, monkeypatch):
    folder = caltech_folder(tmp_path / "photos")
    settings = make_settings(tmp_path / "data", create_database(pg_server), ui_enabled=True, api_key=tb.KEY)
    app = create_app(settings, embedder=offline_embedder)
    with run_live_server(app, tb.PORTS) as url:
        context, tab = tb._tab(browser, url, viewport={"width": 1280, "height": 900})
        page = tab.page
        try:
            tb._open(page, url)
            page.get_by_role("tab", name="Libraries").click()
            page.get_by_role("heading", name="Photo libraries").wait_for()
            # None yet: how to make one, and nothing to scan.
            assert "image-search-library add NAME FOLDER" in tb._settled_text(page, "#libraries-list", "No photo")
            assert page.get_by_role("button", name="Scan now").is_hidden()

            libraries = app.state.service.libraries
            libraries.create("photos", [str(folder)])
            assert libraries.wait("photos", 300)
            page.get_by_role("button", name="Refresh").click()
            listed = tb._settled_text(page, "#libraries-list", IDLE)
            assert "6 online · 0 offline · 0 failed · 6 distinct photos" in listed
            assert f"Folder: {folder}" in listed and "6 new, 6 indexed (model calls)" in listed
            # The first library is chosen; the controls have their labels.
            assert page.get_by_label("Library to scan").input_value() == "photos"

            (folder / "Faces.jpg").unlink()
            gate = gate_scans(monkeypatch)  # the scan waits until the page has shown it running
            scan = page.get_by_role("button", name="Scan now")
            scan.click()
            assert "Scanning a library needs the service's API key" in tb._toast(page)
            assert libraries.status("photos").state == "idle"
            tb._close_toasts(page)

            # The key typed into another tab's key box counts (the Add tab's).
            page.get_by_role("tab", name="Add").click()
            # Typed at once: Gradio's write-back to the tab's new components passes over the key boxes, which the
            # load event already showed (see tb._open_panel).
            page.locator("#key-add").get_by_label("API key").fill(tb.KEY)
            page.get_by_role("tab", name="Libraries").click()
            scan.click()
            assert tb._settled_text(page, "#library-message", r"started") == "Scan of photos started."
            assert "⏳ Scanning" in tb._settled_text(page, "#libraries-list", r"Scanning")
            # Let the scan go: the tab's polling (no click) shows it ending, with the photo offline.
            joins = []
            page.on("request", lambda r: joins.append(r.url) if "/queue/join" in r.url else None)
            gate.set()
            listed = tb._settled_text(page, "#libraries-list", IDLE + r"[\s\S]*1 file offline")
            assert "5 online · 1 offline" in listed and "5 unchanged, 1 newly offline" in listed
            assert "hidden from search results and kept for 30 days" in listed
            assert joins, "the list changed without the page asking: not polled"
            # Nothing runs any more: the polling stopped (no request in several poll periods).
            polled = len(joins)
            page.wait_for_timeout(int(4 * POLL_S * 1000))
            assert len(joins) == polled, joins[polled:]
        finally:
            tb._finish(request, context, tab, tmp_path)
