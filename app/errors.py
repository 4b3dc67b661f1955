"""Domain errors of the service.

Each error maps to one HTTP status in ``app/api/errors.py``; the modules that raise them know nothing of HTTP.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the service reports to a client.

    ``retry_after_s``: seconds a client should wait before retrying (sent as ``Retry-After``), or ``None``.
    """

    retry_after_s: float | None = None


class ImageDecodeError(ServiceError):
    """The uploaded bytes are not an image the service can index (base class)."""


class UnsupportedFormatError(ImageDecodeError):
    """The bytes are in a format no installed decoder reads (HTTP 415)."""


class ImageTooLargeError(ImageDecodeError):
    """The image (pixel count from its header) or the upload (bytes) is over the configured limit (HTTP 413)."""


class CorruptImageError(ImageDecodeError):
    """The format is recognised but the data is corrupt or truncated (HTTP 422)."""


class NoTextTowerError(ServiceError):
    """Text search was asked of a model that has no text encoder (HTTP 400)."""


class NoModelError(ServiceError):
    """Embedding was asked of a server started with ``EMBEDDER=none``, which loads no model (HTTP 400)."""


class InvalidVectorError(ServiceError):
    """A query vector (``POST /search_vector``) has the wrong length, non-finite values or zero norm (HTTP 422)."""


class InvalidParameterError(ServiceError):
    """A request parameter is out of its allowed range, e.g. ``top_k`` over ``MAX_TOP_K`` (HTTP 422)."""


class ImageNotFoundError(ServiceError):
    """No image with this id is stored (HTTP 404)."""


class CollectionMismatchError(ServiceError):
    """The stored collection was built with another model or dimension than the one loaded (startup error)."""

    def __init__(self, stored_model: str, stored_dim: int, loaded_model: str, loaded_dim: int) -> None:
        self.stored_model, self.stored_dim = stored_model, stored_dim
        self.loaded_model, self.loaded_dim = loaded_model, loaded_dim
        super().__init__(
            f"The collection holds embeddings from model '{stored_model}' (dim {stored_dim}), "
            f"but the service loaded model '{loaded_model}' (dim {loaded_dim}). Vectors from two models "
            "cannot be compared. Either configure the original model again (EMBEDDER / CLIP_MODEL / "
            "CLIP_PRETRAINED), or re-index every stored image with the new one: run `python scripts/reindex.py` "
            "(installed as image-search-reindex) with the settings this service has now (the new EMBEDDER / "
            "CLIP_MODEL / CLIP_PRETRAINED, the same DATA_DIR or DATABASE_URL and VECTOR_DB; with Milvus Lite, "
            "while the service is stopped). It re-embeds the originals into a new collection (resumable), makes "
            "it the active one when done and keeps the old one until you drop it; then start the service again."
        )


class VectorTypeMismatchError(CollectionMismatchError):
    """The stored collection uses another vector storage type (``VECTOR_TYPE``) than configured (startup error).

    A subclass of :class:`CollectionMismatchError`, so code that stops on a model mismatch stops on this too.
    """

    def __init__(self, stored_type: str, configured_type: str) -> None:
        self.stored_type, self.configured_type = stored_type, configured_type
        ServiceError.__init__(
            self,
            f"The collection stores its vectors as '{stored_type}', but VECTOR_TYPE is '{configured_type}'. "
            f"Set VECTOR_TYPE={stored_type} again, or copy the collection, without re-embedding, into an empty "
            f"database with VECTOR_TYPE={configured_type}: scripts/migrate.py --from pgvector --to pgvector "
            f"--to-database-url <empty database URL> --to-vector-type {configured_type}, then point DATABASE_URL "
            "at it.",
        )


class DatabaseUnavailableError(ServiceError):
    """The vector database cannot be reached or failed the request (HTTP 503, ``Retry-After: 2``).

    Two seconds: the embedded PostgreSQL's watchdog notices a dead server within 0.5 s and restarts it in about
    1-2 s (app/vectordb/watchdog.py).
    """

    retry_after_s = 2.0


class DatabaseTimeoutError(DatabaseUnavailableError):
    """The database did not answer a call within its client-side deadline (HTTP 503, as any unavailable database).

    The connection was dropped mid-call, so the outcome of a write is unknown: a server that only hung may still
    apply a commit it had received when it resumes. Writers keep what that row would point at (the stored original,
    app/indexing/write.py); re-sending the request is safe (writes are idempotent by content hash).
    """


class ServiceBusyError(ServiceError):
    """The service is at capacity for this request, e.g. too many decoded pixels in flight (HTTP 503 + Retry-After).

    ``retry_after_s`` is set per instance by the raiser.
    """

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StorageFullError(ServiceError):
    """The image store has no room for a write (disk full, or free space under ``MIN_FREE_MB``) (HTTP 507).

    Nothing of the refused write is kept.
    """


class StorageUnavailableError(ServiceError):
    """The object store holding the originals cannot be reached, times out or refuses the request (HTTP 503,
    ``Retry-After: 5``). Nothing of the refused write is kept; searches do not need the store and keep working.

    Messages name the store (``s3://bucket/prefix``) and what went wrong, never credentials.
    """

    retry_after_s = 5.0


class JobNotFoundError(ServiceError):
    """No background job with this id (HTTP 404)."""


class GraphNotBuiltError(ServiceError):
    """``GET /duplicates`` before any neighbour graph was built: start one with ``POST /jobs/neighbours`` (HTTP 409)."""


class LibraryNotFoundError(ServiceError):
    """No library with this name (HTTP 404)."""


class LibraryConflictError(ServiceError):
    """The request conflicts with a library's state (HTTP 409): a library of that name exists with other roots, a
    scan is running where the request needs none, or ``DELETE /image/{id}`` of a photo a library holds (remove or
    exclude the file in the library instead; the next scan would index it again)."""


class LibraryFileChangedError(ServiceError):
    """A library file no longer has the size or modification time it was indexed with (HTTP 409): its bytes may
    not be the image's any more, so none are served; the next scan of its library reads it again."""
