"""What every panel of the web UI shares: :class:`UiContext` (the running service, the settings, the access rules
and the write-key check of one built UI), the escaping and error-collecting helpers of its handlers, and the
collection line the header shows and several panels refresh."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import gradio as gr

from app.api.security import AccessPolicy
from app.config import Settings
from app.errors import ServiceError
from app.imaging.prepare import check_upload_size
from ui.query import photos

if TYPE_CHECKING:  # for annotations only: importing app.service pulls in the decoders and the model code
    from app.service import SearchService
    from app.stats import ServiceStats

log = logging.getLogger(__name__)

#: The refusal of a write without the key starts with this (``may_write``'s ``what``).
WRITES = "Adding and deleting photos need"

#: Results per page unless the link or the slider says otherwise (at most MAX_TOP_K): about five rows on a laptop.
UI_TOP_K = 20


@dataclass(frozen=True, slots=True)
class UiContext:
    """One built UI's view of the service, handed to each panel.

    Attributes:
        get_service: returns the running :class:`SearchService`. The service exists only once the lifespan has
            opened it, after the UI is built, so handlers call this at call time, never at build time.
        settings: the service's settings (page size bounds, upload limits, batch limits, duplicate threshold).
        access: the service's access rules: writes from the UI (add, delete, find duplicates) pass the same checks
            as the REST API's, with the key typed into the page's key box (or the login, with API_KEY_READS).
    """

    get_service: Callable[[], SearchService]
    settings: Settings
    access: AccessPolicy

    @property
    def default_k(self) -> int:
        """Results per page when the link or the slider does not say."""
        return min(UI_TOP_K, self.settings.max_top_k)

    def may_write(self, keys: Sequence[str | None], request: gr.Request | None, what: str = WRITES) -> None:
        """Raise ``gr.Error`` unless this write may go on: the same rules as the REST API's writes. ``keys``: what
        the page's key boxes hold (one on each tab that writes; a key typed in any counts); ``what``: the write,
        for the refusal (``Scanning a library needs the service's API key: ...``)."""
        access = self.access
        key = next((k.strip() for k in keys if k and k.strip()), None)
        if access.has_keys:
            # With API_KEY_READS the page sits behind Gradio's login, whose password is the key: a logged-in user
            # has shown it.
            logged_in = access.reads_need_key and request is not None and getattr(request, "username", None)
            if not (logged_in or access.key_is_valid(key)):
                refuse(f"{what} the service's API key: type it into the key box.", logging.WARNING)
        elif refusal := access.write_refusal():
            refuse(escape(refusal), logging.WARNING)


def refuse(message: str, level: int = logging.INFO) -> NoReturn:
    """Refuse what a person asked for, in ``message`` (shown as Gradio's error message; already escaped).

    For expected mistakes (nothing chosen, no key, a file the service refuses): one log line at ``level`` (INFO;
    WARNING for a refused key or a service error), not the traceback Gradio prints for any other exception.

    Raises:
        gradio.Error: always, with ``print_exception=False``.
    """
    log.log(level, "The web UI refused a request: %s", message)
    raise gr.Error(message, print_exception=False)


def escape(message: str) -> str:
    """``message`` safe to show: Gradio renders messages as Markdown/HTML and these carry user-controlled text
    (file names, ids)."""
    return html.escape(message, quote=False)


@contextmanager
def as_message(errors: list[str]) -> Iterator[None]:
    """Collect the service's domain errors (written for people; the REST API returns them as ``detail``) and bad
    filter values into ``errors`` instead of failing the event; anything else is a bug Gradio logs."""
    try:
        yield
    except (ServiceError, ValueError) as exc:
        errors.append(str(exc))


def read_upload(path: str, settings: Settings) -> bytes:
    """The uploaded file's bytes; an over-size file is refused before it is read (413 rule of the service)."""
    check_upload_size(Path(path).stat().st_size, settings.max_upload_bytes)
    return Path(path).read_bytes()


def read_stats(service: SearchService) -> ServiceStats | str:
    """The service's stats, or why they cannot be read now (the database is down...), in words."""
    try:
        return service.stats()
    except ServiceError as exc:
        return f"The collection cannot be read now: {escape(str(exc))}"


def collection_line(service: SearchService, stats: ServiceStats | str | None = None) -> str:
    """The header's line, plain words first: ``273 photos · search by photo`` (``by photo or words`` with a CLIP
    model), the model, its dimensions and the database behind a "Details" disclosure; or why the collection cannot
    be read. ``stats``: already read ones (one database count per page load)."""
    stats = read_stats(service) if stats is None else stats
    if isinstance(stats, str):
        return stats
    by = "by photo or words" if service.supports_text else "by photo"
    technical = (
        f"model {escape(stats.model)} ({stats.dimension} dimensions) · database {escape(stats.backend)} · "
        "more under **About**"
    )
    return (
        f"**{photos(stats.count)}** · search {by} "
        f"<details id='collection-details'><summary>Details</summary>{technical}</details>"
    )
