"""The About tab: what the service runs (collection size, model, dimensions, database, device) and its key rules,
in plain words, and "Refresh", which also refreshes the header's collection line (the ``stats`` API name)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from app.api.security import AccessPolicy
from ui.context import UiContext, collection_line, escape, read_stats
from ui.query import photos

if TYPE_CHECKING:
    from app.service import SearchService
    from app.stats import ServiceStats


def about_text(service: SearchService, access: AccessPolicy, stats: ServiceStats | str | None = None) -> str:
    """The About tab: the collection in plain words, the model, its dimensions, the database, the key rules."""
    stats = read_stats(service) if stats is None else stats
    count = stats if isinstance(stats, str) else f"The collection holds **{photos(stats.count)}**."
    model = service.embedder
    if access.has_keys:
        keys = "Adding and deleting photos, and scanning libraries, need the service's API key" + (
            "; so does everything else." if access.reads_need_key else "; searching does not."
        )
    elif refusal := access.write_refusal():
        keys = escape(refusal)
    else:
        keys = "No API key is set: anyone who can reach this page may add and delete photos and scan libraries."
    return "\n".join(
        [
            count,
            "",
            f"- Model: **{escape(model.model_id)}** ({'photos and words' if model.supports_text else 'photos only'})",
            f"- Dimensions: **{model.dim}**",
            f"- Database: **{service.db.backend_name}**",
            f"- Runs on: {model.device}",
            f"- {keys}",
            "",
            "Scores are cosine similarity: 1 is identical, higher is closer. Everything here is also in the "
            "[REST API](/docs).",
        ]
    )


class AboutTab:
    """The About tab's components (made by :meth:`layout`), events (:meth:`wire`) and handler; the load event
    fills :attr:`text` first."""

    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    def layout(self) -> None:
        """The tab and its components, inside the page's ``gr.Tabs``."""
        with gr.Tab("About", id="about", elem_id="tab-about") as self.tab:
            self.text = gr.Markdown(elem_id="about")
            self.refresh = gr.Button("Refresh", size="sm")

    def wire(self, collection: gr.Markdown) -> None:
        """``collection``: the header's collection line, refreshed with the tab."""
        # Read again whenever the tab is opened: photos added or deleted since the page loaded (here, in another
        # tab or by a script) are counted.
        for shown in (self.tab.select, self.refresh.click):
            shown(self.read, None, [self.text, collection], api_visibility="private", show_progress="hidden")

    def read(self) -> tuple[str, str]:
        """The tab's text and the header's collection line, from one read of the stats."""
        service = self.ctx.get_service()
        stats = read_stats(service)
        return about_text(service, self.ctx.access, stats), collection_line(service, stats)

    def stats(self) -> str:
        """The collection line, ``273 photos · model X (D dimensions) · backend B``."""
        return collection_line(self.ctx.get_service())
