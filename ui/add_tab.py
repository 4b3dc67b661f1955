"""The Add tab: photos chosen, dropped or pasted are indexed in batches (the ``add`` API name), one ✓/✗ row per
file (``/add`` of :mod:`ui.api` for scripts); its key box is shown when writes need the service's API key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import ServiceError
from app.imaging.prepare import check_upload_size
from ui.context import UiContext, collection_line, refuse


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
            api_visibility="private",  # scripts: /add of ui.api
            concurrency_limit=1,
            concurrency_id="add",
        )

    def add(
        self,
        files: list[str] | None,
        key: str,
        other_key: str,
        request: gr.Request,
        progress=gr.Progress(),
    ) -> tuple[Any, ...]:
        """The page's "Add to the collection": :meth:`add_files`, shown as a summary and one ✓/✗ row per file."""
        summary, rows, line = self.add_files(files, [key, other_key], request, progress)
        table = [["✓" if row["ok"] else "✗", row["file"], row["result"]] for row in rows]
        return summary, table, line, gr.update(value=None)

    def add_files(
        self, files: list[str] | None, keys: list[str], request: gr.Request | None, progress: gr.Progress
    ) -> tuple[str, list[dict[str, Any]], str]:
        """Index the chosen files in batches within MAX_BATCH_FILES and MAX_BATCH_MB, each judged on its own as
        ``POST /index_images`` judges the files of a request: one over MAX_UPLOAD_MB is refused with the reason and
        the others are added.

        Returns:
            ``(summary, rows, collection line)``; ``rows`` in the order the files were given, each
            ``{"file": name, "ok": bool, "result": "added" | "already in the collection" | why it was refused,
            "id": image id or None}``.

        Raises:
            gradio.Error: without the key where writes need one, or with no file (:func:`ui.context.refuse`).
        """
        self.ctx.may_write(keys, request)
        if not files:
            refuse("Choose, drop or paste photos to add.")
        service = self.ctx.get_service()
        s = service.settings
        rows: list[dict[str, Any] | None] = [None] * len(files)
        batch: list[tuple[int, bytes, str]] = []  # (position in files, bytes, name)
        batch_bytes = 0
        done = 0
        progress((0, len(files)), desc="Adding", unit="photos")

        def row(name: str, ok: bool, result: str, image_id: str | None = None) -> dict[str, Any]:
            return {"file": name, "ok": ok, "result": result, "id": image_id}

        def flush() -> None:
            nonlocal batch, batch_bytes, done
            if not batch:
                return
            try:
                results = service.index_images([(data, name) for _, data, name in batch])
            except ServiceError as exc:  # the whole batch (database down, disk full): nothing of it is stored
                for n, _, name in batch:
                    rows[n] = row(name, False, str(exc))
            else:
                for (n, _, name), r in zip(batch, results, strict=True):
                    if r.status == "error":
                        rows[n] = row(name, False, str(r.error))
                    else:
                        added = "added" if r.status == "indexed" else "already in the collection"
                        rows[n] = row(name, True, added, r.id)
            done += len(batch)
            progress((done, len(files)), desc="Adding", unit="photos")
            batch, batch_bytes = [], 0

        for n, path in enumerate(files):
            name = Path(path).name  # Gradio keeps the uploaded file's own name as the last path component
            size = Path(path).stat().st_size
            try:
                check_upload_size(size, s.max_upload_bytes, what="file")
            except ServiceError as exc:
                rows[n] = row(name, False, str(exc))
                done += 1
                continue
            if batch and (len(batch) >= s.max_batch_files or batch_bytes + size > s.max_batch_bytes):
                flush()
            batch.append((n, Path(path).read_bytes(), name))
            batch_bytes += size
        flush()
        judged = [r for r in rows if r is not None]
        added = sum(1 for r in judged if r["ok"])
        summary = f"{added} of {len(judged)} added or already there; {len(judged) - added} refused."
        return summary, judged, collection_line(service)
