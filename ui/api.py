"""The Gradio API for scripts (``gradio_client``): what the page does, as named endpoints with named inputs and
outputs, results as data with their image ids (docs/web-ui.md#gradio-api).

The page's own events keep what a browser tab holds in hidden state (the result shown in the large view, the
results so far, the chosen duplicate groups), which a script cannot send, so they are private; each endpoint here is
an event of a trigger the page never shows, taking everything as parameters and calling the same handlers as the
page (:class:`ui.search.Searches`, :meth:`ui.add_tab.AddTab.add_files`, :class:`ui.duplicates_tab.DuplicatesTab`,
:func:`ui.large_view.view_content`). ``Client.view_api()`` names each parameter after the function's parameter and
each output after its component's label.

=====================  ================================================================================
``/search``            photo, words, but_not, filters, results_per_page → results, status
``/similar``           image_id, filters, results_per_page → results, status
``/open``              image_id → details, large_image, original
``/add``               photos, api_key → summary, files, collection
``/duplicates``        similarity → groups, status (the last duplicate search's groups)
``/find_duplicates``   similarity, api_key → groups, status (compares every photo first)
``/stats``             → collection (in plain text)
``/libraries``         → libraries (Markdown, as the Libraries tab shows them), names, scanning
``/scan_library``      library, force, api_key → message, libraries
=====================  ================================================================================
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import gradio as gr

from app.errors import ServiceError
from app.ids import is_valid_image_id
from app.vectordb.base import SearchHit
from ui.context import UiContext, as_message, escape, read_stats, refuse
from ui.large_view import view_content
from ui.query import UiFilters, UiQuery, photos
from ui.search import Searches, filters_from, results_data, run_query, status_line
from ui.search_tab import CONCURRENCY_LIMIT

if TYPE_CHECKING:
    from ui.add_tab import AddTab
    from ui.duplicates_tab import DuplicatesTab
    from ui.libraries_tab import LibrariesTab
    from ui.search_tab import SearchTab


#: The filter and page-size parameters that ``/search`` and ``/similar`` take after their own, in the order
#: :func:`ui.search.filters_from` takes them (``SearchTab.filters``): the names view_api() shows and scripts pass.
#: Each defaults to ``None``: no filter, the page's page size.
FILTER_PARAMETERS = tuple(
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation)
    for name, annotation in (
        ("folder", "str | None"),
        ("formats", "list[str] | None"),
        ("taken_from", "str | None"),
        ("taken_until", "str | None"),
        ("added_from", "str | None"),
        ("added_until", "str | None"),
        ("min_width", "float | None"),
        ("min_height", "float | None"),
        ("min_score", "float | None"),
        ("expansion", "bool | None"),
        ("results_per_page", "float | None"),
    )
)

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def _with_filters(endpoint: Endpoint) -> Endpoint:
    """An endpoint method ``(self, <own parameters>, *, filters: UiFilters)`` as Gradio and scripts see it: its own
    parameters, then :data:`FILTER_PARAMETERS` (Gradio passes them by position, a script by name); the call gets
    their :class:`~ui.query.UiFilters` as ``filters``. Raises ``TypeError`` for arguments the signature does not
    take, as any Python call would."""
    own = [p for p in inspect.signature(endpoint).parameters.values() if p.name != "filters"]
    signature = inspect.signature(endpoint).replace(parameters=[*own, *FILTER_PARAMETERS])

    @functools.wraps(endpoint)
    def wrapper(self: ApiEndpoints, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = [bound.arguments.pop(p.name) for p in FILTER_PARAMETERS]
        return endpoint(*bound.arguments.values(), filters=self._filters(values))

    # What inspect.signature (Gradio's parameter names, view_api) and typing.get_type_hints read.
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values() if p.name != "self"}
    wrapper.__annotations__["return"] = signature.return_annotation
    return wrapper  # type: ignore[return-value]


class ApiEndpoints:
    """The endpoints' own components (hidden: never rendered) and events; the filters, the photo box and the
    threshold slider of the page serve as their inputs (an API call does not touch any browser's page)."""

    def __init__(
        self,
        ctx: UiContext,
        searches: Searches,
        search: SearchTab,
        add: AddTab,
        duplicates: DuplicatesTab,
        libraries: LibrariesTab,
    ) -> None:
        self.ctx = ctx
        self.searches = searches
        self.search_tab = search
        self.add_tab = add
        self.duplicates_tab = duplicates
        self.libraries_tab = libraries

    def layout(self) -> None:
        """The endpoints' inputs, outputs and triggers, in a column that is never shown."""
        with gr.Column(visible=False):
            self.image_id = gr.Textbox(label="Image id")
            self.api_key = gr.Textbox(label="API key", type="password")
            self.results = gr.JSON(label="Results")
            self.status = gr.Textbox(label="Status")
            self.details = gr.Markdown(label="Details")
            self.large_image = gr.File(label="Large image")
            self.original = gr.File(label="Original")
            self.summary = gr.Textbox(label="Summary")
            self.files = gr.JSON(label="Files")
            self.collection = gr.Textbox(label="Collection")
            self.groups = gr.JSON(label="Groups")
            self.library = gr.Textbox(label="Library")
            self.force = gr.Checkbox(label="Force")
            self.message = gr.Markdown(label="Message")
            self.libraries = gr.Markdown(label="Libraries")
            self.names = gr.JSON(label="Names")
            self.scanning = gr.Checkbox(label="Scanning")
            names = ("search", "similar", "open", "add", "duplicates", "find_duplicates", "stats", "libraries", "scan")
            self.triggers = {name: gr.Button(visible=False) for name in names}

    def wire(self) -> None:
        """One event per endpoint, on its hidden trigger."""
        tab, t = self.search_tab, self.triggers
        found = [self.results, self.status]
        run: dict[str, Any] = dict(concurrency_limit=CONCURRENCY_LIMIT, concurrency_id="search")
        t["search"].click(
            self.search, [tab.query_file, tab.words, tab.negative, *tab.filters], found, api_name="search", **run
        )
        t["similar"].click(self.similar, [self.image_id, *tab.filters], found, api_name="similar", **run)
        t["open"].click(
            self.open, self.image_id, [self.details, self.large_image, self.original], api_name="open", **run
        )
        t["add"].click(
            self.add,
            [self.add_tab.files, self.api_key],
            [self.summary, self.files, self.collection],
            api_name="add",
            concurrency_limit=1,
            concurrency_id="add",
        )
        t["stats"].click(self.stats, None, self.collection, api_name="stats", concurrency_limit=None)
        threshold = self.duplicates_tab.threshold
        t["duplicates"].click(self.duplicates, threshold, [self.groups, self.status], api_name="duplicates")
        t["find_duplicates"].click(
            self.find_duplicates,
            [threshold, self.api_key],
            [self.groups, self.status],
            api_name="find_duplicates",
            concurrency_limit=1,
            concurrency_id="find_duplicates",
        )
        t["libraries"].click(
            self.list_libraries, None, [self.libraries, self.names, self.scanning], api_name="libraries"
        )
        t["scan"].click(
            self.scan_library,
            [self.library, self.force, self.api_key],
            [self.message, self.libraries],
            api_name="scan_library",
            concurrency_limit=1,
            concurrency_id="scan_library",
        )

    # --- the endpoints: their parameter names are what view_api() shows -------------------------------------------
    @_with_filters
    def search(
        self, photo: str | None = None, words: str | None = None, but_not: str | None = None, *, filters: UiFilters
    ) -> tuple[list[dict[str, Any]], str]:
        """Search by a photo (any format), by words (CLIP models), or both, minus "but not" words; filters and page
        size as the page's (dates ``YYYY-MM-DD``, days in UTC, "until" including its day; sizes in pixels). Returns
        the results (``id``, ``score``, ``filename``... best first) and the status."""
        query = UiQuery.from_form(photo, words, but_not)
        if query is None:
            return [], "✗ Give a photo or words to search for."
        return self._run(query, filters)

    @_with_filters
    def similar(self, image_id: str, *, filters: UiFilters) -> tuple[list[dict[str, Any]], str]:
        """More like this: the neighbours of a stored photo (``image_id``, from a result), itself left out."""
        image_id = (image_id or "").strip()
        if not is_valid_image_id(image_id):
            return [], "✗ The image id must be 64 hexadecimal characters, as a result's id is."
        return self._run(UiQuery("id", image_id=image_id), filters)

    def _filters(self, values: Sequence[Any]) -> UiFilters:
        """The filters of the :data:`FILTER_PARAMETERS` values, in their order; one left out (``None``) is the
        page's default: no filter, 20 results per page."""
        *given, top_k = values
        return filters_from(*given, top_k if top_k is not None else self.ctx.default_k)

    def _run(self, query: UiQuery, filters: UiFilters) -> tuple[list[dict[str, Any]], str]:
        service = self.ctx.get_service()
        errors: list[str] = []
        hits: list[SearchHit] = []
        start = time.perf_counter()
        with as_message(errors):
            hits = run_query(service, query, filters, 0)
        return results_data(hits), status_line(query, hits, errors, time.perf_counter() - start)

    def open(self, image_id: str) -> tuple[str, str, str]:
        """A stored photo's large view: its details (Markdown), the image a browser shows (the original, or a
        large JPEG for HEIC, TIFF...) and the original file under its own name."""
        image_id = (image_id or "").strip()
        if not is_valid_image_id(image_id):
            refuse("The image id must be 64 hexadecimal characters, as a result's id is.")
        service = self.ctx.get_service()
        try:
            record = service.db.get(image_id)
            if record is None:
                refuse("No photo of the collection has this id.")
            image, details, original = view_content(service, SearchHit(image_id, float("nan"), record.metadata))
            return details, image, original
        except ServiceError as exc:
            refuse(escape(str(exc)), logging.WARNING)

    def add(
        self, photos: list[str] | None, api_key: str | None = None, request: gr.Request = None, progress=gr.Progress()
    ):
        """Add photos (any format) in batches; returns the summary, one entry per file (``file``, ``ok``,
        ``result``, ``id``) and the collection line. ``api_key``: where API_KEY is set (not needed after
        logging in with API_KEY_READS)."""
        summary, files, _ = self.add_tab.add_files(photos, [api_key or ""], request, progress)
        return summary, files, self.stats()

    def stats(self) -> str:
        """The collection in one line of plain text: ``273 photos · model X (1280 dimensions) · database pgvector``,
        or why it cannot be read now."""
        service = self.ctx.get_service()
        stats = read_stats(service)
        if isinstance(stats, str):
            return stats
        return f"{photos(stats.count)} · model {stats.model} ({stats.dimension} dimensions) · database {stats.backend}"

    def duplicates(self, similarity: float | None = None) -> tuple[list[dict[str, Any]], str]:
        """The groups of near-identical photos of the last duplicate search at ``similarity`` or more (each:
        ``ids``, ``filenames``, ``min``, ``max``), and the status."""
        return self.duplicates_tab.groups(self._similarity(similarity))

    def find_duplicates(
        self,
        similarity: float | None = None,
        api_key: str | None = None,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Compare every photo (as ``POST /jobs/neighbours``), then the groups as :meth:`duplicates` gives them."""
        return self.duplicates_tab.find_duplicates(self._similarity(similarity), api_key or "", "", request, progress)

    def _similarity(self, similarity: float | None) -> float:
        return self.ctx.settings.duplicate_threshold if similarity is None else float(similarity)

    def list_libraries(self) -> tuple[str, list[str], bool]:
        """Every photo library as the Libraries tab shows it (Markdown: folders, state, counts, last scan, offline
        photos), their names, and whether a scan runs or waits (in any process or replica)."""
        return self.libraries_tab.listing()

    def scan_library(
        self, library: str, force: bool | None = False, api_key: str | None = None, request: gr.Request = None
    ) -> tuple[str, str]:
        """Start a scan of ``library`` (as ``POST /libraries/{name}/scan``; ``force``: mark missing files offline
        even when most of the library is missing), or say that one already runs; returns that message and the
        libraries. A write: ``api_key`` where API_KEY is set."""
        message, libraries, _ = self.libraries_tab.scan(library, bool(force), api_key or "", "", "", request)
        return message, libraries
