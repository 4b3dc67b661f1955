"""Where the uploaded originals live, behind one contract (:class:`app.storage.base.ImageStore`).

- :mod:`app.storage.base`: the contract every store meets (put by content hash, get as a stream with byte ranges,
  head, delete, walk for fsck) and the shapes it returns;
- :mod:`app.storage.local`: today's file store under ``IMAGE_DIR`` (``ab/cd/<sha256>.<ext>``);
- :mod:`app.storage.s3`: S3-compatible object storage (AWS S3, MinIO, R2, B2...) through ``obstore``, same keys;
- :func:`from_settings`: the store ``IMAGE_STORE_URL`` names (unset or ``file:///path``: the file store; the URL's
  grammar is :func:`app.store_url.parse_store_url`, below the settings and the stores alike), and
  :func:`warn_if_replicas_unsafe` when its write locks cannot be shared by replicas that share everything else;
- :mod:`app.storage.originals`: the originals as the service hands them out (a local file, a saved copy, a stream);
- :mod:`app.storage.move`: the resumable, hash-verified move of the originals from one store to another
  (``scripts/move_originals.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.config import Settings
from app.locks import PgAdvisoryLocks
from app.storage.base import ImageStore, ObjectInfo, ObjectStream, StoreEntry, StoreHealth
from app.storage.local import LocalImageStore
from app.storage.s3 import S3ImageStore
from app.store_url import parse_store_url

__all__ = [
    "ImageStore",
    "ObjectInfo",
    "ObjectStream",
    "StoreEntry",
    "StoreHealth",
    "from_settings",
    "warn_if_replicas_unsafe",
]

log = logging.getLogger(__name__)


def from_settings(settings: Settings, *, with_space_check: bool = True) -> ImageStore:
    """The image store the settings name: ``IMAGE_STORE_URL`` (``s3://`` or ``file://``), else ``IMAGE_DIR`` /
    ``DATA_DIR/images``.

    ``with_space_check``: apply ``MIN_FREE_MB`` to the file store (the tools that only read or repair pass
    ``False``). The per-id write locks are PostgreSQL advisory locks in ``Settings.shared_state_url`` (the
    ``DATABASE_URL``, with every ``VECTOR_DB``: shared by every machine; beside Milvus or Manticore behind a breaker
    of their own), else ``flock`` files (one machine). Raises ``ValueError`` for a malformed URL; never waits for an
    object store or the database (start-up works while they are down).
    """
    scheme, location, prefix = parse_store_url(settings.image_store_url)
    store: ImageStore
    if scheme == "s3":
        store = S3ImageStore.from_settings(settings, bucket=location, prefix=prefix)
    else:
        root = Path(location) if location else settings.resolved_image_dir
        store = LocalImageStore(root, min_free_bytes=settings.min_free_bytes if with_space_check else 0)
    if settings.shared_state_url:
        # A database every replica shares: its advisory locks exclude writers on every machine, not just this one.
        # Milvus and Manticore have no locks of their own, so with them too the locks live in this PostgreSQL.
        locks = PgAdvisoryLocks(
            settings.shared_state_url, wait_s=settings.db_connect_timeout_s, call_s=settings.db_statement_timeout_s
        )
        if settings.vector_db != "pgvector":
            # No vector-database guard watches this PostgreSQL: a breaker of its own makes writes answer 503 at
            # once while it is down and tells /health (``shared_state``).
            from app.vectordb.guard import GuardedHandler

            locks = GuardedHandler(locks, name="shared-state database (DATABASE_URL)")
        store.locks = locks
    return store


def warn_if_replicas_unsafe(settings: Settings, store: ImageStore) -> None:
    """Log one WARNING when the originals are in object storage and the vectors on a server (Milvus or Manticore:
    the set-up of several replicas) but no ``DATABASE_URL`` shares the write locks and the neighbour graph, which
    then stay on this machine. Raises nothing."""
    remote_vectors = settings.vector_db == "manticore" or (
        settings.vector_db == "milvus" and "://" in settings.resolved_milvus_uri
    )
    if remote_vectors and store.url.startswith("s3://") and not settings.shared_state_url:
        log.warning(
            "Originals in object storage and %s on a server, but no DATABASE_URL: the write locks and the "
            "neighbour graph stay on this machine, so run ONE replica, or set DATABASE_URL to a PostgreSQL "
            "every replica reaches (docs/scaling.md).",
            settings.vector_db,
        )
