"""One typed settings object for the whole service, read from environment variables (and ``.env``).

Every field here is listed, with its default and a comment, in ``.env.example``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.store_url import parse_store_url


class Settings(BaseSettings):
    """Service configuration. Field names map to upper-case environment variables (``PORT``, ``DATA_DIR``...)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- server ---------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface uvicorn binds to; 0.0.0.0 inside Docker.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ui_enabled: bool = Field(
        True, description="Serve the Gradio web UI at /ui/; false serves the API alone and never imports Gradio."
    )

    # --- access (app/api/security.py applies these) ---------------------------------------------------------
    # SecretStr: the keys never show in a repr, a log line or a traceback of the settings.
    api_key: SecretStr | None = Field(
        None,
        description="Key(s) that writes need (Authorization: Bearer KEY or X-API-Key: KEY); several separated by "
        "commas, so a key can be rotated. The web UI asks for it in a key box to add or delete (with API_KEY_READS: "
        "at its login, as the password). Unset: no key.",
    )
    api_key_reads: bool = Field(False, description="Require the key for every endpoint except /health too.")
    allow_anonymous_writes: bool = Field(
        False,
        description="Accept writes without a key although HOST is not a loopback address (otherwise they get 403).",
    )
    cors_origins: str = Field(
        "", description="Origins allowed to call the API from a browser, comma-separated ('*' = any); empty: no CORS."
    )
    allowed_hosts: str = Field(
        "",
        description="Host names (the Host header, without port) the service answers, comma-separated; '*.example.com' "
        "matches subdomains, '*' any. Other hosts get 400 (DNS rebinding). Empty: the loopback names (localhost, "
        "127.0.0.1, [::1] and HOST) when HOST is a loopback address, otherwise any host (with a start-up WARNING). "
        "Behind a reverse proxy: the public name(s) the proxy forwards in Host.",
    )
    public_url: str = Field(
        "",
        description="Base URL clients reach the service at (https://images.example.com, or with a path prefix "
        "behind a proxy); the image_url of search results is built from it, and its origin may make state-changing "
        "requests from a browser. Empty: image_url follows the request's Host when ALLOWED_HOSTS restricts it (the "
        "loopback default does), else it is a path (/image/ID).",
    )
    sla_p95_ms: float = Field(
        500.0, gt=0, description="Latency target, ms: GET /stats reports per route whether its recent p95 meets it."
    )

    # --- storage --------------------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Root of everything the service writes by default.")
    image_dir: Path | None = Field(None, description="Originals, by content hash. Default: DATA_DIR/images.")
    model_cache_dir: Path | None = Field(None, description="Downloaded model weights. Default: DATA_DIR/models.")
    min_free_mb: float = Field(
        500.0,
        ge=0,
        description="Free space under IMAGE_DIR, MB (10^6 bytes), below which writes answer 507 before they start "
        "and /health reports storage: low; 0 disables the check (a write that hits a full disk still answers 507).",
    )
    orphan_grace_s: float = Field(
        600.0,
        ge=0,
        description="Start-up sweep: temporary upload files and originals without a database row older than this "
        "many seconds are removed (what a kill -9 during a write leaves).",
    )

    # --- object storage of the originals (app/storage/) ---------------------------------------------------
    image_store_url: str | None = Field(
        None,
        description="Where the originals live: unset or file:///path = the file store (IMAGE_DIR, or the path); "
        "s3://bucket/prefix = S3-compatible object storage (AWS S3, MinIO, R2, B2...), configured by the AWS_* "
        "settings below. The bucket must exist.",
    )
    aws_endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://minio:9000; unset: AWS S3 of AWS_REGION. http:// is allowed."
    )
    aws_access_key_id: SecretStr | None = Field(None, description="S3 access key id; unset: none is sent.")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    aws_region: str = Field("us-east-1", description="S3 region (MinIO accepts any).")
    s3_path_style: bool = Field(
        True,
        description="Path-style addressing (http://endpoint/bucket/key), as MinIO and most self-hosted stores "
        "need; false: virtual-hosted style (http://bucket.endpoint/key).",
    )
    s3_connect_timeout_s: float = Field(2.0, gt=0, le=60, description="Seconds to wait for a connection to S3.")
    s3_read_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Seconds one S3 request may take in all (a large original included)."
    )
    s3_max_retries: int = Field(
        1,
        ge=0,
        le=10,
        description="Retries of a failed S3 request; with the timeouts this bounds how long a write waits before "
        "it answers 503 while the object store is down.",
    )

    # --- vector database ------------------------------------------------------------------------------------
    vector_db: Literal["pgvector", "milvus", "manticore"] = Field(
        "pgvector", description="Vector database backend: pgvector, milvus or manticore."
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db). With VECTOR_DB=pgvector it holds the "
        "vectors (unset: start the embedded PostgreSQL 18 + pgvector under DATA_DIR/pgdata). With every backend it "
        "also holds what replicas share besides vectors and originals: the per-id write locks (advisory locks), the "
        "neighbour graph, duplicate groups and job progress; with Milvus or Manticore any PostgreSQL 12+ will do "
        "(no pgvector needed), and unset keeps those on this machine (flock files, SQLite): one replica only.",
    )
    db_pool_min: int = Field(1, ge=1)
    db_pool_max: int = Field(10, ge=1)
    db_connect_timeout_s: float = Field(10.0, gt=0, description="Seconds to wait for a pooled connection.")
    db_request_timeout_s: float = Field(
        0.5,
        gt=0,
        le=30,
        description="Seconds a request waits for a pooled PostgreSQL connection before it answers 503 (start-up "
        "waits DB_CONNECT_TIMEOUT_S instead). 0.5 keeps every 503 under 1 s while the database is down.",
    )
    db_statement_timeout_s: float = Field(
        1.5,
        ge=0,
        le=600,
        description="Deadline, seconds, of every database call a request makes (index builds and collection switches "
        "excepted): PostgreSQL's statement_timeout, and the client gives up DEADLINE_GRACE_S (0.5 s) later if the "
        "server does not answer at all (a hung server answers 503 within about 2 s instead of holding requests). "
        "Milvus: the gRPC deadline of each call of a request (search, get, exists, count, upsert, delete, health); "
        "Manticore: the read/write timeout of the request connections (neither has a server-side limit to wait "
        "for, so no 0.5 s grace). Long "
        "operations (index builds, loading, scans, collection switches) keep DB_CONNECT_TIMEOUT_S or longer. For "
        "every backend a health probe unanswered for 1.5 s turns /health and requests to 503. 0 disables "
        "(Milvus then uses DB_CONNECT_TIMEOUT_S per call, Manticore its 60 s read timeout).",
    )
    milvus_uri: str = Field(
        "",
        description="A file path runs embedded Milvus Lite (default DATA_DIR/milvus.db, one process per file); "
        "http://host:19530 uses Milvus standalone or distributed.",
    )
    milvus_token: str | None = Field(None, description="Milvus credentials, 'user:password' or an API key.")
    manticore_host: str = Field("127.0.0.1", description="Manticore Search host (MySQL protocol).")
    manticore_port: int = Field(9306, ge=1, le=65535, description="Manticore Search MySQL-protocol port.")
    # Defaults measured with bench/search_scale.py (docs/benchmarks.md, "Search at scale"): with m=16 and
    # ef_construction=64, 1M 512-d vectors need ef_search 120-160 for recall@10 >= 0.95 (0.951 at 120, 0.971 at
    # 160), at a p50 under 10 ms on 2 cores; smaller collections reach it with less and pay little for 160.
    hnsw_m: int = Field(16, ge=2, le=100, description="HNSW graph degree (pgvector default 16).")
    hnsw_ef_construction: int = Field(64, ge=4, le=1000, description="HNSW build beam width (pgvector default 64).")
    hnsw_ef_search: int = Field(
        160,
        ge=1,
        le=1000,
        description="HNSW query beam width (raised to top_k per query when smaller); 160 keeps recall@10 >= 0.95 "
        "up to 1M vectors (bench/search_scale.py).",
    )
    vector_type: Literal["vector", "halfvec"] = Field(
        "vector",
        description="pgvector storage of embeddings: vector (float32) or halfvec (float16: half the table and "
        "index size). Fixed when the collection is created; a different value later is a startup error. "
        "pgvector only (Milvus and Manticore store float32).",
    )

    # --- model ----------------------------------------------------------------------------------------------
    embedder: Literal["auto", "clip", "efficientnet", "none"] = Field(
        "auto",
        description="auto: CLIP when its weights load, otherwise the offline EfficientNet-Lite2. none: load no "
        "model and serve an existing collection by vector only (POST /search_vector); indexing answers 400.",
    )
    clip_model: str = Field("ViT-B-32", description="open_clip architecture name.")
    clip_pretrained: str = Field(
        "laion2b_s34b_b79k", description="open_clip pretrained tag, or a path to a local checkpoint file."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda > mps > cpu.")
    embed_batch_size: int = Field(32, ge=1, le=1024, description="Images per model call.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 = torch's default.")
    cpu_encoder: Literal["torch", "bf16", "int8", "onnx"] = Field(
        "onnx",
        description="How the image model runs on CPU (ignored on CUDA/MPS): onnx (ONNX Runtime on a graph exported "
        "once into MODEL_CACHE_DIR/onnx), torch (fp32), bf16 (autocast; fast only with AVX512-BF16/AMX), int8 "
        "(dynamic quantization of Linear layers; nothing to quantize in EfficientNet). See docs/benchmarks.md.",
    )
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Dynamic batching: how long, in ms, the first embed request waits for concurrent ones "
        "(/index_image, /index_images, /search_image) to share one model call of up to EMBED_BATCH_SIZE images; "
        "0 = no waiting (requests already queued are still combined).",
    )

    # --- embedding cache (app/cache/): memory (L1) -> Redis (L2) -> stored vector (L3) -> model ----------------
    query_cache_size: int = Field(
        1024,
        ge=0,
        description="Query embeddings (images by SHA-256 of the bytes, texts by the exact string) kept in this "
        "process's memory, the cache's first layer; 0 disables it. 1024 x 1280-d float32 is about 5 MB.",
    )
    cache_policy: Literal["lru", "lfu"] = Field(
        "lru",
        description="Eviction policy of the memory layer: lru (least recently used) or lfu (least frequently used; "
        "docs/benchmarks.md, Embedding cache, compares them on a Zipf query stream).",
    )
    cache_redis_url: str | None = Field(
        None,
        description="Redis shared by every API process as the cache's second layer (redis://host:6379/0); unset: "
        "memory only. Redis faults never fail a request: the cache falls back to memory and reconnects by itself.",
    )
    cache_ttl_s: int = Field(
        604800, ge=1, description="Seconds an embedding lives in Redis (SET ... EX); 604800 = 7 days."
    )
    cache_redis_timeout_ms: float = Field(
        50.0,
        gt=0,
        le=1000,
        description="Connect and read/write timeout of each Redis command, ms: the most a request waits on a slow "
        "or dead Redis before it counts as a miss.",
    )
    cache_breaker_failures: int = Field(
        3,
        ge=1,
        le=1000,
        description="Consecutive failed Redis commands that open the circuit breaker: Redis is then skipped (memory "
        "only, /health cache: degraded) until a background PING answers.",
    )
    cache_retry_s: float = Field(
        2.0, gt=0, le=600, description="Seconds between those PINGs while the breaker is open."
    )
    cache_key_prefix: str = Field(
        "imgsearch",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="First part of every Redis key (then emb:v1:<kind>:<model>:<dim>:<sha256>): deployments that "
        "share one Redis use different prefixes.",
    )

    # --- limits ---------------------------------------------------------------------------------------------
    max_upload_mb: float = Field(50.0, gt=0, description="Largest accepted upload, MB (10^6 bytes).")
    max_batch_files: int = Field(64, ge=1, le=1024, description="Most files in one POST /index_images request.")
    max_batch_mb: float = Field(
        200.0, gt=0, description="Largest POST /index_images request body, MB (10^6 bytes), all files together."
    )
    max_image_pixels: int = Field(
        100_000_000,
        ge=1,
        # Pillow refuses more than 2 * Image.MAX_IMAGE_PIXELS (178,956,970) whatever we allow; say so up front.
        le=178_956_970,
        description="Largest accepted width*height, read from the header before decoding (at most 178956970).",
    )
    max_decode_mb: float = Field(
        1100.0,
        ge=0,
        description="Largest decode memory one uploaded image may need, MB (10^6 bytes), estimated from its header "
        "before decoding (size x the measured cost of its format and mode, app/imaging/decode.py); more answers 413. "
        "1100 accepts any RGB or RGBA photo up to MAX_IMAGE_PIXELS (100 MP: 0.8-0.9 GB) and WebP or 32-bit TIFF up to "
        "about 64 MP, so that one image cannot take the server past about 1.5 GB (bench/hostile.py). 0: no limit.",
    )
    max_decode_pixels_in_flight: int = Field(
        100_000_000,
        ge=1,
        description="Decode memory held by requests at once, counted in pixels of an 8-bit RGB photo (about 8 bytes "
        "each while decoding, measured); more waits in line, first come first served. Each image is charged its "
        "measured cost from the header's size, format and mode (a WebP with alpha or a float TIFF about 2.1 times "
        "its pixels, an RGBA PNG 1.1 times, a GIF 0.6 times: app/imaging/decode.py). An image costing more than "
        "this is decoded alone. 100 MP: about 0.8 GB, one 100 MP JPEG or about eight 12 MP photos.",
    )
    decode_wait_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Longest wait, in seconds, for decode capacity (MAX_DECODE_PIXELS_IN_FLIGHT) before a request "
        "answers 503 with Retry-After.",
    )
    thumbnail_cache_mb: float = Field(
        32.0,
        ge=0,
        description="Thumbnails of stored images kept in memory, MB (10^6 bytes) of JPEG, least recently used "
        "dropped first: a repeated GET /image/{id}/thumbnail does not decode the original again (about 1,000 "
        "thumbnails of 256 px); 0 disables.",
    )
    thumbnail_redis_ttl_s: int = Field(
        604800,
        ge=0,
        description="Seconds a thumbnail lives in the Redis of CACHE_REDIS_URL, shared by every replica behind the "
        "in-memory THUMBNAIL_CACHE_MB (a HEIC or large PNG is rebuilt once for all replicas, not once per replica); "
        "604800 = 7 days; 0: thumbnails are not put in Redis. Without CACHE_REDIS_URL: unused.",
    )
    rate_limit: str = Field(
        "",
        description="Per-client limit on the expensive routes a client can call without a key (searches by image, "
        "text or vector, /preview, thumbnails), in the 'limits' library's notation: '120/minute', '10/second;"
        "300/hour'. Counted per client address in memory (one process); requests with a valid API key are not "
        "counted. Over it: 429 with Retry-After. Empty: no limit.",
    )
    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)

    # --- search features ------------------------------------------------------------------------------------
    # Query expansion (expand=true, app/search/expansion.py); defaults measured with bench/quality.py --expand on
    # caltech101_subset (P@10) and instance_small (mAP): docs/benchmarks.md, "Query expansion".
    expand_n: int = Field(2, ge=1, le=100, description="αQE: neighbours added to the query (expand=true).")
    expand_alpha: float = Field(
        1.0, ge=0, le=20, description="αQE: each neighbour weighs (cosine similarity)^EXPAND_ALPHA; 0 = plain average."
    )

    # --- neighbour graph, near-duplicates, DBA (app/neighbours/) -------------------------------------------
    # Defaults measured: docs/benchmarks.md, "Neighbour graph", "Near-duplicate groups" and "DBA".
    neighbours_k: int = Field(
        15,
        ge=1,
        le=100,
        description="Neighbours per image in the k-nearest-neighbour graph (POST /jobs/neighbours); at least DBA_N.",
    )
    neighbours_ef_search: int = Field(
        64,
        ge=1,
        le=1000,
        description="HNSW beam width of the graph job's searches (at least NEIGHBOURS_K + 1); user searches keep "
        "HNSW_EF_SEARCH. 64 finds 99 % of the true 15 neighbours at 100k vectors in about 60 % of the time of 160 "
        "(docs/benchmarks.md, Neighbour graph).",
    )
    neighbours_threads: int = Field(
        4,
        ge=1,
        le=64,
        description="Searches the graph job runs at once (it waits on the database most of the time, so a few more "
        "than the cores).",
    )
    neighbours_store: Literal["auto", "sqlite"] = Field(
        "auto",
        description="Where the neighbour graph, duplicate groups and job progress live: auto = tables in PostgreSQL "
        "when DATABASE_URL is set, with every VECTOR_DB (shared by every replica; one builds at a time, under a "
        "lease a killed replica loses), else a SQLite file under DATA_DIR (one machine); sqlite = always the file.",
    )
    duplicate_threshold: float = Field(
        0.92,
        ge=-1,
        le=1,
        description="GET /duplicates: images whose cosine similarity is at least this are near-duplicates (groups "
        "are connected components of such pairs).",
    )
    dba: bool = Field(
        False,
        description="Database-side augmentation: searches re-rank their candidates by each image's DBA vector "
        "(its embedding averaged with its DBA_N graph neighbours). Needs the neighbour graph (POST /jobs/neighbours), "
        "built while DBA=true.",
    )
    dba_n: int = Field(15, ge=1, le=100, description="DBA: graph neighbours averaged into each image's vector.")
    dba_alpha: float = Field(
        3.0, ge=0, le=20, description="DBA: each neighbour weighs (cosine similarity)^DBA_ALPHA; 0 = plain average."
    )
    dba_depth: int = Field(
        100,
        ge=1,
        le=1000,
        description="DBA: search results re-ranked by DBA vectors (at least the page asked for, at most 1000).",
    )

    @field_validator("database_url", "milvus_token", "cache_redis_url", "image_store_url", "aws_endpoint_url")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("image_store_url")
    @classmethod
    def _image_store_url_is_known(cls, v: str | None) -> str | None:
        # A field validator, not a model one: its error quotes this value only, never the other settings (secrets).
        parse_store_url(v)  # ValueError: only file:///path and s3://bucket/prefix
        return v

    @field_validator("cache_redis_url")
    @classmethod
    def _redis_url_scheme(cls, v: str | None) -> str | None:
        # Checked here so a typo stops the start with a clear message instead of inside the service.
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("CACHE_REDIS_URL must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _dba_needs_enough_neighbours(self) -> Settings:
        if self.dba and self.dba_n > self.neighbours_k:
            raise ValueError(f"DBA_N ({self.dba_n}) must not exceed NEIGHBOURS_K ({self.neighbours_k}).")
        return self

    @model_validator(mode="after")
    def _reads_need_a_key(self) -> Settings:
        if self.api_key_reads and not self.api_keys:
            raise ValueError("API_KEY_READS=true needs API_KEY: set one or more keys (comma-separated).")
        return self

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The accepted API keys (API_KEY split at commas, blanks dropped); empty when no key is set."""
        if self.api_key is None:
            return ()
        return tuple(k.strip() for k in self.api_key.get_secret_value().split(",") if k.strip())

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, v: str) -> str:
        v = v.strip()
        if v:
            from limits import parse_many

            try:
                parse_many(v)
            except ValueError as exc:
                raise ValueError(f"RATE_LIMIT {v!r} is not a limit like '120/minute' or '10/second;600/hour'") from exc
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url_is_a_base_url(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return ""
        parsed = urlsplit(v)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError(f"PUBLIC_URL must be an http(s) base URL like https://images.example.com, got {v!r}")
        return v.rstrip("/")

    @property
    def public_origin(self) -> str | None:
        """``scheme://host[:port]`` of PUBLIC_URL (lower case), or ``None`` when it is unset."""
        if not self.public_url:
            return None
        parsed = urlsplit(self.public_url)
        return f"{parsed.scheme}://{parsed.netloc}".lower()

    @property
    def cors_origin_list(self) -> list[str]:
        """CORS_ORIGINS split at commas; empty: CORS stays off."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def shared_state_url(self) -> str | None:
        """The PostgreSQL URL that holds the state replicas share besides vectors and originals (the per-id write
        locks, the neighbour graph, duplicate groups and job progress): ``DATABASE_URL``, whatever ``VECTOR_DB``
        is. ``None``: that state stays on this machine (``flock`` files, SQLite), which is right for one replica.

        Why PostgreSQL and not Redis or the object store's conditional writes for Milvus and Manticore, which have
        no locks of their own: an advisory lock belongs to a connection, so a holder killed with ``kill -9`` loses
        it at once (a Redis lock or a lock object lasts until its TTL, and a holder paused past the TTL writes on
        without knowing it lost it), and the graph needs a durable, queryable store (the Compose Redis evicts under
        ``allkeys-lfu``; a bucket cannot answer "edges with score >= t"). The Compose stack runs ``db`` in every
        profile, so there it costs nothing."""
        return self.database_url

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
    def max_batch_bytes(self) -> int:
        """MAX_BATCH_MB in bytes."""
        return int(self.max_batch_mb * 1_000_000)

    @property
    def min_free_bytes(self) -> int:
        """MIN_FREE_MB in bytes."""
        return int(self.min_free_mb * 1_000_000)

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes."""
        return int(self.max_upload_mb * 1_000_000)
