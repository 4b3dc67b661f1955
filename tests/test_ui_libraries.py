"""What the web UI's Libraries tab says (ui/library_text.py), without a browser or a server: each state in words,
the counts, the last scan, offline photos, warnings and errors, hostile names shown as they are, and the empty
state. The tab itself is driven through the service in tests/test_ui.py and in Chromium in
tests/test_browser_libraries.py."""

from __future__ import annotations

import re

from app.library.libraries import LibraryStatus
from app.library.model import Library
from ui.library_text import (
    EMPTY,
    ago,
    any_active,
    duration,
    libraries_markdown,
    library_markdown,
    md_text,
    state_line,
)

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC
DAY = 86400.0


def status(**changes) -> LibraryStatus:
    values = dict(
        library=Library.create("photos", ["/mnt/photos"]),
        state="idle",
        phase="",
        done=0,
        total=0,
        counts={"files": 6, "online": 6, "offline": 0, "failed": 0, "images": 6},
        scan_started_at=NOW - 130,
        scan_finished_at=NOW - 120,
        last_scan={"files": 6, "new": 6, "indexed": 6, "linked": 0, "offline": 0, "seconds": 9.5},
        error=None,
        warning=None,
    )
    values.update(changes)
    return LibraryStatus(**values)


def test_an_idle_library_with_its_counts_and_last_scan():
    text = library_markdown(status(), 30 * DAY, NOW)
    assert text.startswith("#### photos\n")  # a heading per library
    assert "State: ✓ **Idle**" in text
    assert "**6 online** · **0 offline** · 0 failed · 6 distinct photos" in text
    assert "Folder: /mnt/photos" in md_text_free(text)
    assert "finished 2027-01-15 07:58 UTC (2 minutes ago), took 9.5 seconds: 6 files found; 6 new, " in text
    assert "6 indexed (model calls)" in text and "linked" not in text  # only what the scan did
    assert "offline**:" not in text and "Warning" not in text


def md_text_free(text: str) -> str:
    """``text`` with Markdown's backslash escapes removed: what the page shows."""
    return text.replace("\\", "")


def test_each_state_is_said_in_words():
    never = status(scan_finished_at=None, last_scan=None, counts={"files": 0, "online": 0, "offline": 0})
    assert state_line(never) == "○ **Not scanned yet**"
    assert "Last scan: never completed" in library_markdown(never, DAY, NOW)
    walking = status(state="scanning", phase="walk", done=2000, total=0)
    assert state_line(walking).startswith("⏳ **Scanning**: listing the folders, 2,000 files so far (started ")
    indexing = status(state="scanning", phase="index", done=120, total=500)
    assert "indexing new photos, 120 of 500 (24 %)" in state_line(indexing)
    waiting = status(state="waiting", phase="waiting", error="the database does not answer")
    assert state_line(waiting).startswith("⏸ **Waiting**") and "the database does not answer" in state_line(waiting)
    interrupted = state_line(status(state="interrupted", phase="hash"))
    assert "**Interrupted**" in interrupted and "**Scan now**" in interrupted and "resumes" in interrupted
    failed = status(state="failed", error="OSError: [Errno 5] Input/output error")
    assert state_line(failed).startswith("✗ **Failed**") and "Input/output error" in md_text_free(state_line(failed))
    assert "✗ **Error**" not in library_markdown(failed, DAY, NOW)  # said once, in the state
    assert any_active([status(), indexing]) and any_active([waiting])
    assert not any_active([status(), never, failed, status(state="interrupted")])


def test_offline_photos_are_explained():
    s = status(
        counts={"files": 6, "online": 5, "offline": 1, "failed": 0, "images": 6},
        last_scan={"files": 5, "unchanged": 5, "offline": 1, "seconds": 0.12},
    )
    text = library_markdown(s, 30 * DAY, NOW)
    assert "**5 online** · **1 offline**" in text
    assert "5 files found; 5 unchanged, 1 newly offline" in text
    assert (
        "**1 file offline**: missing since a scan. It is hidden from search results and kept for 30 days "
        "(`LIBRARY_OFFLINE_GRACE`); a file that comes back is shown again by the next scan, with no model call"
    ) in text
    many = status(counts={"files": 9, "online": 6, "offline": 3, "failed": 0, "images": 8})
    assert "**3 files offline**: missing since a scan. They are hidden" in library_markdown(many, 12 * 3600, NOW)
    assert "kept for 12 hours" in library_markdown(many, 12 * 3600, NOW)


def test_warnings_errors_and_hostile_names_show_as_they_are():
    library = Library.create("nas", ["/mnt/<b>x</b>", "/srv/*_[a](x)_*"], ["**/@eaDir/**"], source="env")
    s = status(
        library=library,
        warning="root /mnt/<b>x</b> is missing: nothing was changed (no file was marked offline).",
        last_scan={"files": 2, "failed": 1, "errors": ["a|b.jpg: corrupt <img src=x>"], "unreadable_dirs": ["nas/x/"]},
        watching=True,
    )
    text = library_markdown(s, DAY, NOW)
    # Every ASCII punctuation character of outside text is escaped: no HTML, link, emphasis or table comes of it.
    assert re.search(r"(?<!\\)[<>\[\]|]", text) is None, text
    shown = md_text_free(text)
    assert "Folders: /mnt/<b>x</b>, /srv/*_[a](x)_* (from `LIBRARY_ROOTS`)" in shown
    assert "Left out: **/@eaDir/**" in shown
    assert "⚠ **Warning**: root /mnt/<b>x</b> is missing: nothing was changed" in shown
    assert "Could not be indexed: a|b.jpg: corrupt <img src=x>" in shown
    assert "Folders that could not be read: nas/x/" in shown
    assert "Watched: changes in its folders start a scan" in shown
    assert md_text("a\nb*") == "a b\\*"


def test_no_library_says_how_to_create_one():
    assert libraries_markdown([], DAY) == EMPTY
    for way in ("image-search-library add NAME FOLDER", "POST /libraries", "LIBRARY_ROOTS=photos=/photos"):
        assert way in EMPTY
    two = libraries_markdown([status(), status(library=Library.create("b", ["/b"]))], DAY, NOW)
    assert two.index("#### photos") < two.index("#### b")  # in the order given (by name from the service)


def test_durations_and_ages_in_words():
    assert duration(30 * DAY) == "30 days" and duration(DAY) == "1 day" and duration(1.5 * 3600) == "1.5 hours"
    assert duration(90) == "1.5 minutes" and duration(0.12) == "0.1 seconds" and duration(0) == "0 seconds"
    assert ago(NOW - 5, NOW) == "just now" and ago(NOW - 61, NOW) == "1 minute ago"
    assert ago(NOW - 3 * DAY - 5, NOW) == "3 days ago" and ago(NOW + 30, NOW) == "just now"
