"""The Gradio UI mounted at ``/ui``: search by example image or by text, browse results, add images.

It is a thin face on :class:`app.service.SearchService`, the same object the REST API uses, so both decode, embed
and rank identically. The service only exists once the FastAPI lifespan has run, which is after this UI is built
and mounted; every handler therefore asks ``get_service()`` at call time, and a ``demo.load`` event fills in what
depends on the service (collection line, top-k range, whether text search is possible) when a page opens.

Every event that a client may want has an ``api_name`` so it can be driven with ``gradio_client``::

    from gradio_client import Client, handle_file
    c = Client("http://localhost:8000/ui/")
    c.predict(handle_file("cat.jpg"), 5, api_name="/search_image")  # -> [{"image": path, "caption": ...}, ...]
    c.predict("a red car", 5, api_name="/search_text")
    c.predict(api_name="/stats")                                    # -> "12 images · model ... · backend pgvector"
    c.predict([handle_file("a.jpg")], api_name="/index_images")     # -> (summary, collection line)
"""

from __future__ import annotations

import base64
import html
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.utils import get_upload_folder

from app.api.security import AccessPolicy
from app.config import Settings
from app.errors import ServiceError
from app.imaging.prepare import check_upload_size

if TYPE_CHECKING:  # imported for annotations only: importing app.service pulls in the decoders and the model code
    from app.service import SearchService, ServiceStats
    from app.vectordb.base import SearchHit

log = logging.getLogger(__name__)

#: Longest side of the JPEG thumbnails shown in the results gallery, in pixels.
THUMBNAIL_SIZE = 384

#: How many runs of one search/index event may be in flight at once. Gradio's default is 1 per event, which would
#: queue every visitor behind each other although the service is thread-safe; a small bound keeps a burst of large
#: uploads from decoding dozens of 100-megapixel images at the same time.
CONCURRENCY_LIMIT = 4

_THUMBNAIL_DIR_NAME = "image-search-thumbnails"


# --- small pure helpers (tested directly) -----------------------------------------------------------------------
def format_stats(stats: ServiceStats) -> str:
    """The collection line: ``N images · model X (dim D) · backend B``."""
    noun = "image" if stats.count == 1 else "images"
    return f"{stats.count} {noun} · model {stats.model} (dim {stats.dimension}) · backend {stats.backend}"


def format_caption(hit: SearchHit) -> str:
    """Gallery caption of one result: ``score · filename``, score with 3 decimals."""
    return f"{hit.score:.3f} · {hit.metadata.filename}"


def text_search_note(model_id: str, supports_text: bool) -> str:
    """What the text tab says above its box: a hint, or why it is switched off."""
    if supports_text:
        return "Describe what you are looking for, e.g. *a red bicycle leaning on a wall*."
    return f"Text search needs a CLIP model; the loaded model {model_id} is image-only."


def _escape(message: str) -> str:
    # Gradio renders toast messages as HTML and these carry user-controlled text (file names, ids). Only <, > and &
    # are escaped so quotes stay readable for gradio_client callers, who receive the same string.
    return html.escape(message, quote=False)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the service's domain errors into a Gradio error toast carrying the service's own message.

    ServiceError messages are written for end users (the REST API returns them as ``detail``), so they are shown
    as they are, without a traceback. Anything else is a bug and is left to Gradio, which logs it and shows a
    generic error.
    """
    try:
        yield
    except ServiceError as exc:
        raise gr.Error(_escape(str(exc)), print_exception=False) from exc


def _check_top_k(top_k: Any, service: SearchService) -> int:
    # The slider bounds the UI, but API callers can send anything (and the image events skip Gradio's own
    # preprocessing, see _uploaded_image); the range rule is the service's, as for the REST API.
    try:
        k = None if top_k is None else int(round(float(top_k)))
    except (TypeError, ValueError):
        raise gr.Error(f"top_k must be a whole number, got {_escape(repr(top_k))[:80]}.") from None
    with _user_errors():
        return service.resolve_top_k(k)


def _read_upload(upload: str | bytes, settings: Settings) -> bytes:
    """The uploaded file's bytes, refusing over-size files before reading them into memory."""
    if isinstance(upload, bytes):
        data = upload
    else:
        check_upload_size(os.path.getsize(upload), settings.max_upload_bytes)
        data = Path(upload).read_bytes()
    return data


def _uploaded_image(payload: dict[str, Any] | None) -> str | bytes | None:
    """The query image as Gradio received it: the uploaded file's path, or the bytes of a ``data:`` URL.

    The image events run with ``preprocess=False`` because the stock ``gr.Image.preprocess`` opens every upload
    with PIL (failing with a bare traceback on formats PIL cannot read, such as JPEG XL, or on a corrupt file) and
    re-encodes it when its mode differs from ``image_mode``, which drops EXIF orientation and changes the bytes.
    Reading the file as uploaded lets the service's decoder see exactly what the REST API would: same EXIF
    handling, same formats, same content hash (an upload of an indexed file reuses its stored vector). Gradio
    still checks, before this runs, that the path lies in its upload folder, so a client cannot name any file.
    """
    if not payload:
        return None
    url = payload.get("url") or ""
    if url.startswith("data:"):
        return base64.b64decode(url.partition(",")[2])
    return payload.get("path")


def _thumbnail_dir() -> Path:
    # Gradio serves files in its upload folder as they are, without copying them and whatever allowed_paths the
    # mounting app passed, so thumbnails are written there. Names are the image id (SHA-256 of the original's bytes)
    # and size, so a file never goes stale and later searches skip decoding a possibly large original again.
    path = Path(get_upload_folder()) / _THUMBNAIL_DIR_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def _thumbnail_file(service: SearchService, image_id: str, size: int = THUMBNAIL_SIZE) -> str:
    """Path of a JPEG thumbnail of an indexed image, made by :meth:`SearchService.thumbnail` on first use.

    Browsers cannot show HEIC/TIFF/JXL originals, so the gallery always gets these JPEGs.
    """
    path = _thumbnail_dir() / f"{image_id}-{size}.jpg"
    if not path.is_file():
        data = service.thumbnail(image_id, size)
        # Write then rename, so a concurrent search never serves a half-written file.
        part = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.part")
        part.write_bytes(data)
        os.replace(part, path)
    return str(path)


def _gallery(service: SearchService, hits: Sequence[SearchHit]) -> list[tuple[str, str]]:
    """Gallery value for search hits: ``(thumbnail path, caption)`` pairs, best first.

    A hit whose stored original cannot be read (deleted from disk, unreadable) is left out with a warning rather
    than failing the whole search.
    """

    def one(hit: SearchHit) -> tuple[str, str] | str:
        try:
            return _thumbnail_file(service, hit.id), format_caption(hit)
        except ServiceError as exc:
            return f"Cannot show {hit.metadata.filename}: {exc}"

    # Thumbnails not cached yet mean decoding originals, which can be large: do them in parallel (PIL releases the
    # GIL while decoding). Warnings are raised here, not in the workers, since gr.Warning needs the request context.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(hits)))) as pool:
        results = list(pool.map(one, hits))
    items = []
    for result in results:
        if isinstance(result, str):
            log.warning("%s", result)
            gr.Warning(_escape(result))
        else:
            items.append(result)
    return items


# --- the UI --------------------------------------------------------------------------------------------------------
def build_ui(get_service: Callable[[], SearchService], settings: Settings | None = None) -> gr.Blocks:
    """Build the Gradio Blocks app; mount it with ``gr.mount_gradio_app(app, build_ui(...), path="/ui")``.

    Args:
        get_service: returns the running :class:`SearchService`. Called only inside event handlers, because the
            service is created by the FastAPI lifespan, after the UI is built.
        settings: used only for the top-k slider's range at build time, which also bounds what API clients may
            send; when omitted, the defaults of :class:`Settings` are used. Each page load sets the slider from the
            running service's settings anyway.

    Events with an ``api_name`` (callable with ``gradio_client``): ``search_image(image, top_k)`` and
    ``search_text(query, top_k)`` return the gallery, ``stats()`` the collection line, ``index_images(files)`` a
    summary and the new collection line.
    """
    fields = Settings.model_fields
    default_k = settings.default_top_k if settings else fields["default_top_k"].default
    max_k = settings.max_top_k if settings else fields["max_top_k"].default

    # --- handlers ------------------------------------------------------------------------------------------------
    def search_image(payload: dict[str, Any] | None, top_k: Any) -> list[tuple[str, str]]:
        """The indexed images most similar to the uploaded one, as (thumbnail, "score · filename") pairs.

        Gets Gradio's raw input (``preprocess=False``, see :func:`_uploaded_image`).
        """
        service = get_service()
        k = _check_top_k(top_k, service)
        image = _uploaded_image(payload)
        if image is None:
            raise gr.Error("Upload or paste an image to search with.")
        with _user_errors():
            hits = service.search_image(_read_upload(image, service.settings), k)
            if not hits:
                gr.Info("The index is empty: add images under “Add to index” first.")
            return _gallery(service, hits)

    def search_text(query: str | None, top_k: float) -> list[tuple[str, str]]:
        """The indexed images that best match a description (CLIP models only)."""
        service = get_service()
        k = _check_top_k(top_k, service)
        if not service.supports_text:
            # The box is disabled in the page, but API clients can still call this.
            raise gr.Error(_escape(text_search_note(service.embedder.model_id, False)), print_exception=False)
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a description to search for.")
        with _user_errors():
            hits = service.search_text(query, k)
            if not hits:
                gr.Info("The index is empty: add images under “Add to index” first.")
            return _gallery(service, hits)

    def stats() -> str:
        """The collection line, ``N images · model X (dim D) · backend B``."""
        with _user_errors():
            return format_stats(get_service().stats())

    def index_images(files: list[str] | None) -> tuple[str, str]:
        """Index uploaded files one by one; returns a summary and the refreshed collection line.

        A file that fails (not an image, corrupt, too large) gets a warning with the service's message and does not
        stop the others.
        """
        service = get_service()
        # The same secure default as the API's writes; with API_KEY set, the UI's login already asked for a key.
        if refusal := AccessPolicy(service.settings).write_refusal():
            raise gr.Error(refusal, print_exception=False)
        if not files:
            raise gr.Error("Choose one or more image files to add.")
        added = existing = 0
        failed: list[str] = []
        for path in files:
            # Gradio keeps the uploaded file's own name as the last path component.
            name = Path(path).name
            try:
                result = service.index_image(_read_upload(path, service.settings), name)
            except ServiceError as exc:
                failed.append(name)
                gr.Warning(_escape(f"{name}: {exc}"))
                continue
            if result.status == "indexed":
                added += 1
            else:
                existing += 1
        summary = f"Added {added}, already indexed {existing}, failed {len(failed)}."
        return summary, stats()

    def load_state() -> tuple[Any, ...]:
        """Per-page state that needs the running service: collection line, top-k range, text search on or off."""
        service = get_service()
        s = service.settings
        text_ok = service.supports_text
        try:
            line = format_stats(service.stats())
        except ServiceError as exc:  # e.g. the database is down: the page still opens and says why
            line = f"Collection unavailable: {exc}"
        return (
            line,
            gr.update(maximum=s.max_top_k, value=min(s.default_top_k, s.max_top_k)),
            gr.update(value=text_search_note(service.embedder.model_id, text_ok)),
            gr.update(interactive=text_ok),
            gr.update(interactive=text_ok),
        )

    # --- layout --------------------------------------------------------------------------------------------------
    with gr.Blocks(title="Image similarity search", analytics_enabled=False) as demo:
        gr.Markdown("# Image similarity search")
        with gr.Row(equal_height=True):
            stats_line = gr.Markdown("Loading…", elem_id="collection-stats")
            refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                with gr.Tabs():
                    with gr.Tab("Search by image"):
                        image = gr.Image(
                            label="Query image (upload or paste)",
                            type="filepath",
                            sources=["upload", "clipboard"],
                            height=320,
                        )
                        image_button = gr.Button("Search", variant="primary")
                    with gr.Tab("Search by text"):
                        text_note = gr.Markdown(elem_id="text-search-note")
                        # Disabled until the page load has checked the model: most of the time it cannot.
                        query = gr.Textbox(
                            label="Description", placeholder="a dog running on a beach", lines=1, interactive=False
                        )
                        text_button = gr.Button("Search", variant="primary", interactive=False)
                    with gr.Tab("Add to index"):
                        files = gr.File(label="Images to add", file_count="multiple", type="filepath")
                        add_button = gr.Button("Add to index", variant="primary")
                        add_result = gr.Markdown()
                top_k = gr.Slider(1, max_k, value=min(default_k, max_k), step=1, label="Number of results (top k)")
            with gr.Column(scale=3):
                gallery = gr.Gallery(
                    label="Results (score · file name)",
                    columns=3,
                    height="auto",
                    object_fit="contain",
                    interactive=False,
                    allow_preview=True,
                )
        gr.Markdown("Scores are cosine similarity, higher is closer. The same service answers the [REST API](../docs).")

        search = dict(
            fn=search_image,
            inputs=[image, top_k],
            outputs=gallery,
            preprocess=False,  # the handler reads the uploaded file itself, see _uploaded_image
            concurrency_limit=CONCURRENCY_LIMIT,
        )
        image_button.click(**search, api_name="search_image")
        # Searching as soon as an image arrives saves a click; one public endpoint is enough for API clients.
        image.upload(**search, api_visibility="private")

        text_search = dict(fn=search_text, inputs=[query, top_k], outputs=gallery, concurrency_limit=CONCURRENCY_LIMIT)
        text_button.click(**text_search, api_name="search_text")
        query.submit(**text_search, api_visibility="private")

        add_button.click(
            index_images,
            inputs=files,
            outputs=[add_result, stats_line],
            api_name="index_images",
            concurrency_limit=CONCURRENCY_LIMIT,
        )
        refresh.click(stats, outputs=stats_line, api_name="stats")
        demo.load(
            load_state,
            outputs=[stats_line, top_k, text_note, query, text_button],
            api_visibility="private",
        )
    return demo
