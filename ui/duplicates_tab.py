"""The Duplicates tab: the groups of near-identical photos of the last neighbour graph at a chosen similarity,
"Find duplicates" (builds the graph, as ``POST /jobs/neighbours`` does; ``/find_duplicates`` of :mod:`ui.api` for
scripts) and deleting chosen photos of a group after a confirmation."""

from __future__ import annotations

import logging
import time
from typing import Any

import gradio as gr

from app.errors import GraphNotBuiltError, ImageNotFoundError, ServiceError
from ui.context import UiContext, collection_line, escape, refuse
from ui.files import thumbnail_file
from ui.query import photos, when

#: Duplicate groups shown at once, largest first.
DUPLICATE_GROUPS_SHOWN = 50
#: How often the duplicates job's progress is read while it runs, seconds.
JOB_POLL_S = 0.3


class DuplicatesTab:
    """The Duplicates tab's components (made by :meth:`layout`), events (:meth:`wire`) and handlers.

    ``groups_state`` (the groups shown, as dicts of ids, file names and scores) and ``pending_delete`` (the ids
    awaiting the confirmation) are made by :func:`ui.app.build_ui` with the page's other per-tab state.
    """

    def __init__(self, ctx: UiContext, groups_state: gr.State, pending_delete: gr.State) -> None:
        self.ctx = ctx
        self.groups_state = groups_state
        self.pending_delete = pending_delete
        # Bound once and reused: an event's default concurrency group is id(fn), so the events that share a handler
        # (the two that list the groups; every group's "Delete chosen…") take turns, as they did with one function.
        self._groups = self.groups
        self._ask_delete = self.ask_delete

    def layout(self) -> None:
        """The tab and its components, inside the page's ``gr.Tabs``; the groups are rendered from
        ``groups_state`` (:meth:`render_groups`)."""
        with gr.Tab("Duplicates", id="duplicates", elem_id="tab-duplicates") as self.tab:
            gr.Markdown("Groups of near-identical photos, from the last duplicate search.")
            with gr.Row():
                self.threshold = gr.Slider(
                    0.5,
                    1.0,
                    value=self.ctx.settings.duplicate_threshold,
                    step=0.01,
                    label="Similarity at least",
                    elem_id="dup-threshold",
                )
                # Shown by the load event when writes need the key (and the page has no login that asked for it).
                self.key = gr.Textbox(label="API key", type="password", visible=False, elem_id="key-dup")
            self.find_button = gr.Button("Find duplicates", variant="primary", elem_id="find-duplicates")
            self.status = gr.Markdown(elem_id="dup-status")
            with gr.Row(visible=False, elem_id="confirm-delete") as self.confirm_row:
                self.confirm_text = gr.Markdown()
                self.confirm_button = gr.Button("Delete", variant="stop", elem_id="confirm-delete-button")
                self.cancel_button = gr.Button("Cancel", elem_id="cancel-delete-button")
            gr.render(inputs=self.groups_state)(self.render_groups)

    def render_groups(self, found: list[dict]) -> None:
        """One block per group: its thumbnails, the boxes to tick the photos to delete, and "Delete chosen…"."""
        service = self.ctx.get_service()
        for n, group in enumerate(found, start=1):
            with gr.Group(elem_classes=["dup-group"]):
                gr.Markdown(
                    f"**Group {n}** · {photos(len(group['ids']))} · similarity {group['min']:.3f}–{group['max']:.3f}"
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
                    [(name, image_id) for image_id, name in zip(group["ids"], group["filenames"], strict=True)],
                    label="Photos to delete",
                    elem_classes=["dup-choose"],
                )
                ask = gr.Button("Delete chosen…", size="sm", variant="stop", elem_classes=["dup-delete"])
                ask.click(self._ask_delete, chosen, [self.pending_delete, self.confirm_row, self.confirm_text])

    def wire(self, collection: gr.Markdown, other_key: gr.Textbox) -> None:
        """``collection``: the header's collection line, refreshed after deleting; ``other_key``: the Add tab's key
        box (a key typed in either counts)."""
        listed = [self.groups_state, self.status]
        self.tab.select(self._groups, self.threshold, listed, api_visibility="private")
        self.threshold.release(self._groups, self.threshold, listed, api_visibility="private")
        self.find_button.click(
            self.find_duplicates,
            [self.threshold, self.key, other_key],
            listed,
            api_visibility="private",  # scripts: /find_duplicates of ui.api
            concurrency_limit=1,
            concurrency_id="find_duplicates",
        )
        self.confirm_button.click(
            self.delete,
            [self.pending_delete, self.threshold, self.key, other_key],
            [self.pending_delete, self.confirm_row, self.groups_state, self.status, collection],
            api_visibility="private",
        )
        self.cancel_button.click(
            lambda: ([], gr.update(visible=False)),
            None,
            [self.pending_delete, self.confirm_row],
            api_visibility="private",
        )

    def groups(self, threshold: float) -> tuple[Any, str]:
        """The near-duplicate groups of the last neighbour graph at ``threshold``, largest first."""
        service = self.ctx.get_service()
        try:
            page = service.neighbours.duplicates(float(threshold), 0, DUPLICATE_GROUPS_SHOWN)
        except GraphNotBuiltError:
            return [], "No duplicate search has run yet: press **Find duplicates**."
        except ServiceError as exc:
            return [], "✗ " + escape(str(exc))
        found = [
            {"ids": list(g.ids), "filenames": names, "min": g.min_score, "max": g.max_score} for g, names in page.groups
        ]
        built = when(page.graph_built_at)
        if not page.total:
            return found, f"No photos are this alike (similarity ≥ {page.threshold:.2f}); graph of {built}."
        shown = f"the {len(found)} largest of " if page.total > len(found) else ""
        return found, f"Showing {shown}{page.total} groups at similarity ≥ {page.threshold:.2f} (graph of {built})."

    def find_duplicates(self, threshold: float, key: str, other_key: str, request: gr.Request, progress=gr.Progress()):
        """Build the neighbour graph (the job of ``POST /jobs/neighbours``), with progress, then list the groups."""
        self.ctx.may_write([key, other_key], request)
        service = self.ctx.get_service()
        job, _ = service.neighbours.start()
        while job.state in ("queued", "running"):
            fraction = 1.0 if not job.total else min(1.0, job.done / job.total)
            progress(fraction, desc=f"Comparing photos ({job.phase})")
            time.sleep(JOB_POLL_S)
            job = service.neighbours.job(job.id)
        if job.state != "completed":
            refuse(escape(f"The duplicate search stopped ({job.state}): {job.error or 'see the log'}"), logging.WARNING)
        return self.groups(threshold)

    def ask_delete(self, chosen: list[str] | None) -> tuple[Any, ...]:
        # "Delete chosen…" of a group: ask to confirm (confirm_row) before anything is deleted.
        if not chosen:
            refuse("Tick the photos of the group to delete first.")
        n = len(chosen)
        what = "the originals and their search entries" if n > 1 else "the original and its search entry"
        question = f"Delete {photos(n)}? This removes {what}, and cannot be undone."
        return list(chosen), gr.update(visible=True), question

    def delete(
        self, pending: list[str], threshold: float, key: str, other_key: str, request: gr.Request
    ) -> tuple[Any, ...]:
        """Delete the confirmed photos (``DELETE /image/{id}``'s service call), then list the groups again."""
        self.ctx.may_write([key, other_key], request)
        service = self.ctx.get_service()
        gone = 0
        for image_id in pending or []:
            try:
                service.delete_image(image_id)
                gone += 1
            except ImageNotFoundError:
                pass
        found, status = self.groups(threshold)
        gr.Info(f"Deleted {photos(gone)}.")
        return [], gr.update(visible=False), found, status, collection_line(service)
