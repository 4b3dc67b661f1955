"""The Search tab: the photo box, the words boxes, the filters, the search status, the large view
(:mod:`ui.large_view`), the results gallery and "Load more", and the events that run :class:`ui.search.Searches`.
Scripts use the endpoints of :mod:`ui.api` instead of these events."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui.assets import SHOW_RESULTS_JS, UPDATE_ADDRESS_JS, stamp_js
from ui.context import UiContext, escape
from ui.large_view import LargeView
from ui.query import ADDED_FROM, ADDED_UNTIL, FORMAT_CHOICES, MIN_HEIGHT, MIN_WIDTH, TAKEN_FROM, TAKEN_UNTIL
from ui.search import N_OUTPUTS, Searches

#: How many runs of the search events may be in flight at once, all search events together. Gradio's default of 1
#: per event would queue every visitor behind each other although the service is thread-safe; a small bound keeps a
#: burst of large uploads from decoding many big images at once (the service's decode admission bounds it too).
CONCURRENCY_LIMIT = 4


def text_note(model_id: str, supports_text: bool) -> str:
    """What the words boxes say: a hint, or why they are off."""
    if supports_text:
        return "Describe what you look for (*a red bicycle by a wall*); add words to avoid under **But not**."
    return (
        f"Searching by words needs a CLIP model. This service runs **{escape(model_id)}**, which compares photos "
        "only: search with a photo."
    )


class SearchTab:
    """The Search tab's components (made by :meth:`layout`) and events (:meth:`wire`).

    ``shown_state`` (:class:`ui.search.Shown`), ``selected_id`` (the result in the large view) and ``share`` (the
    search's address query string, ``ui.query.to_link``; a change puts it in the address bar) are made by
    :func:`ui.app.build_ui` with the page's other per-tab state.
    """

    def __init__(
        self, ctx: UiContext, searches: Searches, shown_state: gr.State, selected_id: gr.State, share: gr.Textbox
    ) -> None:
        self.ctx = ctx
        self.searches = searches
        self.shown_state = shown_state
        self.share = share
        self.large_view = LargeView(ctx, searches, selected_id)

    def layout(self) -> None:
        """The tab and its components, inside the page's ``gr.Tabs``."""
        with gr.Tab("Search", id="search", elem_id="tab-search"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    self.query_file = gr.File(
                        label="Photo: choose, drop here or paste (Ctrl+V)",
                        file_count="single",
                        type="filepath",
                        height=140,
                        elem_id="query-file",
                    )
                    self.query_preview = gr.Image(
                        label="Query",
                        interactive=False,
                        height=180,
                        elem_id="query-preview",
                        buttons=[],
                        alt_text="The photo searched with",  # its wrapping button's name (axe-core's button-name)
                    )
                with gr.Column(scale=2, min_width=260):
                    self.words_note = gr.Markdown(elem_id="words-note")
                    # Off until the load event knows whether the model reads words.
                    self.words = gr.Textbox(
                        label="Words", placeholder="a dog on a beach", interactive=False, elem_id="words"
                    )
                    self.negative = gr.Textbox(
                        label="But not", placeholder="people", interactive=False, elem_id="negative"
                    )
                    self.search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            self._filters_layout()
            self.status = gr.Markdown(elem_id="search-status")
            self.large_view.layout()
            self.results = gr.Gallery(
                label="Results (rank · score · file name)",
                columns=4,
                height="auto",
                object_fit="cover",
                allow_preview=False,
                interactive=False,
                buttons=[],  # no download/share/fullscreen icons: fewer Tab stops before the first result
                elem_id="results",
                elem_classes=["photo-grid"],
            )
            self.more_button = gr.Button("Load more", visible=False, elem_id="load-more")

    def _filters_layout(self) -> None:
        # Opened by the load event when the page's link holds filters (they are on: the page shows them).
        with gr.Accordion("Filters and options", open=False, elem_id="filters") as self.filters_box:
            with gr.Row():
                self.folder = gr.Textbox(label="Folder", placeholder="trips/2024", elem_id="filter-folder")
                self.taken_after = gr.Textbox(label=f"{TAKEN_FROM} (YYYY-MM-DD)", elem_id="filter-taken-after")
                self.taken_before = gr.Textbox(label=f"{TAKEN_UNTIL} (YYYY-MM-DD)", elem_id="filter-taken-before")
            # When each photo was added to the collection (the REST API's indexed_after/indexed_before), and how
            # big it is at least (min_width/min_height): empty boxes are no filter.
            with gr.Row():
                self.added_after = gr.Textbox(label=f"{ADDED_FROM} (YYYY-MM-DD)", elem_id="filter-added-after")
                self.added_before = gr.Textbox(label=f"{ADDED_UNTIL} (YYYY-MM-DD)", elem_id="filter-added-before")
                # No minimum= here: Gradio would refuse a negative number with a toast of its own; the search's
                # status line says why instead (ui.query.UiFilters.options).
                self.min_width = gr.Number(
                    label=f"{MIN_WIDTH} (pixels)", precision=0, placeholder="any", elem_id="filter-min-width"
                )
                self.min_height = gr.Number(
                    label=f"{MIN_HEIGHT} (pixels)", precision=0, placeholder="any", elem_id="filter-min-height"
                )
            self.formats = gr.CheckboxGroup(list(FORMAT_CHOICES), label="Formats", elem_id="filter-formats")
            with gr.Row():
                self.min_score = gr.Slider(0, 1, value=0, step=0.01, label="Minimum score", elem_id="filter-min-score")
                self.top_k = gr.Slider(
                    1,
                    self.ctx.settings.max_top_k,
                    value=self.ctx.default_k,
                    step=1,
                    label="Results per page",
                    elem_id="top-k",
                )
                self.expand = gr.Checkbox(label="Query expansion (αQE)", elem_id="filter-expand")

    @property
    def filters(self) -> list[Any]:
        """The filter and page-size components, in the order the handlers take them (:func:`ui.search.filters_from`)."""
        return [
            self.folder,
            self.formats,
            self.taken_after,
            self.taken_before,
            self.added_after,
            self.added_before,
            self.min_width,
            self.min_height,
            self.min_score,
            self.expand,
            self.top_k,
        ]

    @property
    def outputs(self) -> list[Any]:
        """The outputs of every search event, in the order :meth:`ui.search.Searches.show` returns them."""
        outputs = [
            self.results,
            self.status,
            self.more_button,
            self.share,
            self.shown_state,
            self.large_view.view,
            self.query_file,
            self.query_preview,
        ]
        assert len(outputs) == N_OUTPUTS
        return outputs

    def wire(self) -> None:
        """The tab's events; called in the page's Blocks after the tabs are laid out."""
        s, filters = self.searches, self.filters
        run = dict(outputs=self.outputs, concurrency_limit=CONCURRENCY_LIMIT, concurrency_id="search")
        form = [self.shown_state, self.query_file, self.words, self.negative, *filters]
        # The browser's trigger number of each search of the form (stamp_js; the "search" API has none).
        trigger = gr.Number(value=0, precision=0, visible=False)
        stamped_form = [trigger, *form]
        stamped_rerun = [trigger, self.shown_state, *filters]

        self.share.change(None, self.share, js=UPDATE_ADDRESS_JS, api_visibility="private", queue=False)
        self.status.change(None, js=SHOW_RESULTS_JS, api_visibility="private", queue=False)

        # The page's events are private: a script uses the endpoints of ui.api, which take what they need.
        self.query_file.upload(s.search_form, form, api_visibility="private", **run)
        self.query_file.upload(s.preview, self.query_file, self.query_preview, api_visibility="private")
        self.query_file.clear(lambda: None, None, self.query_preview, api_visibility="private")
        # Clearing the photo clears its results too (and the link), as if nothing had been searched yet.
        self.query_file.clear(s.clear, None, api_visibility="private", **run)
        for submitted in (self.search_button.click, self.words.submit, self.negative.submit):
            submitted(
                s.search_form_stamped, stamped_form, js=stamp_js(len(stamped_form)), api_visibility="private", **run
            )
        # Text and number boxes: Enter, or leaving the box, reruns the search. Leaving it shows its progress on the
        # status line only: a box is mostly left by clicking a result, and Gradio's progress cover over the results
        # (there from the mouse's press, the blur) took the click, so the large view did not open.
        boxes = (self.folder, self.taken_after, self.taken_before, self.added_after, self.added_before)
        for box in (*boxes, self.min_width, self.min_height):
            box.submit(s.rerun, stamped_rerun, js=stamp_js(len(stamped_rerun)), api_visibility="private", **run)
            box.blur(
                s.rerun,
                stamped_rerun,
                js=stamp_js(len(stamped_rerun)),
                api_visibility="private",
                show_progress_on=self.status,
                **run,
            )
        # always_last: a slider's release while its previous one is still running (its number box left, then an
        # arrow key on the slider: ui.assets.A11Y_JS) runs after it instead of being dropped (Gradio's "once").
        for changed in (self.formats.input, self.expand.input, self.min_score.release, self.top_k.release):
            changed(
                s.rerun,
                stamped_rerun,
                js=stamp_js(len(stamped_rerun)),
                api_visibility="private",
                trigger_mode="always_last",
                **run,
            )
        self.more_button.click(s.load_more, [self.shown_state, self.top_k], api_visibility="private", **run)
        self.large_view.wire(self.results, self.shown_state, filters, run)
