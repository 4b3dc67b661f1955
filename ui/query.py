"""What a search in the web UI is, as plain data: the query, its filters, and how both travel in a shared link.

Pure functions and frozen dataclasses only (no Gradio, no service), so the rules are tested without a browser:
:class:`UiQuery` is what is searched (a photo, a stored image's id, words, "but not" words), :class:`UiFilters` the
accordion's filters and page size; :func:`from_link` reads both from a page address's query parameters and
:func:`to_link` writes them back (``?id=<image id>&top_k=10&formats=JPEG``), so a copied address opens the same
search. An uploaded photo cannot travel in a link (it is not stored); "More like this" on any result can.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from urllib.parse import urlencode

from app.api.search_params import MAX_MIN_SIZE
from app.ids import is_valid_image_id
from app.search.paging import SearchOptions
from app.vectordb.base import SearchFilter, SearchHit

#: Formats offered in the filter, as the decoder names them (``ImageMetadata.format``).
FORMAT_CHOICES = ("JPEG", "PNG", "HEIF", "AVIF", "WEBP", "GIF", "TIFF", "BMP")

#: Formats every current browser shows as they are; the large view shows the others as a JPEG the server makes.
BROWSER_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP"})

QueryKind = Literal["image", "id", "text", "combined"]

#: The filters' names as the page labels them (messages about them use the same words).
TAKEN_FROM = "Taken from"
TAKEN_UNTIL = "Taken until"
ADDED_FROM = "Added from"
ADDED_UNTIL = "Added until"
MIN_WIDTH = "Minimum width"
MIN_HEIGHT = "Minimum height"


@dataclass(frozen=True, slots=True)
class UiQuery:
    """What one search looks for.

    Attributes:
        kind: ``image`` (an uploaded photo), ``id`` (a stored image: "More like this" and links), ``text`` (words,
            CLIP models only) or ``combined`` (a photo or a stored image and/or words, minus "but not" words).
        upload: path of the uploaded photo in Gradio's upload folder (``image`` and ``combined``).
        image_id: SHA-256 hex of a stored image (``id`` and ``combined``).
        text: the words to look for; ``negative``: the words to look away from.
    """

    kind: QueryKind
    upload: str | None = None
    image_id: str | None = None
    text: str | None = None
    negative: str | None = None

    @classmethod
    def from_form(
        cls, upload: str | None, text: str | None, negative: str | None, image_id: str | None = None
    ) -> UiQuery | None:
        """The query the search form describes, or ``None`` when it has nothing to look for.

        ``image_id``: the stored image shown as the query ("More like this", a link), used when no photo is chosen,
        so "like this result, but not these words" works. A photo alone is ``image``, a stored image alone ``id``,
        words alone ``text``, anything else ``combined``.
        """
        text, negative = (text or "").strip() or None, (negative or "").strip() or None
        image_id = None if upload else image_id
        if not (upload or image_id or text):
            return None
        if not text and not negative:
            return cls("image", upload=upload) if upload else cls("id", image_id=image_id)
        if text and not upload and not image_id and not negative:
            return cls("text", text=text)
        return cls("combined", upload=upload, image_id=image_id, text=text, negative=negative)

    @property
    def shareable(self) -> bool:
        """Whether a link can hold this query (an upload is not stored, so it cannot)."""
        return self.upload is None


@dataclass(frozen=True, slots=True)
class UiFilters:
    """The filter accordion: folder, formats, taken between two dates, added (indexed) between two dates, minimum
    width and height, minimum score, expansion, page size.

    Dates are ``YYYY-MM-DD`` strings as typed, days in UTC (``taken_before`` and ``indexed_before`` include their
    whole day); ``formats`` are decoder names; ``min_width``/``min_height`` pixels (``None``: any); ``top_k``
    results per page.
    """

    top_k: int
    folder: str = ""
    formats: tuple[str, ...] = ()
    taken_after: str = ""
    taken_before: str = ""
    min_score: float | None = None
    expand: bool = False
    indexed_after: str = ""
    indexed_before: str = ""
    min_width: int | None = None
    min_height: int | None = None

    def options(self, offset: int = 0) -> SearchOptions:
        """The service's :class:`SearchOptions` for one page starting at ``offset``: the same
        :class:`SearchFilter` the REST API builds from ``taken_after``... ``min_height``, a day ``D`` "until"
        becoming ``before D+1 00:00 UTC``.

        Raises ``ValueError``, in the page's words, for a date that is not ``YYYY-MM-DD``, a range that ends before
        it starts, or a minimum size that is not 0 to :data:`MAX_MIN_SIZE` pixels (the handler shows it as a
        message; :meth:`SearchFilter.create` owns the rules).
        """
        dates = {}
        for kind, (start, end) in (
            ("taken", ((self.taken_after, TAKEN_FROM), (self.taken_before, TAKEN_UNTIL))),
            ("indexed", ((self.indexed_after, ADDED_FROM), (self.indexed_before, ADDED_UNTIL))),
        ):
            after, before = _day(*start), _day(*end)
            if after is not None and before is not None and after > before:
                raise ValueError(f"{start[1]} ({after}) must be on or before {end[1]} ({before}).")
            dates[f"{kind}_after"] = None if after is None else datetime.combine(after, time(), UTC)
            dates[f"{kind}_before"] = (
                None if before is None else datetime.combine(before + timedelta(days=1), time(), UTC)
            )
        filters = SearchFilter.create(
            path_prefix=self.folder or None,
            formats=self.formats or None,
            min_width=_pixels(self.min_width, MIN_WIDTH),
            min_height=_pixels(self.min_height, MIN_HEIGHT),
            **dates,
        )
        return SearchOptions(
            offset=offset,
            min_score=self.min_score,
            expand=self.expand,
            filters=None if filters.empty else filters,
        ).checked()


def _pixels(value: float | None, label: str) -> int | None:
    """A minimum size as a whole number of pixels, ``None`` for none; raises ``ValueError`` outside 0 to
    :data:`MAX_MIN_SIZE` or for a fraction (the REST API's bounds for ``min_width``/``min_height``)."""
    if value is None:
        return None
    if not 0 <= value <= MAX_MIN_SIZE or value != int(value):  # the range first: int() refuses inf
        raise ValueError(f"{label} must be a whole number of pixels from 0 to {MAX_MIN_SIZE:,}, got {value:g}.")
    return int(value)


def _day(value: str | date | None, label: str) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip()[:10])
    except ValueError:
        raise ValueError(f"{label} must be a date like 2024-07-31, got {str(value)[:40]!r}.") from None


@dataclass(frozen=True, slots=True)
class Link:
    """What a page address asks for: a query (or none) and its filters."""

    query: UiQuery | None
    filters: UiFilters
    problems: list[str] = field(default_factory=list)


def from_link(params: Mapping[str, str], default_top_k: int, max_top_k: int) -> Link:
    """Read ``id``, ``text``, ``not``, ``top_k``, ``folder``, ``formats``, ``taken_after``, ``taken_before``,
    ``indexed_after``, ``indexed_before``, ``min_width``, ``min_height``, ``min_score`` and ``expand`` from a page
    address's query parameters (the REST API's names).

    Unknown parameters are ignored; a value that does not parse is dropped with a line in ``problems`` (the page
    says so instead of failing), so a hand-edited link still opens.
    """
    problems: list[str] = []
    top_k = default_top_k
    if raw := params.get("top_k"):
        try:
            top_k = max(1, min(max_top_k, int(raw)))
        except ValueError:
            problems.append(f"The link's results per page (top_k) must be a whole number, got {raw[:20]!r}.")
    min_score = None
    if raw := params.get("min_score"):
        try:
            min_score = max(-1.0, min(1.0, float(raw)))
        except ValueError:
            problems.append(f"The link's minimum score (min_score) must be a number, got {raw[:20]!r}.")
    formats = tuple(f for f in (params.get("formats") or "").upper().split(",") if f in FORMAT_CHOICES)
    values: dict = {}
    for name, label in (
        ("taken_after", TAKEN_FROM),
        ("taken_before", TAKEN_UNTIL),
        ("indexed_after", ADDED_FROM),
        ("indexed_before", ADDED_UNTIL),
    ):
        raw = (params.get(name) or "").strip()
        try:
            values[name] = "" if not raw else _day(raw, f"The link's {label.lower()} date ({name})").isoformat()
        except ValueError as exc:
            problems.append(str(exc))
            values[name] = ""
    for name, label in (("min_width", MIN_WIDTH), ("min_height", MIN_HEIGHT)):
        raw = (params.get(name) or "").strip()
        try:
            values[name] = _pixels(int(raw), label) or None if raw else None  # 0: no minimum
        except ValueError:
            problems.append(
                f"The link's {label.lower()} ({name}) must be a whole number of pixels from 0 to {MAX_MIN_SIZE:,}, "
                f"got {raw[:20]!r}."
            )
            values[name] = None
    filters = UiFilters(
        top_k=top_k,
        folder=(params.get("folder") or "").strip(),
        formats=formats,
        min_score=min_score,
        expand=(params.get("expand") or "").lower() in {"1", "true", "yes", "on"},
        **values,
    )
    query = None
    image_id, text, negative = params.get("id"), params.get("text"), params.get("not")
    if image_id and not is_valid_image_id(image_id):
        problems.append("The link's id is not an image id (64 hexadecimal characters).")
        image_id = None
    query = UiQuery.from_form(None, text, negative, image_id)
    return Link(query, filters, problems)


def to_link(query: UiQuery | None, filters: UiFilters, default_top_k: int) -> str:
    """The address's query string for a search (``?id=...&top_k=10``), ``""`` when it cannot be shared; defaults
    are left out so links stay short."""
    if query is None or not query.shareable:
        return ""
    params: dict[str, str] = {}
    if query.image_id:
        params["id"] = query.image_id
    if query.text:
        params["text"] = query.text
    if query.negative:
        params["not"] = query.negative
    if filters.top_k != default_top_k:
        params["top_k"] = str(filters.top_k)
    if filters.folder:
        params["folder"] = filters.folder
    if filters.formats:
        params["formats"] = ",".join(filters.formats)
    for name in ("taken_after", "taken_before", "indexed_after", "indexed_before"):
        if value := getattr(filters, name):
            params[name] = value
    for name in ("min_width", "min_height"):
        if value := getattr(filters, name):
            params[name] = str(value)
    if filters.min_score is not None:
        params["min_score"] = f"{filters.min_score:g}"
    if filters.expand:
        params["expand"] = "1"
    return "?" + urlencode(params) if params else ""


def with_top_k(filters: UiFilters, top_k: int) -> UiFilters:
    """``filters`` with another page size."""
    return replace(filters, top_k=top_k)


# --- words a person reads -------------------------------------------------------------------------------------
def photos(count: int) -> str:
    """``"1 photo"``, ``"273 photos"``, ``"12,345 photos"``."""
    return f"{count:,} photo" + ("" if count == 1 else "s")


def results_found(count: int, elapsed: float) -> str:
    """The search status line's count and time, ``count`` hits (one or more) in ``elapsed`` seconds:
    ``"1 result · 9 ms"``, ``"8 results · 12 ms"`` (the page's and the API's status alike; no thousands separator:
    scripts read the count as digits)."""
    return f"{count} result" + ("" if count == 1 else "s") + f" · {elapsed * 1000:.0f} ms"


def caption(rank: int, hit: SearchHit) -> str:
    """A result's caption: rank, cosine score with 3 decimals, and the full stored file name."""
    return f"#{rank} · {hit.score:.3f} · {hit.metadata.filename}"


def file_size(size: int) -> str:
    """Bytes in words: ``"1 byte"``, ``"812 bytes"``, ``"3.3 kB"``, ``"12.4 MB"`` (SI units: 1 MB = 10^6 bytes,
    as MAX_UPLOAD_MB and the other limits count)."""
    if size < 1000:
        return f"{size} byte" + ("" if size == 1 else "s")
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def when(value: datetime | None) -> str:
    """A timestamp for people: ``2024-07-31 14:05 UTC`` (or the offset it was taken in), ``unknown`` for none."""
    if value is None:
        return "unknown"
    offset = value.utcoffset()
    zone = "UTC" if offset in (None, timedelta(0)) else value.strftime("%z")
    return f"{value:%Y-%m-%d %H:%M} {zone}"
