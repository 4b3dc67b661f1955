"""The Gradio web UI mounted at ``/ui``: search by photo, words or both, results, large view, filters, links,
adding photos, duplicates, photo libraries and what the service runs.

A thin face on :class:`app.service.SearchService`, the object the REST API calls, in the same process (no HTTP to
itself): both decode, embed, rank and refuse identically. The service exists only once the lifespan has opened it,
so every handler asks ``get_service()`` at call time. What depends on the running service (the collection line,
whether words can be searched, whether a key is asked for) is filled in by the page's load event, which also runs
the search a link holds (:mod:`ui.query`).

This module only composes the page: each tab is a module of its own (:mod:`ui.search_tab` with
:mod:`ui.large_view` and the handlers in :mod:`ui.search`, :mod:`ui.add_tab`, :mod:`ui.duplicates_tab`,
:mod:`ui.libraries_tab`, :mod:`ui.about_tab`), sharing a :class:`ui.context.UiContext`; the CSS, the JavaScript
and the theme are in :mod:`ui.assets`.

Scripts use the Gradio API of :mod:`ui.api` (``/search``, ``/similar``, ``/open``, ``/add``, ``/duplicates``,
``/find_duplicates``, ``/stats``) with ``gradio_client``; docs/web-ui.md#gradio-api has an example per endpoint::

    from gradio_client import Client, handle_file
    ui = Client("http://localhost:8000/ui/")
    results, status = ui.predict(photo=handle_file("cat.jpg"), results_per_page=5, api_name="/search")
    similar, status = ui.predict(image_id=results[0]["id"], api_name="/similar")
    ui.predict(api_name="/stats")                          # the collection line
    ui.predict(None, api_name="/libraries")                # every library as Markdown, names, poll
    ui.predict("photos", False, KEY, "", "", api_name="/scan_library")   # library, force, key boxes
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.api.security import AccessPolicy
from app.config import Settings
from ui.about_tab import AboutTab, about_text
from ui.add_tab import AddTab
from ui.api import ApiEndpoints
from ui.context import UiContext, collection_line, escape, read_stats
from ui.duplicates_tab import DuplicatesTab
from ui.libraries_tab import LibrariesTab
from ui.query import from_link
from ui.search import EMPTY_COLLECTION, N_OUTPUTS, STATUS_OUTPUT, Searches, Shown, active_filters
from ui.search_tab import SearchTab, text_note

if TYPE_CHECKING:  # for annotations only: importing app.service pulls in the decoders and the model code
    from app.service import SearchService


def build_ui(get_service: Callable[[], SearchService], settings: Settings, access: AccessPolicy) -> gr.Blocks:
    """Build the Gradio Blocks app; :mod:`ui.mount` mounts it at ``/ui`` with ``gr.mount_gradio_app``.

    Args:
        get_service: returns the running :class:`SearchService` (created by the lifespan, after the UI is built).
        settings: the service's settings (page size bounds, upload limits, batch limits, duplicate threshold).
        access: the service's access rules: writes from the UI (add, delete, find duplicates) pass the same checks
            as the REST API's, with the key typed into the page's key box (or the login, with API_KEY_READS).
    """
    ctx = UiContext(get_service, settings, access)
    searches = Searches(ctx)
    # delete_cache: uploads and the files ui/files.py writes older than an hour are removed every 10 minutes (and
    # this app's own when the server stops).
    with gr.Blocks(title="Image similarity search", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        # What the page keeps per browser tab, all in one place (the tabs get them handed).
        shown_state = gr.State(Shown())
        selected_id = gr.State("")
        groups_state = gr.State([])
        pending_delete = gr.State([])
        # The search's address query string (ui.query.to_link); a change puts it in the address bar.
        share = gr.Textbox(visible="hidden", elem_id="share-query")
        search = SearchTab(ctx, searches, shown_state, selected_id, share)
        add = AddTab(ctx)
        duplicates = DuplicatesTab(ctx, groups_state, pending_delete)
        libraries = LibrariesTab(ctx)
        about = AboutTab(ctx)
        api = ApiEndpoints(ctx, searches, search, add, duplicates)

        with gr.Row(equal_height=True):
            gr.Markdown("# Image similarity search", elem_id="title")  # the page's one h1 (styled in ui.assets)
            collection = gr.Markdown("Loading…", label="Collection", elem_id="collection-line")
        # Wrapped, never an overflow menu: every tab stays one tap away on a phone (390 px).
        with gr.Tabs(overflow_behavior="wrap"):
            search.layout()
            add.layout()
            duplicates.layout()
            libraries.layout()
            about.layout()
        api.layout()

        # Wired once all tabs exist: the Add and Duplicates tabs each read the other's key box; Libraries reads both.
        # The API's endpoints first: Gradio names private events after their function too, and the first event of a
        # name gets it (/similar, /add, /find_duplicates).
        api.wire()
        search.wire()
        add.wire(collection, other_key=duplicates.key)
        duplicates.wire(collection, other_key=add.key)
        libraries.wire(other_keys=[add.key, duplicates.key])
        about.wire(collection)
        demo.load(
            _page_load(ctx, searches),
            None,
            [
                collection,
                about.text,
                search.words_note,
                search.words,
                search.negative,
                *search.filters,
                add.key,
                duplicates.key,
                libraries.key,
                search.filters_box,
                *search.outputs,
            ],
            api_visibility="private",
        )
    return demo


def _page_load(ctx: UiContext, searches: Searches) -> Callable[[gr.Request], tuple[Any, ...]]:
    """The load event's handler, filling in what depends on the running service and on the page's address."""
    settings, access = ctx.settings, ctx.access

    def on_load(request: gr.Request) -> tuple[Any, ...]:
        """Per page: the collection line, words on or off, key boxes, filters (opened when the address holds some)
        and the search from the address; the status line says what the address held that could not be used, or
        that the collection is empty."""
        service = ctx.get_service()
        stats = read_stats(service)
        text_ok = service.supports_text
        link = from_link(dict(request.query_params) if request else {}, ctx.default_k, settings.max_top_k)
        f = link.filters
        results = list(searches.search(link.query, f, request) if link.query is not None else (gr.skip(),) * N_OUTPUTS)
        # Said on the status line, where it stays (a toast fades, and covered the header): what the link held that
        # could not be used, or that the collection is empty and photos are to be added first.
        status = results[STATUS_OUTPUT] if isinstance(results[STATUS_OUTPUT], str) else ""
        if link.problems:
            warning = "⚠ Part of this link could not be used and was left out: " + escape(" ".join(link.problems))
            results[STATUS_OUTPUT] = warning + (f"\n\n{status}" if status else "")
        elif link.query is None and not isinstance(stats, str) and stats.count == 0:
            results[STATUS_OUTPUT] = EMPTY_COLLECTION
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
            key_box,
            gr.update(open=True) if active_filters(f) or f.expand or f.top_k != ctx.default_k else gr.skip(),
            *results,
        )

    return on_load
