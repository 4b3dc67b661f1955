"""The large view of the Search tab: a result chosen in the gallery, shown big with its details, its original to
download, "More like this" and "Close" (``/open`` and ``/similar`` of :mod:`ui.api` for scripts). It sits between
the search status and the results, hidden until a result is chosen; every search hides it again
(:meth:`ui.search.Searches.show`)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.errors import ServiceError
from ui.assets import CLOSE_VIEW_JS, OPEN_VIEW_JS
from ui.context import UiContext, escape, refuse
from ui.files import LARGE_SIZE, original_file, thumbnail_file
from ui.query import BROWSER_FORMATS, file_size, when
from ui.search import Searches, Shown

if TYPE_CHECKING:
    from app.service import SearchService
    from app.vectordb.base import SearchHit


def view_content(service: SearchService, hit: SearchHit) -> tuple[str, str, str]:
    """(image to show, details in Markdown, original to download) for one result."""
    meta = hit.metadata
    original = original_file(service, hit.id, meta.filename)
    shown = original if meta.format.upper() in BROWSER_FORMATS else thumbnail_file(service, hit.id, LARGE_SIZE)
    details = "\n".join(
        [
            f"## {escape(meta.filename)}",  # h2: under the page's h1 (axe-core's heading-order)
            *([f"- Score: **{hit.score:.4f}**"] if math.isfinite(hit.score) else []),  # NaN: opened by id
            f"- Format: {meta.format} · {meta.width} × {meta.height} pixels · {file_size(meta.bytes)}",
            f"- Taken: {when(meta.taken_at)}",
            f"- Indexed: {when(meta.indexed_at)}",
            f"- Id: `{hit.id}`",
        ]
    )
    return shown, details, original


class LargeView:
    """The large view's components (made by :meth:`layout`), its events (:meth:`wire`) and its handler."""

    def __init__(self, ctx: UiContext, searches: Searches, selected_id: gr.State) -> None:
        self.ctx = ctx
        self.searches = searches
        self.selected_id = selected_id  # the id of the result shown, for "More like this"

    def layout(self) -> None:
        """The view's components, hidden; in the Search tab's layout, where the view shows."""
        with gr.Column(visible=False, elem_id="large-view") as self.view:
            with gr.Row():
                # alt_text: the image's wrapping button has no other name (axe-core's button-name); set per result.
                self.image = gr.Image(
                    label="Large view",
                    interactive=False,
                    scale=2,
                    elem_id="view-image",
                    buttons=["fullscreen"],
                    alt_text="The chosen result, large",
                )
                with gr.Column(scale=1, min_width=240):
                    self.details = gr.Markdown(elem_id="view-details")
                    self.download = gr.DownloadButton("Download original", elem_id="download-original")
                    self.more_like = gr.Button("More like this", variant="primary", elem_id="more-like-this")
                    self.close = gr.Button("Close", size="sm", elem_id="close-view")

    def wire(self, results: gr.Gallery, shown_state: gr.State, filters: list[Any], run: dict[str, Any]) -> None:
        """Choosing a result opens the view; "More like this" searches with ``filters`` as a search event (``run``:
        the search events' outputs and concurrency); "Close" hides it."""
        # The keyboard focus goes into the view when it opens, and back to its result when it closes (ui.assets).
        results.select(
            self.open_view,
            shown_state,
            [self.view, self.image, self.details, self.download, self.selected_id],
            api_visibility="private",
        ).then(None, js=OPEN_VIEW_JS, api_visibility="private", queue=False)
        self.more_like.click(self.searches.similar, [self.selected_id, *filters], api_visibility="private", **run)
        self.close.click(lambda: gr.update(visible=False), None, self.view, api_visibility="private").then(
            None, js=CLOSE_VIEW_JS, api_visibility="private", queue=False
        )

    def open_view(self, shown: Shown, event: gr.SelectData) -> tuple[Any, ...]:
        """A result was chosen: its large view."""
        index = event.index if isinstance(event.index, int) else 0
        if not 0 <= index < len(shown.hits):
            return (gr.skip(),) * 5
        hit = shown.hits[index]
        try:
            image, details, original = view_content(self.ctx.get_service(), hit)
        except ServiceError as exc:
            refuse(escape(str(exc)), logging.WARNING)
        return (
            gr.update(visible=True),
            gr.update(value=image, alt_text=f"{hit.metadata.filename}, large"),
            details,
            gr.update(value=original, visible=True),
            hit.id,
        )
