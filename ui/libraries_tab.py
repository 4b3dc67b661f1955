"""The Libraries tab: every photo library indexed in place with its folders, state, counts, last scan, offline
photos, warning and error (the wording is :mod:`ui.library_text`), and "Scan now" for a chosen library (the
``scan_library`` API name, as ``POST /libraries/{name}/scan``), which needs the key like every write.

The tab reads ``service.libraries`` when it is opened, on "Refresh" (the ``libraries`` API name), and every
:data:`POLL_S` seconds while a scan runs or waits, in any process or replica: a ``gr.Timer`` that the handlers turn
on when they see a running scan and off when they see none, so an idle page asks nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from app.errors import ServiceError
from ui.context import UiContext, escape, refuse
from ui.library_text import any_active, libraries_markdown

#: How often the tab reads the libraries again while a scan runs, seconds.
POLL_S = 1.5


class LibrariesTab:
    """The Libraries tab's components (made by :meth:`layout`), events (:meth:`wire`) and handlers."""

    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx
        # Bound once: an event's default concurrency group is id(fn), so the reads share one group.
        self._read = self.read
        self._poll = self.poll

    def layout(self) -> None:
        """The tab and its components, inside the page's ``gr.Tabs``."""
        with gr.Tab("Libraries", id="libraries", elem_id="tab-libraries") as self.tab:
            gr.Markdown("### Photo libraries")
            gr.Markdown(
                "Folders of photos indexed where they are; scans keep them in step with the files.",
                elem_id="libraries-intro",
            )
            self.overview = gr.Markdown("Loading…", elem_id="libraries-list", latex_delimiters=[], sanitize_html=True)
            # Shown by the handlers that list the libraries once there is one to scan.
            with gr.Column(visible=False, elem_id="library-scan-controls") as self.controls:
                with gr.Row(equal_height=True):
                    # Its choices are filled per page; a name typed or sent by a script is checked by the scan.
                    self.choice = gr.Dropdown(
                        choices=[],
                        value=None,
                        label="Library to scan",
                        interactive=True,
                        allow_custom_value=True,
                        elem_id="library-choice",
                    )
                    # Shown by the load event when writes need the key (and the page has no login that asked).
                    self.key = gr.Textbox(label="API key", type="password", visible=False, elem_id="key-lib")
                self.force = gr.Checkbox(
                    False,
                    label="Mark missing files offline even when most of the library is missing (force)",
                    info="Only when the files were really deleted: mount safety otherwise treats a mostly empty "
                    "folder as a share that is not mounted, and changes nothing.",
                    elem_id="library-force",
                )
                self.scan_button = gr.Button("Scan now", variant="primary", elem_id="library-scan")
            self.refresh_button = gr.Button("Refresh", size="sm", elem_id="library-refresh")
            self.message = gr.Markdown(elem_id="library-message")
            self.timer = gr.Timer(POLL_S, active=False)

    def wire(self, other_keys: list[gr.Textbox]) -> None:
        """``other_keys``: the Add and Duplicates tabs' key boxes (a key typed in any counts)."""
        listed = [self.overview, self.choice, self.timer, self.controls]
        self.tab.select(self._read, self.choice, listed, api_visibility="private", concurrency_limit=None)
        self.refresh_button.click(self._read, self.choice, listed, api_name="libraries", concurrency_limit=None)
        # Polls without Gradio's progress marks: the list is updated in place, no flicker every tick.
        self.timer.tick(
            self._poll,
            None,
            [self.overview, self.timer],
            api_visibility="private",
            show_progress="hidden",
            concurrency_limit=None,
        )
        self.scan_button.click(
            self.scan,
            [self.choice, self.force, self.key, *other_keys],
            [self.message, self.overview, self.timer],
            api_name="scan_library",
            concurrency_limit=1,
        )

    def _list(self) -> tuple[str, list[str], bool]:
        """``(the libraries as Markdown, their names, whether a scan runs)``; a database that does not answer is
        said in words."""
        service = self.ctx.get_service()
        try:
            statuses = service.libraries.list()
        except ServiceError as exc:
            return f"✗ The libraries cannot be read now: {escape(str(exc))}", [], False
        text = libraries_markdown(statuses, self.ctx.settings.library_offline_grace_s)
        return text, [s.library.name for s in statuses], any_active(statuses)

    def read(self, chosen: str | None) -> tuple[Any, ...]:
        """Every library, the names to choose from (keeping ``chosen``, else the first), the poll on while a scan
        runs, and "Scan now" with its choices shown once there is a library."""
        text, names, active = self._list()
        value = chosen if chosen in names else (names[0] if names else None)
        return text, gr.update(choices=names, value=value), gr.Timer(active=active), gr.update(visible=bool(names))

    def poll(self) -> tuple[Any, ...]:
        """The timer's tick: every library again, and the poll off once no scan runs."""
        text, _, active = self._list()
        return text, gr.Timer(active=active)

    def scan(
        self, name: str | None, force: bool, key: str, add_key: str, dup_key: str, request: gr.Request
    ) -> tuple[Any, ...]:
        """Start a scan of library ``name`` (``force``: mark missing files offline past mount safety's limit), or
        say that one already runs; then poll its progress."""
        self.ctx.may_write([key, add_key, dup_key], request, what="Scanning a library needs")
        if not name:
            refuse("Choose the library to scan.")
        try:
            status, started = self.ctx.get_service().libraries.scan(str(name), force=bool(force))
        except ServiceError as exc:
            refuse(escape(str(exc)), logging.WARNING)
        shown = escape(status.library.name)
        if started:
            message = f"Scan of **{shown}** started" + (" with force." if force else ".")
        else:
            message = f"A scan of **{shown}** is already running (here or in another replica): its progress is below."
        text, _, _ = self._list()
        return message, text, gr.Timer(active=True)
