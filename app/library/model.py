"""What a library is: a name, its root folders and exclusion globs; the rules that name, parse and match them.

A library's files are keyed by their **library path**: the path relative to the root, ``/``-separated, as the raw
bytes the file system gave (so names that are not UTF-8 stay exact). With several roots, the root's folder name is
the first component (``nas1/2024/a.jpg``), so the roots of one library must have distinct folder names. Shown to
people and stored as the row's ``filename`` it is ``<library>/<library path>`` (:func:`display_name`), so a folder
filter on ``<library>/`` is a filter on the library.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wcmatch import glob as wcglob

from app.imaging.prepare import clean_filename

__all__ = [
    "GLOB_FLAGS",
    "Library",
    "display_name",
    "parse_library_roots",
    "split_patterns",
    "validate_library_name",
]

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
# wcmatch (facelessuser/wcmatch): ``**`` spans folders (GLOBSTAR), ``*`` also matches names with a leading dot
# (DOTGLOB), ``{a,b}`` expands (BRACE); case-sensitive like the file systems photo libraries live on.
GLOB_FLAGS = wcglob.GLOBSTAR | wcglob.DOTGLOB | wcglob.BRACE
MAX_ROOTS = 16
MAX_PATTERNS = 64


_GLOB_SPECIAL = frozenset("*?[]{}\\")  # what makes a pattern component more than literal text under GLOB_FLAGS


@lru_cache(maxsize=256)
def compiled_patterns(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """A test of a library path (text) against ``patterns``, the same as ``wcglob.compile(patterns,
    flags=GLOB_FLAGS).match`` but compiled once per tuple of patterns and mostly skipped.

    ``wcglob.compile`` rebuilds the patterns (brace expansion and all) at every call: 90 us per file with the default
    ``LIBRARY_EXCLUDE``, of which about 10 us are its regular expressions; that was 10 s of an 11 s unchanged rescan
    of 200,000 files (bench/library.py). Here each pattern is compiled once, and tried only on paths that contain its
    literal components: a component without glob characters (``@eaDir`` in ``**/@eaDir/**``) matches exactly that
    text in a path, so a path that does not contain it cannot match, and a substring test rules it out.
    """
    checks: list[tuple[tuple[str, ...], Callable[[str], bool]]] = []
    for pattern in patterns:
        literals = tuple(
            part for part in pattern.split("/") if part not in ("", ".", "..") and not _GLOB_SPECIAL.intersection(part)
        )
        checks.append((literals, wcglob.compile(pattern, flags=GLOB_FLAGS).match))

    def match(path: str) -> bool:
        for literals, test in checks:
            for literal in literals:
                if literal not in path:
                    break
            else:
                if test(path):
                    return True
        return False

    return match


def validate_library_name(name: str) -> str:
    """``name`` if it can name a library: 1-48 lower-case letters, digits, ``_`` or ``-``, a letter or digit
    first (it is the first folder of every stored filename, and part of URLs). Raises ``ValueError``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"a library name is 1-48 lower-case letters, digits, '_' or '-', starting with a letter or digit; "
            f"got {str(name)[:60]!r}"
        )
    return name


def display_name(library: str, path: bytes) -> str:
    """``<library>/<library path>`` as text: how a library file is shown and stored as the row's ``filename``.
    Bytes that are not UTF-8 show as ``\\xNN`` escapes (the file itself is found by its exact bytes); like an
    upload's name (:func:`app.imaging.prepare.clean_filename`), control characters are dropped and the name is cut
    to 1,024 characters, which every backend stores (Milvus: at most 4,096 UTF-8 bytes)."""
    return clean_filename(f"{library}/{path.decode('utf-8', 'backslashreplace')}")


def split_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Exclusion globs from a comma-separated string or a list; blanks dropped, order kept, duplicates removed."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return tuple(dict.fromkeys(p.strip() for p in items if p and p.strip()))


@dataclass(frozen=True, slots=True)
class Library:
    """One photo library indexed in place.

    Attributes:
        name: :func:`validate_library_name`. roots: absolute folders, as given (not resolved: a mount point stays
            a mount point). excludes: globs matched against library paths (``**/@eaDir/**``).
        source: ``api`` (created through ``POST /libraries``) or ``env`` (``LIBRARY_ROOTS``, re-read at each start).
    """

    name: str
    roots: tuple[str, ...]
    excludes: tuple[str, ...] = ()
    source: str = "api"

    @classmethod
    def create(cls, name: str, roots: Sequence[str], excludes: Iterable[str] = (), source: str = "api") -> Library:
        """A checked library. Raises ``ValueError``: a bad name; no root, more than 16, one that is not absolute,
        or two with one folder name; more than 64 patterns, or one wcmatch cannot compile."""
        validate_library_name(name)
        cleaned = tuple(dict.fromkeys(os.path.normpath(str(r).strip()) for r in roots if str(r).strip()))
        if not cleaned:
            raise ValueError("a library needs at least one root folder")
        if len(cleaned) > MAX_ROOTS:
            raise ValueError(f"a library has at most {MAX_ROOTS} roots")
        for root in cleaned:
            if not os.path.isabs(root) or "\0" in root:
                raise ValueError(f"a root folder must be an absolute path, got {root[:200]!r}")
        if len(cleaned) > 1:
            names = [Path(r).name for r in cleaned]
            if len(set(names)) != len(names) or "" in names:
                raise ValueError(
                    "the roots of one library must have distinct folder names (the name is the first folder of "
                    f"each file's path): {', '.join(cleaned)[:300]}"
                )
        patterns = split_patterns(excludes)
        if len(patterns) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} exclusion patterns")
        for pattern in patterns:
            try:
                wcglob.compile(pattern, flags=GLOB_FLAGS)
            except Exception as exc:  # noqa: BLE001 - wcmatch raises several kinds for a bad pattern
                raise ValueError(f"bad exclusion pattern {pattern[:100]!r}: {exc}") from None
        return cls(name, cleaned, patterns, source)

    def root_prefixes(self) -> list[tuple[str, bytes]]:
        """``(root folder, library-path prefix)`` per root: ``b""`` for a single root, ``b"<folder name>/"`` each
        otherwise."""
        if len(self.roots) == 1:
            return [(self.roots[0], b"")]
        return [(r, os.fsencode(Path(r).name) + b"/") for r in self.roots]

    def excluded(self, path: bytes, extra: Sequence[str] = ()) -> bool:
        """Whether library path ``path`` matches one of :attr:`excludes` or ``extra`` (``LIBRARY_EXCLUDE``)."""
        patterns = self.excludes + tuple(extra)
        if not patterns:
            return False
        return compiled_patterns(patterns)(os.fsdecode(path))

    def folder_excluded(self, folder: bytes, extra: Sequence[str] = ()) -> bool:
        """Whether a whole folder (library path, no trailing ``/``) is excluded: a pattern ending in ``/**``
        matches it without its tail, so ``**/@eaDir/**`` prunes every ``@eaDir`` folder before it is listed."""
        patterns = tuple(p[:-3] for p in (*self.excludes, *extra) if p.endswith("/**") and len(p) > 3)
        if not patterns:
            return False
        return compiled_patterns(patterns)(os.fsdecode(folder))


def parse_library_roots(value: str) -> list[Library]:
    """Libraries from ``LIBRARY_ROOTS``: comma-separated ``name=/path`` entries; a name given twice gets both roots
    (``photos=/nas1,photos=/nas2``). Empty: none. Raises ``ValueError`` naming the bad entry."""
    roots: dict[str, list[str]] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, eq, path = entry.partition("=")
        if not eq or not path.strip():
            raise ValueError(f"LIBRARY_ROOTS entries are name=/absolute/path, got {entry[:200]!r}")
        roots.setdefault(validate_library_name(name.strip()), []).append(path.strip())
    return [Library.create(name, paths, source="env") for name, paths in roots.items()]
