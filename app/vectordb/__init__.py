"""Vector database backends behind one interface, :class:`VectorDBHandler`; :func:`create_handler` picks one."""

from __future__ import annotations

from app.config import Settings
from app.vectordb.base import CollectionInfo, ImageMetadata, ImageRecord, SearchHit, VectorDBHandler

__all__ = ["CollectionInfo", "ImageMetadata", "ImageRecord", "SearchHit", "VectorDBHandler", "create_handler"]


def create_handler(settings: Settings) -> VectorDBHandler:
    """Build the backend named by ``settings.vector_db`` (``VECTOR_DB``) with its ``from_settings``.

    pgvector: ``DATABASE_URL`` if set, otherwise the embedded PostgreSQL under ``DATA_DIR/pgdata`` (started here,
    stopped by the handler's ``close``). milvus: ``MILVUS_URI`` (a file path runs Milvus Lite). manticore:
    ``MANTICORE_HOST``/``MANTICORE_PORT``. Raises :class:`app.errors.DatabaseUnavailableError` when the database
    cannot be reached.
    """
    if settings.vector_db == "pgvector":
        from app.vectordb.pgvector import PgVectorHandler

        return PgVectorHandler.from_settings(settings)
    if settings.vector_db == "milvus":
        from app.vectordb.milvus import MilvusHandler

        return MilvusHandler.from_settings(settings)
    if settings.vector_db == "manticore":
        from app.vectordb.manticore import ManticoreHandler

        return ManticoreHandler.from_settings(settings)
    raise ValueError(f"unknown VECTOR_DB {settings.vector_db!r}")
