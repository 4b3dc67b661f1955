"""The Add tab: photos chosen, dropped or pasted are indexed in batches (the ``add`` API name), one ✓/✗ row per
file; its key box is shown when writes need the service's API key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import ServiceError
from app.imaging.prepare import check_upload_size
from ui.context import UiContext, collection_line


class AddTab:
    """The Add tab's components (made by :meth:`layout`), events (:meth:`wire`) and handler."""

    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    def layout(self) -> None:
        """The tab and its components, inside the page's ``gr.Tabs``."""
        with gr.Tab("Add", id="add", elem_id="tab-add"):
            self.files = gr.File(
                label="Photos to add: choose, drop here or paste (any format)",
                file_count="multiple",
                type="filepath",
                elem_id="add-files",
            )
            # Shown by the load event when writes need the key (and the page has no login that asked for it).
            self.key = gr.Textbox(label="API key", type="password", visible=False, elem_id="key-add")
            self.button = gr.Button("Add to the collection", variant="primary", elem_id="add-button")
            self.summary = gr.Markdown(elem_id="add-summary")
            self.table = gr.Dataframe(
                headers=["", "File", "Result"],
                datatype=["str", "str", "str"],
                interactive=False,
                wrap=True,
                elem_id="add-results",
            )

    def wire(self, collection: gr.Markdown, other_key: gr.Textbox) -> None:
        """``collection``: the header's collection line, refreshed after adding; ``other_key``: the Duplicates
        tab's key box (a key typed in either counts)."""
        self.button.click(
            self.add,
            [self.files, self.key, other_key],
            [self.summary, self.table, collection, self.files],
            api_name="add",
            concurrency_limit=1,
        )

    def add(
        self,
        files: list[str] | None,
        key: str,
        other_key: str,
        request: gr.Request,
        progress=gr.Progress(),
    ) -> tuple[Any, ...]:
        """Index the chosen files in batches within MAX_BATCH_FILES and MAX_BATCH_MB; one ✓/✗ row per file."""
        self.ctx.may_write([key, other_key], request)
        if not files:
            raise gr.Error("Choose, drop or paste photos to add.")
        service = self.ctx.get_service()
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
