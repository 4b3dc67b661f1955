"""The Gradio web UI mounted at ``/ui``: search by photo, words or both, results, large view, filters, links,
adding photos, duplicates and what the service runs.

A thin face on :class:`app.service.SearchService`, the object the REST API calls, in the same process (no HTTP to
itself): both decode, embed, rank and refuse identically. The service exists only once the lifespan has opened it,
so every handler asks ``get_service()`` at call time. What depends on the running service (the collection line,
whether words can be searched, whether a key is asked for) is filled in by the page's load event, which also runs
the search a link holds (:mod:`ui.query`).

The events a script may want have an ``api_name`` and can be driven with ``gradio_client``::

    from gradio_client import Client, handle_file
    ui = Client("http://localhost:8000/ui/")
    gallery, status, *_ = ui.predict(handle_file("cat.jpg"), "", "", "", [], "", "", 0, False, 20,
                                     api_name="/search")   # photo, words, but-not words, filters, top_k
    ui.predict(image_id, "", [], "", "", 0, False, 20, api_name="/similar")
    ui.predict(api_name="/stats")                          # "273 photos · model ... · backend pgvector"
"""

from __future__ import annotations

import html
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from cachetools import TTLCache

from app.api.security import AccessPolicy
from app.config import Settings
from app.errors import GraphNotBuiltError, ImageNotFoundError, ServiceError
from app.ids import image_id_for
from app.imaging.prepare import check_upload_size
from app.search.query import QueryTerm
from ui.files import LARGE_SIZE, original_file, preview_file, thumbnail_file
from ui.query import (
    BROWSER_FORMATS,
    FORMAT_CHOICES,
    UiFilters,
    UiQuery,
    caption,
    file_size,
    from_link,
    photos,
    to_link,
    when,
)

if TYPE_CHECKING:  # for annotations only: importing app.service pulls in the decoders and the model code
    from app.service import SearchService
    from app.stats import ServiceStats
    from app.vectordb.base import SearchHit

log = logging.getLogger(__name__)

#: How many runs of the search events may be in flight at once, all search events together. Gradio's default of 1
#: per event would queue every visitor behind each other although the service is thread-safe; a small bound keeps a
#: burst of large uploads from decoding many big images at once (the service's decode admission bounds it too).
CONCURRENCY_LIMIT = 4
#: Outputs of every search event (see ``outputs`` in build_ui).
N_OUTPUTS = 8
#: Duplicate groups shown at once, largest first.
DUPLICATE_GROUPS_SHOWN = 50
#: How often the duplicates job's progress is read while it runs, seconds.
JOB_POLL_S = 0.3
#: Results per page unless the link or the slider says otherwise (at most MAX_TOP_K): about five rows on a laptop.
UI_TOP_K = 20

#: Runs in the browser after each search: put the search in the address (``history.replaceState``), so the
#: address can be copied and opens the same search; an uploaded photo cannot travel in a link.
UPDATE_ADDRESS_JS = """(query) => {
    const next = location.pathname + (query || "");
    if (next !== location.pathname + location.search) history.replaceState(null, "", next);
}"""


#: Runs after a search on a phone: the photo box and the word boxes fill the screen, so the page scrolls to the
#: results (the search status line above them).
def stamp_js(n_inputs: int) -> str:
    """Frontend code run when a search is triggered, before it is sent: the last of its ``n_inputs`` inputs (a
    hidden number) becomes this tab's next trigger number. The server runs searches on several threads, which may
    start in another order than the browser triggered them (a filter's blur and the next filter's Enter within a few
    ms); the number lets the server drop one that an already started, later-triggered search supersedes."""
    return (
        f"(...args) => {{ const a = args.slice(0, {n_inputs}); "
        f"a[{n_inputs - 1}] = (window.__imageSearchSeq = (window.__imageSearchSeq || 0) + 1); return a; }}"
    )


SHOW_RESULTS_JS = """() => {
    if (window.innerWidth > 640) return;
    const status = document.getElementById("search-status");
    if (status && status.textContent.trim()) status.scrollIntoView({ block: "start" });
}"""

#: Runs once when the page loads: a photo pasted anywhere on the page (Ctrl+V / Cmd+V) goes to the search's photo
#: box, or to "Add" when that tab is open, as if it had been chosen there (the same upload, no type filter).
PASTE_JS = """() => {
    const box = (id) => document.getElementById(id);
    const pick = () => {
        const add = box("add-files");
        return add && add.offsetParent !== null ? add : box("query-file");
    };
    document.addEventListener("paste", async (event) => {
        const files = [...((event.clipboardData && event.clipboardData.files) || [])];
        const target = pick();
        if (!files.length || !target) return;
        event.preventDefault();
        let input = target.querySelector("input[type=file]");
        const clear = target.querySelector("button[aria-label='Clear']");
        if (!input && clear) {
            clear.click();
            for (let i = 0; i < 50 && !(input = target.querySelector("input[type=file]")); i++) {
                await new Promise((r) => setTimeout(r, 20));
            }
        }
        if (!input) return;
        const transfer = new DataTransfer();
        (input.multiple ? files : files.slice(0, 1)).forEach((f) => transfer.items.add(f));
        input.files = transfer.files;
        input.dispatchEvent(new Event("change", { bubbles: true }));
    });
}"""

#: Layout rules Gradio has no parameter for: results fill the page's width in as many columns as fit, grow with the
#: page instead of scrolling inside a box, and show the whole file name; the four tabs stay visible on a phone.
CSS = """
.photo-grid .grid-wrap { max-height: none !important; min-height: 0 !important; height: auto !important;
    overflow: visible !important; }
.photo-grid .grid-wrap.fixed-height { min-height: 0 !important; }
.photo-grid .grid-container { grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important; }
.dup-group .photo-grid .grid-container { grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)) !important; }
.photo-grid .caption-label {
    white-space: normal !important; overflow-wrap: anywhere; max-width: 100% !important;
}
.tab-wrapper .tab-container { flex-wrap: wrap !important; height: auto !important; overflow: visible !important; }
.tab-wrapper .overflow-menu { display: none !important; }
#large-view img { max-height: 80vh; object-fit: contain; }
@media (max-width: 640px) {
    #title h2 { font-size: 1.2rem; margin: 0; }
    #collection-line { font-size: 0.8rem; }
    #words-note { font-size: 0.8rem; }
}
"""


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts: the default theme loads its fonts from Google Fonts, and nothing
    may be loaded from outside the service."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


# --- state kept per browser tab ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Shown:
    """What the results area shows: the query, the filters it ran with and the hits so far (all pages)."""

    query: UiQuery | None = None
    filters: UiFilters | None = None
    hits: list[SearchHit] = field(default_factory=list)
    more: bool = False  # a full page came back: "Load more" may find more


def _escape(message: str) -> str:
    # Gradio renders messages as Markdown/HTML and these carry user-controlled text (file names, ids).
    return html.escape(message, quote=False)


@contextmanager
def _as_message(errors: list[str]) -> Iterator[None]:
    """Collect the service's domain errors (written for people; the REST API returns them as ``detail``) and bad
    filter values into ``errors`` instead of failing the event; anything else is a bug Gradio logs."""
    try:
        yield
    except (ServiceError, ValueError) as exc:
        errors.append(str(exc))


def _read_upload(path: str, settings: Settings) -> bytes:
    """The uploaded file's bytes; an over-size file is refused before it is read (413 rule of the service)."""
    check_upload_size(Path(path).stat().st_size, settings.max_upload_bytes)
    return Path(path).read_bytes()


def _filters(
    folder: str, formats: Sequence[str] | None, after: str, before: str, min_score: float, expand: bool, top_k: Any
) -> UiFilters:
    return UiFilters(
        top_k=int(top_k or 1),
        folder=(folder or "").strip(),
        formats=tuple(formats or ()),
        taken_after=(after or "").strip(),
        taken_before=(before or "").strip(),
        min_score=float(min_score) if min_score else None,
        expand=bool(expand),
    )


def _gallery(service: SearchService, hits: Sequence[SearchHit]) -> list[tuple[str, str]]:
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


def _run(service: SearchService, query: UiQuery, filters: UiFilters, offset: int) -> list[SearchHit]:
    """One page of results for ``query``: the same service call the REST endpoint for that kind makes."""
    k = service.resolve_top_k(filters.top_k)
    options = filters.options(offset)
    if query.kind == "id":
        return service.similar(query.image_id or "", k, options)
    if query.kind == "text":
        return service.search_text(query.text or "", k, options)
    data = _read_upload(query.upload, service.settings) if query.upload else None
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


def text_note(model_id: str, supports_text: bool) -> str:
    """What the words boxes say: a hint, or why they are off."""
    if supports_text:
        return "Describe what you look for (*a red bicycle by a wall*); add words to avoid under **But not**."
    return (
        f"Searching by words needs a CLIP model. This service runs **{_escape(model_id)}**, which compares photos "
        "only: search with a photo."
    )


def _stats(service: SearchService) -> ServiceStats | str:
    """The service's stats, or why they cannot be read now (the database is down...), in words."""
    try:
        return service.stats()
    except ServiceError as exc:
        return f"The collection cannot be read now: {_escape(str(exc))}"


def collection_line(service: SearchService, stats: ServiceStats | str | None = None) -> str:
    """``273 photos · model X (1280 dimensions) · backend pgvector``, or why it cannot be read; ``stats``: already
    read ones (one database count per page load)."""
    stats = _stats(service) if stats is None else stats
    if isinstance(stats, str):
        return stats
    return f"**{photos(stats.count)}** · model {stats.model} ({stats.dimension} dimensions) · backend {stats.backend}"


def about_text(service: SearchService, access: AccessPolicy, stats: ServiceStats | str | None = None) -> str:
    """The About tab: the collection in plain words, the model, its dimensions, the database, the key rules."""
    stats = _stats(service) if stats is None else stats
    count = stats if isinstance(stats, str) else f"The collection holds **{photos(stats.count)}**."
    model = service.embedder
    if access.has_keys:
        keys = "Adding and deleting photos need the service's API key" + (
            "; so does everything else." if access.reads_need_key else "; searching does not."
        )
    elif refusal := access.write_refusal():
        keys = _escape(refusal)
    else:
        keys = "No API key is set: anyone who can reach this page may add and delete photos."
    return "\n".join(
        [
            count,
            "",
            f"- Model: **{_escape(model.model_id)}** ({'photos and words' if model.supports_text else 'photos only'})",
            f"- Dimensions: **{model.dim}**",
            f"- Database: **{service.db.backend_name}**",
            f"- Runs on: {model.device}",
            f"- {keys}",
            "",
            "Scores are cosine similarity: 1 is identical, higher is closer. Everything here is also in the "
            "[REST API](/docs).",
        ]
    )


def _large_view(service: SearchService, hit: SearchHit) -> tuple[str, str, str]:
    """(image to show, details in Markdown, original to download) for one result."""
    meta = hit.metadata
    original = original_file(service, hit.id, meta.filename)
    shown = original if meta.format.upper() in BROWSER_FORMATS else thumbnail_file(service, hit.id, LARGE_SIZE)
    details = "\n".join(
        [
            f"### {_escape(meta.filename)}",
            f"- Score: **{hit.score:.4f}**",
            f"- Format: {meta.format} · {meta.width} × {meta.height} pixels · {file_size(meta.bytes)}",
            f"- Taken: {when(meta.taken_at)}",
            f"- Indexed: {when(meta.indexed_at)}",
            f"- Id: `{hit.id}`",
        ]
    )
    return shown, details, original


# --- the UI --------------------------------------------------------------------------------------------------------
def build_ui(get_service: Callable[[], SearchService], settings: Settings, access: AccessPolicy) -> gr.Blocks:
    """Build the Gradio Blocks app; :mod:`ui.mount` mounts it at ``/ui`` with ``gr.mount_gradio_app``.

    Args:
        get_service: returns the running :class:`SearchService` (created by the lifespan, after the UI is built).
        settings: the service's settings (page size bounds, upload limits, batch limits, duplicate threshold).
        access: the service's access rules: writes from the UI (add, delete, find duplicates) pass the same checks
            as the REST API's, with the key typed into the page's key box (or the login, with API_KEY_READS).
    """
    default_k = min(UI_TOP_K, settings.max_top_k)

    def may_write(keys: Sequence[str | None], request: gr.Request | None) -> None:
        """Raise ``gr.Error`` unless this write may go on: the same rules as the REST API's writes. ``keys``: what
        the page's key boxes hold (one on each tab that writes; a key typed in either counts)."""
        key = next((k.strip() for k in keys if k and k.strip()), None)
        if access.has_keys:
            # With API_KEY_READS the page sits behind Gradio's login, whose password is the key: a logged-in user
            # has shown it.
            logged_in = access.reads_need_key and request is not None and getattr(request, "username", None)
            if not (logged_in or access.key_is_valid(key)):
                raise gr.Error("Adding and deleting photos need the service's API key: type it into the key box.")
        elif refusal := access.write_refusal():
            raise gr.Error(_escape(refusal))

    # --- search ------------------------------------------------------------------------------------------------
    def show(shown: Shown, errors: list[str], elapsed: float) -> tuple[Any, ...]:
        """The search outputs: gallery, status, "Load more", address, state, large view hidden, and for a stored
        image's query the emptied photo box and the image's thumbnail as the query."""
        service = get_service()
        items = _gallery(service, shown.hits)
        photo = preview_image = gr.skip()
        if shown.query is not None and shown.query.image_id and not shown.query.upload:
            photo = None
            try:
                preview_image = thumbnail_file(service, shown.query.image_id or "")
            except ServiceError:
                preview_image = None
        if errors:
            status = "✗ " + _escape(errors[0])
        elif shown.query is None:
            status = ""
        elif not shown.hits:
            status = "No results: the collection is empty, or nothing passes the filters."
        else:
            status = f"{len(shown.hits)} results · {elapsed * 1000:.0f} ms"
        link = to_link(shown.query, shown.filters, default_k) if shown.filters and not errors else ""
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

    # Searches of one page can overlap (a filter typed, then another; several run at once, CONCURRENCY_LIMIT) and
    # finish in any order: only the one started last may write the results, or an older answer would overwrite a
    # newer one. Numbered per Gradio session (a browser tab), in memory, forgotten after an hour. The form's
    # searches also carry the browser's trigger number (stamp_js): one that starts after a later-triggered one has
    # started is dropped at once (threads may start in another order than the triggers).
    latest: TTLCache[str, int] = TTLCache(maxsize=10_000, ttl=3600)
    last_trigger: TTLCache[str, int] = TTLCache(maxsize=10_000, ttl=3600)
    numbers = itertools.count()
    latest_lock = threading.Lock()

    def begin(request: gr.Request | None, trigger: float | None = None) -> int | None:
        """This search's number, or ``None`` when a search the browser triggered later has already started."""
        number = next(numbers)
        if request is not None and request.session_hash:
            session = request.session_hash
            with latest_lock:
                if trigger:
                    if trigger < last_trigger.get(session, 0):
                        return None
                    last_trigger[session] = int(trigger)
                latest[session] = number
        return number

    def superseded(request: gr.Request | None, number: int) -> bool:
        if request is None or not request.session_hash:
            return False
        with latest_lock:
            return latest.get(request.session_hash, number) != number

    def search(
        query: UiQuery | None, filters: UiFilters, request: gr.Request | None = None, trigger: float | None = None
    ) -> tuple[Any, ...]:
        number = begin(request, trigger)
        if number is None:
            return (gr.skip(),) * N_OUTPUTS
        service = get_service()
        errors: list[str] = []
        shown = Shown(query, filters)
        start = time.perf_counter()
        if query is not None:
            with _as_message(errors):
                shown.hits = _run(service, query, filters, 0)
                shown.more = len(shown.hits) == filters.top_k
        if superseded(request, number):
            return (gr.skip(),) * N_OUTPUTS
        return show(shown, errors, time.perf_counter() - start)

    def search_form(
        shown: Shown,
        upload: str | None,
        text: str,
        negative: str,
        folder: str,
        formats: list[str],
        after: str,
        before: str,
        min_score: float,
        expand: bool,
        top_k: float,
        request: gr.Request,
        trigger: float | None = None,
    ):
        """Search with what the form holds: the photo (or the stored image shown as the query), the words, the
        "but not" words; filters and page size. ``trigger``: the browser's trigger number (none through the API)."""
        current = shown.query.image_id if shown.query is not None else None
        query = UiQuery.from_form(upload, text, negative, current)
        filters = _filters(folder, formats, after, before, min_score, expand, top_k)
        if query is None:
            return show(Shown(None, filters), ["Choose, drop or paste a photo, or type words, to search."], 0)
        return search(query, filters, request, trigger)

    def search_form_stamped(
        shown,
        upload,
        text,
        negative,
        folder,
        formats,
        after,
        before,
        min_score,
        expand,
        top_k,
        trigger,
        request: gr.Request,
    ):
        """:func:`search_form` from the page's button and Enter keys, with the browser's trigger number."""
        return search_form(
            shown, upload, text, negative, folder, formats, after, before, min_score, expand, top_k, request, trigger
        )

    def preview(upload: str | None) -> Any:
        """The query photo as a JPEG the server makes (HEIC and TIFF show too); nothing when it cannot decode."""
        if not upload:
            return None
        service = get_service()
        try:
            return preview_file(service, _read_upload(upload, service.settings))
        except ServiceError:
            return None  # the search itself says why

    def similar(image_id, folder, formats, after, before, min_score, expand, top_k, request: gr.Request):
        """More like this: the stored image's neighbours."""
        filters = _filters(folder, formats, after, before, min_score, expand, top_k)
        return search(UiQuery("id", image_id=image_id), filters, request)

    def rerun(shown: Shown, folder, formats, after, before, min_score, expand, top_k, trigger, request: gr.Request):
        """A filter changed: run the shown query again with the new filters (nothing when they did not change)."""
        filters = _filters(folder, formats, after, before, min_score, expand, top_k)
        if shown.query is None or filters == shown.filters:
            return (gr.skip(),) * N_OUTPUTS
        return search(shown.query, filters, request, trigger)

    def load_more(shown: Shown, request: gr.Request) -> tuple[Any, ...]:
        """The next page, appended."""
        if shown.query is None or shown.filters is None:
            return (gr.skip(),) * N_OUTPUTS
        number = begin(request)
        assert number is not None  # no trigger number: never dropped at the start
        service = get_service()
        errors: list[str] = []
        start = time.perf_counter()
        with _as_message(errors):
            page = _run(service, shown.query, shown.filters, len(shown.hits))
            shown = replace(shown, hits=shown.hits + page, more=len(page) == shown.filters.top_k)
        if superseded(request, number):
            return (gr.skip(),) * N_OUTPUTS
        return show(shown, errors, time.perf_counter() - start)

    def open_view(shown: Shown, event: gr.SelectData) -> tuple[Any, ...]:
        """A result was chosen: its large view."""
        index = event.index if isinstance(event.index, int) else 0
        if not 0 <= index < len(shown.hits):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        hit = shown.hits[index]
        try:
            image, details, original = _large_view(get_service(), hit)
        except ServiceError as exc:
            raise gr.Error(_escape(str(exc))) from exc
        return gr.update(visible=True), image, details, gr.update(value=original, visible=True), hit.id

    # --- page load ---------------------------------------------------------------------------------------------
    def on_load(request: gr.Request) -> tuple[Any, ...]:
        """Per page: the collection line, words on or off, key boxes, filters and the search from the address."""
        service = get_service()
        stats = _stats(service)
        text_ok = service.supports_text
        link = from_link(dict(request.query_params) if request else {}, default_k, settings.max_top_k)
        f = link.filters
        results = search(link.query, f, request) if link.query is not None else (gr.skip(),) * N_OUTPUTS
        if link.problems:
            gr.Warning(_escape(" ".join(link.problems)))
        key_box = gr.update(visible=access.has_keys and not access.reads_need_key)
        return (
            collection_line(service, stats),
            about_text(service, access, stats),
            text_note(service.embedder.model_id, text_ok),
            gr.update(interactive=text_ok, value=(link.query.text or "") if link.query and text_ok else ""),
            gr.update(interactive=text_ok, value=(link.query.negative or "") if link.query and text_ok else ""),
            f.folder,
            list(f.formats),
            f.taken_after,
            f.taken_before,
            f.min_score or 0,
            f.expand,
            gr.update(value=f.top_k, maximum=settings.max_top_k),
            key_box,
            key_box,
            *results,
        )

    def stats() -> str:
        """The collection line, ``273 photos · model X (D dimensions) · backend B``."""
        return collection_line(get_service())

    # --- add -----------------------------------------------------------------------------------------------------
    def add(
        files: list[str] | None,
        key: str,
        other_key: str,
        request: gr.Request,
        progress=gr.Progress(),
    ) -> tuple[Any, ...]:
        """Index the chosen files in batches within MAX_BATCH_FILES and MAX_BATCH_MB; one ✓/✗ row per file."""
        may_write([key, other_key], request)
        if not files:
            raise gr.Error("Choose, drop or paste photos to add.")
        service = get_service()
        s = service.settings
        rows: list[list[str]] = []
        batch: list[tuple[bytes, str]] = []
        batch_bytes = 0
        done = 0
        progress((0, len(files)), desc="Adding", unit="photos")

        def flush() -> None:
            nonlocal batch, batch_bytes, done
            if not batch:
                return
            try:
                results = service.index_images(batch)
            except ServiceError as exc:  # the whole batch (database down, disk full): nothing of it is stored
                rows.extend(["✗", name, str(exc)] for _, name in batch)
            else:
                for r in results:
                    if r.status == "error":
                        rows.append(["✗", r.filename, str(r.error)])
                    else:
                        rows.append(
                            ["✓", r.filename, "added" if r.status == "indexed" else "already in the collection"]
                        )
            done += len(batch)
            progress((done, len(files)), desc="Adding", unit="photos")
            batch, batch_bytes = [], 0

        for path in files:
            name = Path(path).name  # Gradio keeps the uploaded file's own name as the last path component
            size = Path(path).stat().st_size
            try:
                check_upload_size(size, s.max_upload_bytes)
            except ServiceError as exc:
                rows.append(["✗", name, str(exc)])
                done += 1
                continue
            if batch and (len(batch) >= s.max_batch_files or batch_bytes + size > s.max_batch_bytes):
                flush()
            batch.append((Path(path).read_bytes(), name))
            batch_bytes += size
        flush()
        added = sum(1 for r in rows if r[0] == "✓")
        summary = f"{added} of {len(rows)} added or already there; {len(rows) - added} refused."
        return summary, rows, collection_line(service), gr.update(value=None)

    # --- duplicates ----------------------------------------------------------------------------------------------
    def groups(threshold: float) -> tuple[Any, str]:
        """The near-duplicate groups of the last neighbour graph at ``threshold``, largest first."""
        service = get_service()
        try:
            page = service.neighbours.duplicates(float(threshold), 0, DUPLICATE_GROUPS_SHOWN)
        except GraphNotBuiltError:
            return [], "No duplicate search has run yet: press **Find duplicates**."
        except ServiceError as exc:
            return [], "✗ " + _escape(str(exc))
        found = [
            {"ids": list(g.ids), "filenames": names, "min": g.min_score, "max": g.max_score} for g, names in page.groups
        ]
        built = when(page.graph_built_at)
        if not page.total:
            return found, f"No photos are this alike (similarity ≥ {page.threshold:.2f}); graph of {built}."
        shown = f"the {len(found)} largest of " if page.total > len(found) else ""
        return found, f"Showing {shown}{page.total} groups at similarity ≥ {page.threshold:.2f} (graph of {built})."

    def find_duplicates(threshold: float, key: str, other_key: str, request: gr.Request, progress=gr.Progress()):
        """Build the neighbour graph (the job of ``POST /jobs/neighbours``), with progress, then list the groups."""
        may_write([key, other_key], request)
        service = get_service()
        job, _ = service.neighbours.start()
        while job.state in ("queued", "running"):
            fraction = 1.0 if not job.total else min(1.0, job.done / job.total)
            progress(fraction, desc=f"Comparing photos ({job.phase})")
            time.sleep(JOB_POLL_S)
            job = service.neighbours.job(job.id)
        if job.state != "completed":
            raise gr.Error(_escape(f"The duplicate search stopped ({job.state}): {job.error or 'see the log'}"))
        return groups(threshold)

    def ask_delete(chosen: list[str] | None) -> tuple[Any, ...]:
        if not chosen:
            raise gr.Error("Tick the photos of the group to delete first.")
        n = len(chosen)
        what = "the originals and their search entries" if n > 1 else "the original and its search entry"
        question = f"Delete {photos(n)}? This removes {what}, and cannot be undone."
        return list(chosen), gr.update(visible=True), question

    def delete(pending: list[str], threshold: float, key: str, other_key: str, request: gr.Request) -> tuple[Any, ...]:
        """Delete the confirmed photos (``DELETE /image/{id}``'s service call), then list the groups again."""
        may_write([key, other_key], request)
        service = get_service()
        gone = 0
        for image_id in pending or []:
            try:
                service.delete_image(image_id)
                gone += 1
            except ImageNotFoundError:
                pass
        found, status = groups(threshold)
        gr.Info(f"Deleted {photos(gone)}.")
        return [], gr.update(visible=False), found, status, collection_line(service)

    # --- layout --------------------------------------------------------------------------------------------------
    # delete_cache: uploads and the files ui/files.py writes older than an hour are removed every 10 minutes (and
    # this app's own when the server stops).
    with gr.Blocks(title="Image similarity search", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        shown_state = gr.State(Shown())
        selected_id = gr.State("")
        groups_state = gr.State([])
        pending_delete = gr.State([])
        # The search's address query string (ui.query.to_link); a change puts it in the address bar.
        share = gr.Textbox(visible="hidden", elem_id="share-query")

        with gr.Row(equal_height=True):
            gr.Markdown("## Image similarity search", elem_id="title")
            collection = gr.Markdown("Loading…", elem_id="collection-line")
        with gr.Tabs():
            with gr.Tab("Search", id="search", elem_id="tab-search"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        query_file = gr.File(
                            label="Photo: choose, drop here or paste (Ctrl+V)",
                            file_count="single",
                            type="filepath",
                            height=140,
                            elem_id="query-file",
                        )
                        query_preview = gr.Image(
                            label="Query", interactive=False, height=180, elem_id="query-preview", buttons=[]
                        )
                    with gr.Column(scale=2, min_width=260):
                        words_note = gr.Markdown(elem_id="words-note")
                        words = gr.Textbox(
                            label="Words", placeholder="a dog on a beach", interactive=False, elem_id="words"
                        )
                        negative = gr.Textbox(
                            label="But not", placeholder="people", interactive=False, elem_id="negative"
                        )
                        search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                with gr.Accordion("Filters and options", open=False, elem_id="filters"):
                    with gr.Row():
                        folder = gr.Textbox(label="Folder", placeholder="trips/2024", elem_id="filter-folder")
                        taken_after = gr.Textbox(label="Taken from (YYYY-MM-DD)", elem_id="filter-taken-after")
                        taken_before = gr.Textbox(label="Taken until (YYYY-MM-DD)", elem_id="filter-taken-before")
                    formats = gr.CheckboxGroup(list(FORMAT_CHOICES), label="Formats", elem_id="filter-formats")
                    with gr.Row():
                        min_score = gr.Slider(
                            0, 1, value=0, step=0.01, label="Minimum score", elem_id="filter-min-score"
                        )
                        top_k = gr.Slider(
                            1, settings.max_top_k, value=default_k, step=1, label="Results per page", elem_id="top-k"
                        )
                        expand = gr.Checkbox(label="Query expansion (αQE)", elem_id="filter-expand")
                status = gr.Markdown(elem_id="search-status")
                with gr.Column(visible=False, elem_id="large-view") as view:
                    with gr.Row():
                        view_image = gr.Image(
                            label="Large view", interactive=False, scale=2, elem_id="view-image", buttons=["fullscreen"]
                        )
                        with gr.Column(scale=1, min_width=240):
                            view_details = gr.Markdown(elem_id="view-details")
                            download = gr.DownloadButton("Download original", elem_id="download-original")
                            more_like = gr.Button("More like this", variant="primary", elem_id="more-like-this")
                            close_view = gr.Button("Close", size="sm", elem_id="close-view")
                results = gr.Gallery(
                    label="Results (rank · score · file name)",
                    columns=4,
                    height="auto",
                    object_fit="cover",
                    allow_preview=False,
                    interactive=False,
                    elem_id="results",
                    elem_classes=["photo-grid"],
                )
                more_button = gr.Button("Load more", visible=False, elem_id="load-more")

            with gr.Tab("Add", id="add", elem_id="tab-add"):
                add_files = gr.File(
                    label="Photos to add: choose, drop here or paste (any format)",
                    file_count="multiple",
                    type="filepath",
                    elem_id="add-files",
                )
                key_add = gr.Textbox(label="API key", type="password", visible=False, elem_id="key-add")
                add_button = gr.Button("Add to the collection", variant="primary", elem_id="add-button")
                add_summary = gr.Markdown(elem_id="add-summary")
                add_table = gr.Dataframe(
                    headers=["", "File", "Result"],
                    datatype=["str", "str", "str"],
                    interactive=False,
                    wrap=True,
                    elem_id="add-results",
                )

            with gr.Tab("Duplicates", id="duplicates", elem_id="tab-duplicates") as duplicates_tab:
                gr.Markdown("Groups of near-identical photos, from the last duplicate search.")
                with gr.Row():
                    threshold = gr.Slider(
                        0.5,
                        1.0,
                        value=settings.duplicate_threshold,
                        step=0.01,
                        label="Similarity at least",
                        elem_id="dup-threshold",
                    )
                    key_dup = gr.Textbox(label="API key", type="password", visible=False, elem_id="key-dup")
                find_button = gr.Button("Find duplicates", variant="primary", elem_id="find-duplicates")
                dup_status = gr.Markdown(elem_id="dup-status")
                with gr.Row(visible=False, elem_id="confirm-delete") as confirm_row:
                    confirm_text = gr.Markdown()
                    confirm_button = gr.Button("Delete", variant="stop", elem_id="confirm-delete-button")
                    cancel_button = gr.Button("Cancel", elem_id="cancel-delete-button")

                @gr.render(inputs=groups_state)
                def render_groups(found: list[dict]) -> None:
                    service = get_service()
                    for n, group in enumerate(found, start=1):
                        with gr.Group(elem_classes=["dup-group"]):
                            gr.Markdown(
                                f"**Group {n}** · {photos(len(group['ids']))} · similarity "
                                f"{group['min']:.3f}–{group['max']:.3f}"
                            )
                            thumbs = []
                            for image_id, name in zip(group["ids"], group["filenames"], strict=True):
                                try:
                                    thumbs.append((thumbnail_file(service, image_id), name))
                                except ServiceError:
                                    continue
                            gr.Gallery(
                                thumbs,
                                columns=4,
                                height="auto",
                                allow_preview=False,
                                interactive=False,
                                show_label=False,
                                elem_classes=["photo-grid"],
                            )
                            chosen = gr.CheckboxGroup(
                                [
                                    (name, image_id)
                                    for image_id, name in zip(group["ids"], group["filenames"], strict=True)
                                ],
                                label="Photos to delete",
                                elem_classes=["dup-choose"],
                            )
                            ask = gr.Button("Delete chosen…", size="sm", variant="stop", elem_classes=["dup-delete"])
                            ask.click(ask_delete, chosen, [pending_delete, confirm_row, confirm_text])

            with gr.Tab("About", id="about", elem_id="tab-about"):
                about = gr.Markdown(elem_id="about")
                refresh = gr.Button("Refresh", size="sm")

        filters = [folder, formats, taken_after, taken_before, min_score, expand, top_k]
        outputs = [results, status, more_button, share, shown_state, view, query_file, query_preview]
        assert len(outputs) == N_OUTPUTS
        run = dict(outputs=outputs, concurrency_limit=CONCURRENCY_LIMIT, concurrency_id="search")
        form = [shown_state, query_file, words, negative, *filters]
        # The browser's trigger number of each search of the form (stamp_js; the "search" API has none).
        trigger = gr.Number(value=0, precision=0, visible=False)
        stamped_form = [*form, trigger]
        stamped_rerun = [shown_state, *filters, trigger]

        share.change(None, share, js=UPDATE_ADDRESS_JS, api_visibility="private", queue=False)
        status.change(None, js=SHOW_RESULTS_JS, api_visibility="private", queue=False)

        query_file.upload(search_form, form, api_name="search", **run)
        query_file.upload(preview, query_file, query_preview, api_visibility="private")
        query_file.clear(lambda: None, None, query_preview, api_visibility="private")
        for submitted in (search_button.click, words.submit, negative.submit):
            submitted(
                search_form_stamped, stamped_form, js=stamp_js(len(stamped_form)), api_visibility="private", **run
            )
        for textbox in (folder, taken_after, taken_before):
            for event in (textbox.submit, textbox.blur):
                event(rerun, stamped_rerun, js=stamp_js(len(stamped_rerun)), api_visibility="private", **run)
        for changed in (formats.input, expand.input, min_score.release, top_k.release):
            changed(rerun, stamped_rerun, js=stamp_js(len(stamped_rerun)), api_visibility="private", **run)
        more_button.click(load_more, shown_state, api_visibility="private", **run)
        results.select(open_view, shown_state, [view, view_image, view_details, download, selected_id])
        more_like.click(similar, [selected_id, *filters], api_name="similar", **run)
        close_view.click(lambda: gr.update(visible=False), None, view, api_visibility="private")

        add_button.click(
            add,
            [add_files, key_add, key_dup],
            [add_summary, add_table, collection, add_files],
            api_name="add",
            concurrency_limit=1,
        )

        duplicates_tab.select(groups, threshold, [groups_state, dup_status], api_visibility="private")
        threshold.release(groups, threshold, [groups_state, dup_status], api_visibility="private")
        find_button.click(
            find_duplicates,
            [threshold, key_dup, key_add],
            [groups_state, dup_status],
            api_name="find_duplicates",
            concurrency_limit=1,
        )
        confirm_button.click(
            delete,
            [pending_delete, threshold, key_dup, key_add],
            [pending_delete, confirm_row, groups_state, dup_status, collection],
            api_visibility="private",
        )
        cancel_button.click(
            lambda: ([], gr.update(visible=False)), None, [pending_delete, confirm_row], api_visibility="private"
        )

        refresh.click(stats, None, collection, api_name="stats")
        refresh.click(lambda: about_text(get_service(), access), None, about, api_visibility="private")
        demo.load(
            on_load,
            None,
            [
                collection,
                about,
                words_note,
                words,
                negative,
                *filters,
                key_add,
                key_dup,
                *outputs,
            ],
            api_visibility="private",
        )
    return demo
