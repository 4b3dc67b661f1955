"""What the Libraries tab says about photo libraries, as Markdown: each library's folders, state, counts, last scan,
warning, error and offline photos, and how to create one when there is none.

Pure functions (no Gradio, no service), so the wording is tested without a browser: :func:`libraries_markdown`
renders :meth:`app.library.libraries.Libraries.list`'s statuses. Every text that comes from outside (names, folders,
errors, warnings) goes through :func:`md_text`, so a folder called ``*_[x](y)`` shows as it is.
"""

from __future__ import annotations

import string
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ui.query import when

if TYPE_CHECKING:
    from app.library.libraries import LibraryStatus

#: The running scan's phases (``Libraries`` progress), in words.
PHASES = {
    "walk": "listing the folders",
    "hash": "reading new and changed files",
    "index": "indexing new photos",
    "offline": "marking missing files offline",
    "purge": "forgetting files offline for longer than LIBRARY_OFFLINE_GRACE",
    "waiting": "waiting",
}

#: What a completed scan did (``ScanResult``), in the order shown; each is shown when it is not 0.
SCAN_RESULT = (
    ("unchanged", "unchanged"),
    ("new", "new"),
    ("changed", "changed"),
    ("indexed", "indexed (model calls)"),
    ("linked", "linked (known photos at a new path, no model call)"),
    ("back_online", "back online"),
    ("offline", "newly offline"),
    ("moved_away", "moved away"),
    ("purged", "purged"),
    ("failed", "failed"),
    ("deferred", "left for the next scan (still changing)"),
    ("skipped", "skipped (links leaving the folder, special files)"),
)

#: Library states that a scan is still working on: the page polls while one shows.
ACTIVE_STATES = frozenset({"scanning", "waiting"})

#: The Markdown escapes of every ASCII punctuation character (CommonMark lets each be escaped with a backslash).
_MD_ESCAPES = str.maketrans({c: "\\" + c for c in string.punctuation} | {"\n": " ", "\r": " "})

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def md_text(text: object) -> str:
    """``text`` as literal Markdown text: every ASCII punctuation character backslash-escaped (so no emphasis,
    link, HTML or table comes of it), line breaks as spaces."""
    return str(text).translate(_MD_ESCAPES)


def duration(seconds: float) -> str:
    """``30 days``, ``12 hours``, ``1.5 hours``, ``90 seconds`` → ``1.5 minutes``: the largest unit that fits."""
    for unit, size in _UNITS:
        if seconds >= size or unit == "second":
            value = round(seconds / size, 1)
            text = f"{value:g}"
            return f"{text} {unit}" + ("" if text == "1" else "s")
    raise AssertionError("unreachable")


def ago(epoch: float, now: float) -> str:
    """``just now``, ``5 minutes ago``, ``3 days ago``: how long before ``now`` the time ``epoch`` was."""
    seconds = now - epoch
    if seconds < 60:
        return "just now"
    for unit, size in _UNITS:
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    return "just now"


def _at(epoch: float) -> str:
    return when(datetime.fromtimestamp(epoch, UTC))


def files(count: int) -> str:
    """``1 file``, ``1,204 files``."""
    return f"{count:,} file" + ("" if count == 1 else "s")


def state_line(s: LibraryStatus) -> str:
    """The state in words with a symbol (never colour alone): idle, not scanned yet, scanning with its phase and
    progress, waiting, interrupted, failed."""
    if s.state == "scanning":
        phase = PHASES.get(s.phase, md_text(s.phase) or "starting")
        if s.total:
            progress = f", {s.done:,} of {s.total:,} ({min(100, 100 * s.done // s.total)} %)"
        elif s.done:
            progress = f", {files(s.done)} so far"
        else:
            progress = ""
        since = f" (started {_at(s.scan_started_at)})" if s.scan_started_at else ""
        return f"⏳ **Scanning**: {phase}{progress}{since}"
    if s.state == "waiting":
        why = f" ({md_text(s.error)})" if s.error else ""
        return f"⏸ **Waiting**: the database or storage does not answer{why}; the scan goes on by itself once it does"
    if s.state == "interrupted":
        return (
            "⚠ **Interrupted**: the process that was scanning it stopped; **Scan now** (or the next start of the "
            "service) resumes the scan, and nothing it did is lost"
        )
    if s.state == "failed":
        why = md_text(s.error) if s.error else "see the service's log"
        return f"✗ **Failed**: the last scan stopped with an error: {why}. **Scan now** tries again"
    if s.scan_finished_at is None:
        return "○ **Not scanned yet**"
    return "✓ **Idle**"


def last_scan_line(s: LibraryStatus, now: float) -> str:
    """When the last completed scan finished, how long it took and what it found and did (the non-zero counts)."""
    if s.scan_finished_at is None:
        return "never completed"
    result = s.last_scan or {}
    head = f"finished {_at(s.scan_finished_at)} ({ago(s.scan_finished_at, now)})"
    if "seconds" in result:
        head += f", took {duration(float(result['seconds']))}"
    did = [f"{int(result[k]):,} {label}" for k, label in SCAN_RESULT if result.get(k)]
    found = f"{files(int(result.get('files', 0)))} found"
    return f"{head}: {found}" + (f"; {', '.join(did)}" if did else "")


def offline_line(count: int, grace_s: float) -> str:
    """What offline files are: missing since a scan, hidden from results, kept for the grace, back for free."""
    these = "It is" if count == 1 else "They are"
    return (
        f"**{files(count)} offline**: missing since a scan. {these} hidden from search results and kept for "
        f"{duration(grace_s)} (`LIBRARY_OFFLINE_GRACE`); a file that comes back is shown again by the next scan, "
        "with no model call"
    )


def library_markdown(s: LibraryStatus, grace_s: float, now: float) -> str:
    """One library: a heading with its name, then its state, counts, folders, last scan, and any offline photos,
    warning or error, as a Markdown list."""
    c = s.counts
    name = md_text(s.library.name)
    lines = [f"#### {name}", "", f"- State: {state_line(s)}"]
    lines.append(
        f"- Files: **{c.get('online', 0):,} online** · **{c.get('offline', 0):,} offline** · "
        f"{c.get('failed', 0):,} failed · {c.get('images', 0):,} distinct photos"
    )
    roots = ", ".join(md_text(r) for r in s.library.roots)
    origin = " (from `LIBRARY_ROOTS`)" if s.library.source == "env" else ""
    lines.append(f"- {'Folder' if len(s.library.roots) == 1 else 'Folders'}: {roots}{origin}")
    if s.library.excludes:
        lines.append(f"- Left out: {', '.join(md_text(p) for p in s.library.excludes)}")
    if s.watching:
        lines.append("- Watched: changes in its folders start a scan (`LIBRARY_WATCH`)")
    lines.append(f"- Last scan: {last_scan_line(s, now)}")
    if c.get("offline"):
        lines.append(f"- {offline_line(c['offline'], grace_s)}")
    if s.warning:
        lines.append(f"- ⚠ **Warning**: {md_text(s.warning)}")
    if s.error and s.state not in ("failed", "waiting"):
        lines.append(f"- ✗ **Error**: {md_text(s.error)}")
    errors = (s.last_scan or {}).get("errors") or []
    if errors:
        shown = "; ".join(md_text(e) for e in errors[:3])
        lines.append(f"- Could not be indexed: {shown}" + (" …" if len(errors) > 3 else ""))
    unreadable = (s.last_scan or {}).get("unreadable_dirs") or []
    if unreadable:
        lines.append(f"- Folders that could not be read: {', '.join(md_text(d) for d in unreadable[:5])}")
    return "\n".join(lines)


#: Shown when no library exists: what a library is and the three ways to create one.
EMPTY = """No photo library yet. A **library** is a folder of photos (a NAS share, a disk) that the service indexes
**where it is**: nothing is copied, and scans keep the index in step as photos are added, changed, moved or deleted.
Create one with:

- the command line: `image-search-library add NAME FOLDER`
- the REST API: `POST /libraries` with `{"name": "photos", "roots": ["/photos"]}` (see the [REST API](/docs))
- Docker Compose: `LIBRARY_ROOTS=photos=/photos` in the service's environment, with the folder mounted into the
  container

Then press **Refresh**."""


def libraries_markdown(statuses: Sequence[LibraryStatus], grace_s: float, now: float | None = None) -> str:
    """Every library (:func:`library_markdown`), by name, or :data:`EMPTY` when there is none.

    Args:
        statuses: ``service.libraries.list()``. grace_s: ``LIBRARY_OFFLINE_GRACE`` in seconds. now: epoch seconds
            the "ago"s count from (the current time unless given).
    """
    if not statuses:
        return EMPTY
    now = time.time() if now is None else now
    return "\n\n".join(library_markdown(s, grace_s, now) for s in statuses)


def any_active(statuses: Sequence[LibraryStatus]) -> bool:
    """Whether a scan is running or waiting in one of ``statuses`` (the page then polls)."""
    return any(s.state in ACTIVE_STATES for s in statuses)
