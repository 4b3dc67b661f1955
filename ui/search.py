"""The search events' handlers and what they run: :class:`Shown` (what the results area shows, per browser tab),
the service call a :class:`~ui.query.UiQuery` makes, the results gallery, :class:`SearchOrder` (which of
overlapping searches may write the results) and :class:`Searches`, whose methods the Search tab's events and the
page's load event call. The tab's components and their wiring are in :mod:`ui.search_tab`."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import gradio as gr
from cachetools import TTLCache

from app.errors import ServiceError
from app.ids import image_id_for
from app.search.paging import MAX_SEARCH_WINDOW
from app.search.query import QueryTerm
from ui.context import UiContext, as_message, escape, read_stats, read_upload
from ui.files import preview_file, thumbnail_file
from ui.query import UiFilters, UiQuery, caption, results_found, to_link, with_top_k

if TYPE_CHECKING:  # for annotations only: importing app.service pulls in the decoders and the model code
    from app.service import SearchService
    from app.vectordb.base import SearchHit

log = logging.getLogger(__name__)

#: Outputs of every search event (see ``SearchTab.outputs`` in ui.search_tab).
N_OUTPUTS = 8
#: Where the status line is among them.
STATUS_OUTPUT = 1

#: What the page says while the collection is empty (at load, and for a search that finds nothing).
EMPTY_COLLECTION = (
    "The collection is empty: add photos on the **Add** tab first (or index a folder, **Libraries**), then search here."
)
#: What a search says when the photo searched with is in the collection itself.
OWN_PHOTO = "Your photo is in the collection: it is left out of its own results."


@dataclass(slots=True)
class Shown:
    """What the results area shows: the query, the filters it ran with and the hits so far (all pages)."""

    query: UiQuery | None = None
    filters: UiFilters | None = None
    hits: list[SearchHit] = field(default_factory=list)
    more: bool = False  # a full page came back: "Load more" may find more


def filters_from(
    folder: str | None,
    formats: Sequence[str] | None,
    after: str | None,
    before: str | None,
    added_after: str | None,
    added_before: str | None,
    min_width: float | None,
    min_height: float | None,
    min_score: float | None,
    expand: bool | None,
    top_k: Any,
) -> UiFilters:
    """The filters and page size the form's boxes hold, in the order of ``SearchTab.filters`` (ui.search_tab): an
    empty box, a minimum score of 0 and a minimum size of 0 (or none) are no filter."""
    return UiFilters(
        top_k=int(top_k or 1),
        folder=(folder or "").strip(),
        formats=tuple(formats or ()),
        taken_after=(after or "").strip(),
        taken_before=(before or "").strip(),
        indexed_after=(added_after or "").strip(),
        indexed_before=(added_before or "").strip(),
        min_width=min_width or None,
        min_height=min_height or None,
        min_score=float(min_score) if min_score else None,
        expand=bool(expand),
    )


def gallery(service: SearchService, hits: Sequence[SearchHit]) -> list[tuple[str, str]]:
    """Gallery items for hits: ``(thumbnail path, caption)``, best first. Thumbnails not made yet are decoded in
    parallel (PIL releases the GIL); a hit whose original cannot be read is left out with a log line."""

    def one(item: tuple[int, SearchHit]) -> tuple[str, str] | None:
        rank, hit = item
        try:
            return thumbnail_file(service, hit.id), caption(rank, hit)
        except ServiceError as exc:
            log.warning("Cannot show %s: %s", hit.metadata.filename, exc)
            return None

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(hits)))) as pool:
        items = list(pool.map(one, enumerate(hits, start=1)))
    return [item for item in items if item is not None]


def results_data(hits: Sequence[SearchHit], first_rank: int = 1) -> list[dict[str, Any]]:
    """Hits as plain data for the Gradio API (``gradio_client``): one dict per result, best first, with the
    ``id`` that ``/similar`` and ``/open`` take, the cosine ``score`` and the stored metadata (sizes in pixels and
    bytes, times in ISO 8601, ``taken_at`` ``None`` without EXIF date), as the REST API's results carry them."""
    return [
        {
            "rank": rank,
            "id": hit.id,
            "score": hit.score,
            "filename": hit.metadata.filename,
            "format": hit.metadata.format,
            "width": hit.metadata.width,
            "height": hit.metadata.height,
            "bytes": hit.metadata.bytes,
            "taken_at": hit.metadata.taken_at.isoformat() if hit.metadata.taken_at else None,
            "indexed_at": hit.metadata.indexed_at.isoformat(),
        }
        for rank, hit in enumerate(hits, start=first_rank)
    ]


def status_line(query: UiQuery | None, hits: Sequence[SearchHit], errors: Sequence[str], elapsed: float) -> str:
    """The search status: ``8 results · 12 ms``, why there are none, or ``✗`` and what went wrong."""
    if errors:
        return "✗ " + escape(errors[0])
    if query is None:
        return ""
    if not hits:
        return "No results: the collection is empty, or nothing passes the filters."
    return results_found(len(hits), elapsed)


def run_query(service: SearchService, query: UiQuery, filters: UiFilters, offset: int) -> list[SearchHit]:
    """One page of results for ``query``: the same service call the REST endpoint for that kind makes.

    A page that would reach past the one search window a page is cut from (MAX_SEARCH_WINDOW results, the query
    image left out) is shortened to end there; past its end there are no more pages (``[]``)."""
    k = service.resolve_top_k(filters.top_k)
    # One more slot for the query image, which the service may leave out of its own results.
    k = min(k, MAX_SEARCH_WINDOW - 1 - offset)
    if k <= 0:
        return []
    options = filters.options(offset)
    if query.kind == "id":
        return service.similar(query.image_id or "", k, options)
    if query.kind == "text":
        return service.search_text(query.text or "", k, options)
    data = read_upload(query.upload, service.settings) if query.upload else None
    if query.kind == "image" and data is not None:
        return service.search_image(data, k, options)
    positive: list[QueryTerm] = [QueryTerm(image_id=query.image_id)] if query.image_id else []
    if data is not None:
        image_id = image_id_for(data)
        # An indexed photo counts by its id (left out of its own results); another by its embedding.
        if service.existing_ids([image_id]):
            positive.append(QueryTerm(image_id=image_id))
        else:
            positive.append(QueryTerm(vector=service.embed_query_image(data, image_id).tolist()))
    if query.text:
        positive.append(QueryTerm(text=query.text))
    negative = [QueryTerm(text=query.negative)] if query.negative else []
    return service.search_combined(positive, negative, k, options)


def active_filters(filters: UiFilters | None) -> int:
    """How many filters narrow a search (folder, formats, each date, each minimum size, minimum score): the status
    line says so."""
    if filters is None:
        return 0
    return sum(
        bool(x)
        for x in (
            filters.folder,
            filters.formats,
            filters.taken_after,
            filters.taken_before,
            filters.indexed_after,
            filters.indexed_before,
            filters.min_width,
            filters.min_height,
            filters.min_score,
        )
    )


def _upload_is_indexed(service: SearchService, query: UiQuery) -> bool:
    """Whether the photo searched with is stored in the collection (the service leaves it out of its own results)."""
    if not query.upload:
        return False
    data = read_upload(query.upload, service.settings)
    return bool(service.existing_ids([image_id_for(data)]))


class SearchOrder:
    """Which of a browser tab's overlapping searches may write the results.

    Searches of one page can overlap (a filter typed, then another; several run at once, CONCURRENCY_LIMIT) and
    finish in any order: only the one started last may write the results, or an older answer would overwrite a
    newer one. Numbered per Gradio session (a browser tab), in memory, forgotten after an hour. The form's searches
    also carry the browser's trigger number (``ui.assets.stamp_js``): one that starts after a later-triggered one
    has started is dropped at once (threads may start in another order than the triggers).
    """

    def __init__(self) -> None:
        self._latest: TTLCache[str, int] = TTLCache(maxsize=10_000, ttl=3600)
        self._last_trigger: TTLCache[str, int] = TTLCache(maxsize=10_000, ttl=3600)
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def begin(self, request: gr.Request | None, trigger: float | None = None) -> int | None:
        """This search's number, or ``None`` when a search the browser triggered later has already started."""
        number = next(self._numbers)
        if request is not None and request.session_hash:
            session = request.session_hash
            with self._lock:
                if trigger:
                    if trigger < self._last_trigger.get(session, 0):
                        return None
                    self._last_trigger[session] = int(trigger)
                self._latest[session] = number
        return number

    def superseded(self, request: gr.Request | None, number: int) -> bool:
        """Whether a search of the same tab started after search ``number``: its answer must not be shown."""
        if request is None or not request.session_hash:
            return False
        with self._lock:
            return self._latest.get(request.session_hash, number) != number


class Searches:
    """The search handlers of one built UI, which the page's events call (private events: scripts call the endpoints
    of :mod:`ui.api`, which call :meth:`search` too)."""

    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx
        self.order = SearchOrder()

    def show(self, shown: Shown, errors: list[str], elapsed: float, note: str = "") -> tuple[Any, ...]:
        """The search outputs: gallery, status, "Load more", address, state, large view hidden, and for a stored
        image's query the emptied photo box and the image's thumbnail as the query. ``note``: a sentence the status
        line adds (:data:`OWN_PHOTO`)."""
        service = self.ctx.get_service()
        items = gallery(service, shown.hits)
        photo = preview_image = gr.skip()
        if shown.query is not None and shown.query.image_id and not shown.query.upload:
            photo = None
            try:
                preview_image = thumbnail_file(service, shown.query.image_id or "")
            except ServiceError:
                preview_image = None
        if errors:
            status = "✗ " + escape(errors[0])
        elif shown.query is None:
            status = ""
        elif not shown.hits:
            stats = read_stats(service)
            if not isinstance(stats, str) and stats.count == 0:
                status = "No results: " + EMPTY_COLLECTION
            else:
                status = "No results: nothing passes the filters." if active_filters(shown.filters) else "No results."
        else:
            status = results_found(len(shown.hits), elapsed)
        if shown.query is not None and not errors:
            if on := active_filters(shown.filters):
                status += f" · {on} filter{'s' if on > 1 else ''} on (**Filters and options**)"
            if note:
                status += " · " + note
        link = to_link(shown.query, shown.filters, self.ctx.default_k) if shown.filters and not errors else ""
        return (
            items,
            status,
            gr.update(visible=shown.more and not errors),
            link,
            shown,
            gr.update(visible=False),
            photo,
            preview_image,
        )

    def search(
        self, query: UiQuery | None, filters: UiFilters, request: gr.Request | None = None, trigger: float | None = None
    ) -> tuple[Any, ...]:
        """The first page of ``query``'s results, unless a later search of the same tab overtakes it."""
        number = self.order.begin(request, trigger)
        if number is None:
            return (gr.skip(),) * N_OUTPUTS
        service = self.ctx.get_service()
        errors: list[str] = []
        shown = Shown(query, filters)
        start = time.perf_counter()
        note = ""
        if query is not None:
            with as_message(errors):
                shown.hits = run_query(service, query, filters, 0)
                shown.more = len(shown.hits) == filters.top_k
                note = OWN_PHOTO if _upload_is_indexed(service, query) else ""
        if self.order.superseded(request, number):
            return (gr.skip(),) * N_OUTPUTS
        return self.show(shown, errors, time.perf_counter() - start, note)

    def search_form(
        self,
        request: gr.Request,
        shown: Shown,
        upload: str | None,
        text: str,
        negative: str,
        *filter_values: Any,
        trigger: float | None = None,
    ):
        """Search with what the form holds: the photo (or the stored image shown as the query), the words, the
        "but not" words; ``filter_values``: the filters and page size as :func:`filters_from` takes them (the
        components of ``SearchTab.filters``, which Gradio passes by position). ``trigger``: the browser's trigger
        number. ``request`` comes first: Gradio hands it only to a parameter before ``*filter_values``."""
        current = shown.query.image_id if shown.query is not None else None
        query = UiQuery.from_form(upload, text, negative, current)
        filters = filters_from(*filter_values)
        if query is None:
            return self.show(Shown(None, filters), ["Choose, drop or paste a photo, or type words, to search."], 0)
        return self.search(query, filters, request, trigger)

    def search_form_stamped(
        self, request: gr.Request, trigger: float | None, shown: Shown, upload, text, negative, *filter_values: Any
    ):
        """:meth:`search_form` from the page's button and Enter keys, with the browser's trigger number (the first
        input: ``ui.assets.stamp_js``)."""
        return self.search_form(request, shown, upload, text, negative, *filter_values, trigger=trigger)

    def clear(self) -> tuple[Any, ...]:
        """The photo box was cleared: no search, no results, no link (the outputs of an empty search)."""
        return self.show(Shown(), [], 0)

    def preview(self, upload: str | None) -> Any:
        """The query photo as a JPEG the server makes (HEIC and TIFF show too); nothing when it cannot decode."""
        if not upload:
            return None
        service = self.ctx.get_service()
        try:
            return preview_file(service, read_upload(upload, service.settings))
        except ServiceError:
            return None  # the search itself says why

    def similar(self, request: gr.Request, image_id: str, *filter_values: Any):
        """More like this: the stored image's neighbours, with the filters of ``filter_values`` (as
        :meth:`search_form` takes them)."""
        return self.search(UiQuery("id", image_id=image_id), filters_from(*filter_values), request)

    def rerun(self, request: gr.Request, trigger: float | None, shown: Shown, *filter_values: Any):
        """A filter changed: run the shown query again with the new filters (``filter_values``, as
        :meth:`search_form` takes them; nothing when they did not change). ``trigger``: the browser's trigger
        number (the first input: ``ui.assets.stamp_js``)."""
        filters = filters_from(*filter_values)
        if shown.query is None or filters == shown.filters:
            return (gr.skip(),) * N_OUTPUTS
        return self.search(shown.query, filters, request, trigger)

    def load_more(self, shown: Shown, top_k: float, request: gr.Request) -> tuple[Any, ...]:
        """The next page, appended, of the size "Results per page" shows now (``top_k``): the search that a change
        of it started may not have answered yet, and the shown state still holds the old size."""
        if shown.query is None or shown.filters is None:
            return (gr.skip(),) * N_OUTPUTS
        if top_k and int(top_k) != shown.filters.top_k:
            shown = replace(shown, filters=with_top_k(shown.filters, int(top_k)))
        number = self.order.begin(request)
        assert number is not None  # no trigger number: never dropped at the start
        service = self.ctx.get_service()
        errors: list[str] = []
        start = time.perf_counter()
        with as_message(errors):
            page = run_query(service, shown.query, shown.filters, len(shown.hits))
            shown = replace(shown, hits=shown.hits + page, more=len(page) == shown.filters.top_k)
        if self.order.superseded(request, number):
            return (gr.skip(),) * N_OUTPUTS
        return self.show(shown, errors, time.perf_counter() - start)
