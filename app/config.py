"""One typed settings object for the whole service, read from environment variables (and ``.env``).

Every field here is listed, with its default and a comment, in ``.env.example``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration. Field names map to upper-case environment variables (``PORT``, ``DATA_DIR``...)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- server ---------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface uvicorn binds to; 0.0.0.0 inside Docker.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ui_enabled: bool = Field(True, description="Mount the Gradio UI at /ui.")

    # --- storage --------------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Root of everything the service writes by default.")
    image_dir: Path | None = Field(None, description="Originals, by content hash. Default: DATA_DIR/images.")
    model_cache_dir: Path | None = Field(None, description="Downloaded model weights. Default: DATA_DIR/models.")

    # --- vector database ------------------------------------------------------------------------------------
    vector_db: Literal["pgvector", "milvus", "manticore"] = Field(
        "pgvector", description="Vector database backend: pgvector, milvus or manticore."
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db). Unset: start the embedded "
        "PostgreSQL 18 + pgvector under DATA_DIR/pgdata.",
    )
    db_pool_min: int = Field(1, ge=1)
    db_pool_max: int = Field(10, ge=1)
    db_connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for a pooled connection.")
    milvus_uri: str = Field(
        "",
        description="A file path runs embedded Milvus Lite (default DATA_DIR/milvus.db, one process per file); "
        "http://host:19530 uses Milvus standalone or distributed.",
    )
    milvus_token: str | None = Field(None, description="Milvus credentials, 'user:password' or an API key.")
    manticore_host: str = Field("127.0.0.1", description="Manticore Search host (MySQL protocol).")
    manticore_port: int = Field(9306, ge=1, le=65535, description="Manticore Search MySQL-protocol port.")
    hnsw_m: int = Field(16, ge=2, le=100, description="HNSW graph degree (pgvector default 16).")
    hnsw_ef_construction: int = Field(64, ge=4, le=1000, description="HNSW build beam width (pgvector default 64).")
    hnsw_ef_search: int = Field(100, ge=1, le=1000, description="HNSW query beam width; must be >= top_k.")

    # --- model ----------------------------------------------------------------------------------------------
    embedder: Literal["auto", "clip", "efficientnet"] = Field(
        "auto", description="auto: CLIP when its weights load, otherwise the offline EfficientNet-Lite2."
    )
    clip_model: str = Field("ViT-B-32", description="open_clip architecture name.")
    clip_pretrained: str = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag, or a path to a local checkpoint file."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda > mps > cpu.")
    embed_batch_size: int = Field(32, ge=1, le=1024, description="Images per model call.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 = torch's default.")

    # --- limits ---------------------------------------------------------------------------------------------
    max_upload_mb: float = Field(50.0, gt=0, description="Largest accepted upload, MB (10^6 bytes).")
    max_image_pixels: int = Field(
        100_000_000,
        ge=1,
        # Pillow refuses more than 2 * Image.MAX_IMAGE_PIXELS (178,956,970) whatever we allow; say so up front.
        le=178_956_970,
        description="Largest accepted width*height, read from the header before decoding (at most 178956970).",
    )
    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)

    @field_validator("database_url", "milvus_token")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @cached_property
    def resolved_milvus_uri(self) -> str:
        """MILVUS_URI, or the Milvus Lite file DATA_DIR/milvus.db when unset."""
        return self.milvus_uri or str((self.data_dir / "milvus.db").resolve())

    @cached_property
    def resolved_image_dir(self) -> Path:
        """Directory of stored originals (IMAGE_DIR, or DATA_DIR/images)."""
        return (self.image_dir or self.data_dir / "images").resolve()

    @cached_property
    def resolved_model_cache_dir(self) -> Path:
        """Directory of downloaded model weights (MODEL_CACHE_DIR, or DATA_DIR/models)."""
        return (self.model_cache_dir or self.data_dir / "models").resolve()

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes."""
        return int(self.max_upload_mb * 1_000_000)
