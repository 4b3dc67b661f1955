"""Walking a library's roots with ``os.scandir`` + ``stat`` only (no file content is read), and finding one of its
files again, safely, for a read.

Safety rules, the same for the walk and for reads (:func:`resolve`):

- a library path never names anything outside its root: ``..`` and absolute components are refused, and a symlink
  is followed only when its target (``os.path.realpath``) is inside the root's real path, so a link to ``/etc``
  or to a sibling folder is skipped (counted in :attr:`WalkResult.skipped`);
- every real folder is listed at most once (by device and inode), so a symlink loop ends;
- names starting with ``.`` (hidden files and folders, ``.thumbnails``...) and files whose extension is not an
  image format (:mod:`app.imaging.extensions`) are not looked at; :meth:`Library.excluded` globs prune the rest;
- a folder that cannot be listed (permission denied, vanished, I/O error on a network mount) is recorded in
  :attr:`WalkResult.failed_dirs`: the scan then marks nothing under it offline.
"""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.imaging.extensions import IMAGE_EXTENSIONS
from app.library.model import Library

__all__ = ["RootProblem", "WalkResult", "check_roots", "resolve", "walk_library"]

_IMAGE_SUFFIXES = tuple(f".{e}".encode() for e in IMAGE_EXTENSIONS)
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux: a longer library path cannot be opened anyway


@dataclass(frozen=True, slots=True)
class RootProblem:
    """A root the scan cannot trust: ``root`` and ``reason`` in words (missing, not a folder, unreadable, empty).

    ``empty``: the root is a readable, empty folder, which is only a problem when the library knew files in it."""

    root: str
    reason: str
    empty: bool = False


@dataclass
class WalkResult:
    """What a walk saw.

    Attributes:
        files: library path -> ``(size in bytes, mtime in ns)`` of every image file found.
        failed_dirs: library paths of folders that could not be listed (``b""`` is a root), with the reason.
        skipped: entries left out for safety (symlinks leaving the root, loops, special files).
        dirs: folders listed.
    """

    files: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    failed_dirs: dict[bytes, str] = field(default_factory=dict)
    skipped: int = 0
    dirs: int = 0

    def under_failed_dir(self, path: bytes) -> bool:
        """Whether ``path`` lies in a folder the walk could not list (so its absence proves nothing)."""
        return any(d == b"" or path.startswith(d + b"/") for d in self.failed_dirs)


def check_roots(library: Library) -> list[RootProblem]:
    """The roots that are missing, not folders, unreadable or empty (an unmounted mount point is an empty folder);
    ``[]`` when every root can be walked. Touches each root with one ``stat`` and one ``scandir``."""
    problems = []
    for root in library.roots:
        try:
            st = os.stat(root)
            if not stat_module.S_ISDIR(st.st_mode):
                problems.append(RootProblem(root, "is not a folder"))
                continue
            with os.scandir(root) as entries:
                if next(entries, None) is None:
                    problems.append(RootProblem(root, "is empty (an unmounted share looks like this)", empty=True))
        except FileNotFoundError:
            problems.append(RootProblem(root, "does not exist (is the share mounted?)"))
        except PermissionError:
            problems.append(RootProblem(root, "cannot be read (permission denied)"))
        except OSError as exc:
            problems.append(RootProblem(root, f"cannot be read ({exc.strerror or type(exc).__name__})"))
    return problems


def _inside(real: bytes, real_root: bytes) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(b"/") + b"/")


def walk_library(
    library: Library,
    extra_excludes: Sequence[str] = (),
    *,
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> WalkResult:
    """Every image file under the library's roots, by library path, with its size and mtime; reads no content.

    ``progress(files_so_far)`` is called every 1,000 files; ``stop()`` returning ``True`` ends the walk early
    (the result is then incomplete: the caller must not mark anything offline from it). Never raises for what it
    finds on disk; see the module docstring for what is skipped.
    """
    result = WalkResult()
    for root, prefix in library.root_prefixes():
        root_b = os.fsencode(root)
        try:
            real_root = os.path.realpath(root_b)
        except OSError as exc:
            result.failed_dirs[prefix.rstrip(b"/")] = str(exc)
            continue
        seen: set[tuple[int, int]] = set()
        stack: list[tuple[bytes, bytes]] = [(root_b, prefix.rstrip(b"/"))]
        while stack:
            if stop is not None and stop():
                return result
            folder, rel = stack.pop()
            try:
                st = os.stat(folder)
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    result.skipped += 1  # a loop, or a second link to a folder already walked
                    continue
                seen.add(key)
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as exc:
                result.failed_dirs[rel] = exc.strerror or type(exc).__name__
                continue
            result.dirs += 1
            for entry in entries:
                name = entry.name
                if name.startswith(b"."):
                    continue
                path = rel + b"/" + name if rel else name
                if len(path) > MAX_PATH_BYTES:
                    result.skipped += 1
                    continue
                try:
                    is_link = entry.is_symlink()
                    if is_link and not _inside(os.path.realpath(entry.path), real_root):
                        result.skipped += 1  # leaves the root (a link to /etc, to a sibling share...)
                        continue
                    if entry.is_dir():
                        if not library.folder_excluded(path, extra_excludes):
                            stack.append((entry.path, path))
                        continue
                    if not entry.is_file():
                        result.skipped += 1  # a socket, a FIFO, a device, a dangling link
                        continue
                    if not name.lower().endswith(_IMAGE_SUFFIXES) or library.excluded(path, extra_excludes):
                        continue
                    st = entry.stat()
                except OSError:
                    result.skipped += 1  # vanished between the listing and the stat, or a dangling link
                    continue
                result.files[path] = (st.st_size, st.st_mtime_ns)
                if progress is not None and len(result.files) % 1000 == 0:
                    progress(len(result.files))
    return result


def resolve(library: Library, path: bytes) -> bytes | None:
    """The absolute path (bytes) of library path ``path``, or ``None`` when it would leave its root: a ``..``,
    ``.`` or empty component, an absolute path, a NUL, a root prefix that names no root, or a symlink whose real
    target is outside the root's real path. Does not check that the file exists."""
    if not path or b"\0" in path or path.startswith(b"/"):
        return None
    parts = path.split(b"/")
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    for root, prefix in library.root_prefixes():
        if prefix and not path.startswith(prefix):
            continue
        root_b = os.fsencode(root)
        full = os.path.join(root_b, path[len(prefix) :])
        try:
            if not _inside(os.path.realpath(full), os.path.realpath(root_b)):
                return None
        except OSError:
            return None
        return full
    return None
