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

#: seconds a database call may run past ``DB_STATEMENT_TIMEOUT_S`` before the client gives up on the server (shuts its
#: socket down, app/vectordb/deadline.py): a live server cancels a slow statement itself within this grace, so only a
#: server that does not answer at all (stopped, unreachable) loses its connection. See Settings.db_call_deadline_s.
DB_DEADLINE_GRACE_S = 0.5

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``12h`` or ``1d`` (a non-negative number, then an optional unit).
    Raises ``ValueError`` for anything else."""
    value = str(text).strip().lower()
    unit = value[-1:] if value[-1:] in ("s", "m", "h", "d") else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise ValueError(f"a duration is a number with s, m, h or d (e.g. 30m, 1d), got {str(text)[:40]!r}") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"a duration must be >= 0, got {str(text)[:40]!r}")
    return number * _DURATION_UNITS[unit]


class Settings(BaseSettings):
    """Service configuration. Field names map to upper-case environment variables (``PORT``, ``DATA_DIR``...)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Each field's description, group (json_schema_extra) and, for an optional one, example value are the text of
    # .env.example and docs/configuration/settings.md: `make docs-settings` writes both from here
    # (app/cli/gen_settings_docs.py), and tests/test_settings_docs.py fails when they drift.

    # --- server ---------------------------------------------------------------------------------------------
    host: str = Field(
        "127.0.0.1",
        description="Interface uvicorn binds to (0.0.0.0 to accept connections from other machines; the image uses "
        "0.0.0.0).",
        json_schema_extra={"group": "server"},
    )
    port: int = Field(
        8000, ge=1, le=65535, description="HTTP port of the API, docs and UI.", json_schema_extra={"group": "server"}
    )
    http_header_timeout_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Seconds a client has to send a request's head (request line and headers) after it opens a "
        "connection, or after the first byte of its next request on a kept-alive one; past it the connection is "
        "closed after a 408. Bounds slow clients (slowloris) that uvicorn alone would keep forever. python -m app "
        "and the Docker image apply it; 0 disables.",
        json_schema_extra={"group": "server"},
    )
    http_keep_alive_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds an idle kept-alive connection stays open between two requests (uvicorn's "
        "--timeout-keep-alive). Behind a reverse proxy that keeps connections to the service, make it longer than "
        "the proxy's own idle timeout.",
        json_schema_extra={"group": "server"},
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.", json_schema_extra={"group": "server"}
    )
    ui_enabled: bool = Field(
        True,
        description="Serve the Gradio web UI at /ui/ (true/false); false serves the API alone and never imports "
        "Gradio. Gradio keeps uploads and the UI's thumbnails in GRADIO_TEMP_DIR (default <DATA_DIR>/ui-files: one "
        "folder per instance) and deletes them after an hour.",
        json_schema_extra={"group": "server"},
    )

    # --- access (app/api/security.py applies these) ---------------------------------------------------------
    # SecretStr: the keys never show in a repr, a log line or a traceback of the settings.
    api_key: SecretStr | None = Field(
        None,
        description="Key(s) writes need (Authorization: Bearer KEY or X-API-Key: KEY), comma-separated to rotate; the "
        "web UI asks for it to add or delete, and with API_KEY_READS=true at its login (any user name, the key as "
        "password).",
        json_schema_extra={"group": "access"},
    )
    api_key_reads: bool = Field(
        False,
        description="Require the key for every endpoint except /health too (true/false; needs API_KEY).",
        json_schema_extra={"group": "access"},
    )
    allow_anonymous_writes: bool = Field(
        False,
        description="Accept writes without a key although HOST is not loopback (otherwise they answer 403 until "
        "API_KEY is set).",
        json_schema_extra={"group": "access"},
    )
    cors_origins: str = Field(
        "",
        description="Browser origins allowed to call the API, comma-separated (* = any); empty: no CORS headers. "
        "Pages of other origins cannot POST/DELETE here (403), except these (and PUBLIC_URL's origin).",
        json_schema_extra={"group": "access"},
    )
    allowed_hosts: str = Field(
        "",
        description="Host names the service answers (Host header without port), comma-separated; *.example.com for "
        "subdomains, * any. Other hosts get 400 (DNS rebinding). Empty: localhost, 127.0.0.1, [::1] and HOST when "
        "HOST is a loopback address; any host (with a WARNING) otherwise. Behind a reverse proxy: the public name(s) "
        "the proxy passes in Host.",
        json_schema_extra={"group": "access"},
    )
    public_url: str = Field(
        "",
        description="Base URL clients reach the service at (https://images.example.com[/prefix]); image_url of "
        "results is built from it. Empty: from the request's (allowed) Host when ALLOWED_HOSTS restricts it, else a "
        "path (/image/ID).",
        json_schema_extra={"group": "access"},
    )
    sla_p95_ms: float = Field(
        500.0,
        gt=0,
        description="Latency target in ms: GET /stats reports per route whether its recent p95 meets it.",
        json_schema_extra={"group": "access"},
    )

    # --- storage --------------------------------------------------------------------------------------------
    data_dir: Path = Field(
        Path("./data"),
        description="Root of everything the service writes by default (images, model cache, embedded database).",
        json_schema_extra={"group": "storage"},
    )
    image_dir: Path | None = Field(
        None,
        description="Stored originals, by content hash. Default (unset): DATA_DIR/images.",
        examples=["./data/images"],
        json_schema_extra={"group": "storage"},
    )
    model_cache_dir: Path | None = Field(
        None,
        description="Downloaded model weights. Default (unset): DATA_DIR/models.",
        examples=["./data/models"],
        json_schema_extra={"group": "storage"},
    )
    min_free_mb: float = Field(
        500.0,
        ge=0,
        description="Free space under IMAGE_DIR, MB, below which writes answer 507 before they start and /health says "
        "storage: low (0 disables the check; a write that hits a full disk answers 507 anyway and stores nothing).",
        json_schema_extra={"group": "storage"},
    )
    orphan_grace_s: float = Field(
        600.0,
        ge=0,
        description="Start-up sweep: temporary upload files and originals without a database row older than this "
        "many seconds are removed (what a kill -9 during a write leaves; scripts/fsck.py checks and repairs the rest).",
        json_schema_extra={"group": "storage"},
    )
    orphan_sweep_interval_s: float = Field(
        3600.0,
        ge=0,
        description="Seconds between two sweeps (as at start-up, with ORPHAN_GRACE_S) while the service runs: they "
        "remove what an object store leaves when it completes an upload the service already gave up on (it hung, "
        "the client answered 503). Replicas sharing a DATABASE_URL take turns (one sweeps per interval). 0: only "
        "at start-up.",
        json_schema_extra={"group": "storage"},
    )

    # --- object storage of the originals (app/storage/) ---------------------------------------------------
    image_store_url: str | None = Field(
        None,
        description="Where the originals live: unset or file:///path = the file store (IMAGE_DIR, or that path); "
        "s3://bucket/prefix = S3-compatible object storage (AWS S3, MinIO, R2, B2...), configured by the AWS_* "
        "settings below. The bucket must exist.",
        json_schema_extra={"group": "object storage"},
    )
    aws_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, e.g. http://minio:9000 (http:// is allowed); unset: AWS S3 in AWS_REGION.",
        json_schema_extra={"group": "object storage"},
    )
    aws_access_key_id: SecretStr | None = Field(
        None,
        description="S3 access key id (never logged, never in errors or /health); unset: none sent.",
        json_schema_extra={"group": "object storage"},
    )
    aws_secret_access_key: SecretStr | None = Field(
        None,
        description="S3 secret access key (never logged, never in errors or /health).",
        json_schema_extra={"group": "object storage"},
    )
    aws_region: str = Field(
        "us-east-1", description="S3 region (MinIO accepts any).", json_schema_extra={"group": "object storage"}
    )
    s3_path_style: bool = Field(
        True,
        description="Path-style addressing (http://endpoint/bucket/key), as MinIO and most self-hosted stores need; "
        "false: virtual-hosted.",
        json_schema_extra={"group": "object storage"},
    )
    s3_connect_timeout_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Seconds to wait for a connection to S3.",
        json_schema_extra={"group": "object storage"},
    )
    s3_read_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Seconds one whole S3 request may take (a large original included).",
        json_schema_extra={"group": "object storage"},
    )
    s3_request_timeout_s: float = Field(
        1.5,
        gt=0,
        le=60,
        description="Seconds a request waits for the object store before it answers 503 (a hung store: a read up to "
        "its first byte, each further chunk, a LIST or DELETE; an upload gets 1 s more per 4 MB). After that the "
        "store counts as down and every request answers 503 at once until a probe succeeds.",
        json_schema_extra={"group": "object storage"},
    )
    s3_max_retries: int = Field(
        1,
        ge=0,
        le=10,
        description="Retries of a failed S3 request; with the timeouts this bounds how long a write waits before it "
        "answers 503 while the object store is down.",
        json_schema_extra={"group": "object storage"},
    )

    # --- vector database ------------------------------------------------------------------------------------
    vector_db: Literal["pgvector", "milvus", "manticore"] = Field(
        "pgvector",
        description="Vector database backend: pgvector, milvus or manticore (in Compose it defaults to "
        "COMPOSE_PROFILES, see below).",
        json_schema_extra={"group": "vector database"},
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL. With VECTOR_DB=pgvector it holds the vectors (unset: start an embedded "
        "PostgreSQL 18 + pgvector under DATA_DIR/pgdata). With every backend it also holds what several replicas "
        "share: the write locks, the neighbour graph and job progress (with milvus/manticore any PostgreSQL 12+; "
        "unset: this machine only).",
        examples=["postgresql://imagesearch:imagesearch@localhost:5432/imagesearch"],
        json_schema_extra={"group": "vector database"},
    )
    db_pool_min: int = Field(
        1, ge=1, description="Minimum connections kept in the pool.", json_schema_extra={"group": "vector database"}
    )
    db_pool_max: int = Field(
        10, ge=1, description="Maximum connections in the pool.", json_schema_extra={"group": "vector database"}
    )
    db_connect_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds to wait for a pooled connection.",
        json_schema_extra={"group": "vector database"},
    )
    db_request_timeout_s: float = Field(
        0.5,
        gt=0,
        le=30,
        description="Seconds a request waits for a pooled connection to the vector database before it answers 503 "
        "(fail fast while the database is down; start-up waits DB_CONNECT_TIMEOUT_S). The libraries' and the "
        "neighbour graph's tables, whose pools open connections when asked, wait DB_STATEMENT_TIMEOUT_S + 0.5 s.",
        json_schema_extra={"group": "vector database"},
    )
    db_statement_timeout_s: float = Field(
        1.5,
        ge=0,
        le=600,
        description="Deadline, seconds, of each database call of a request: PostgreSQL statement_timeout, plus 0.5 s "
        "after which the client drops a connection whose server does not answer at all (a hung server gives 503 "
        "within about 2 s). Index builds and collection switches have none. Milvus: the gRPC deadline of each call of "
        "a request; Manticore: the read/write timeout of request connections (no grace: no server-side limit there); "
        "their long operations keep DB_CONNECT_TIMEOUT_S or longer. For every backend a health probe unanswered for "
        "1.5 s turns /health and requests to 503. 0 disables.",
        json_schema_extra={"group": "vector database"},
    )
    tool_statement_timeout_s: float = Field(
        60.0,
        ge=0,
        le=3600,
        description="Deadline, seconds, of each database call of the operator tools (fsck, reindex, migrate, "
        "move_originals, bulk_index --direct), in place of DB_STATEMENT_TIMEOUT_S, which is meant for interactive "
        "requests: beside a running service under write load a tool's scans and checks may wait longer than a "
        "request should. They also wait up to DB_CONNECT_TIMEOUT_S (not DB_REQUEST_TIMEOUT_S) for a pooled "
        "connection. A hung database still ends a tool (exit 2) after this long. 0 disables.",
        json_schema_extra={"group": "vector database"},
    )
    milvus_uri: str = Field(
        "",
        description="Milvus: a file path runs embedded Milvus Lite (unset: DATA_DIR/milvus.db); http://host:19530 "
        "uses a Milvus server.",
        json_schema_extra={"group": "vector database"},
    )
    milvus_token: str | None = Field(
        None,
        description="Milvus credentials, user:password or an API key (unset: no authentication, as in Milvus "
        "standalone's default).",
        examples=["root:Milvus"],
        json_schema_extra={"group": "vector database"},
    )
    manticore_host: str = Field(
        "127.0.0.1",
        description="Manticore Search host (MySQL protocol).",
        json_schema_extra={"group": "vector database"},
    )
    manticore_port: int = Field(
        9306,
        ge=1,
        le=65535,
        description="Manticore Search MySQL-protocol port.",
        json_schema_extra={"group": "vector database"},
    )
    # Defaults measured with bench/search_scale.py (docs/benchmarks.md, "Search at scale"): with m=16 and
    # ef_construction=64, 1M 512-d vectors need ef_search 120-160 for recall@10 >= 0.95 (0.951 at 120, 0.971 at
    # 160), at a p50 under 10 ms on 2 cores; smaller collections reach it with less and pay little for 160.
    # ef_construction 128 (issue #29, "The graph's build beam"): recall@10 0.984 at ef_search 160, and a filter
    # keeping 10 % reaches 0.96-0.97 from ef_search 160 (0.945 with 64, which needed 500), so the filtered graph walk
    # needs half the candidates (2.5 per result instead of 5, "The iterative scan's first batch"); the 1M build took
    # 2.1-2.8x as long (16-18 min instead of 7 on 2 busy cores), the index is the same size (m sets it).
    hnsw_m: int = Field(
        16,
        ge=2,
        le=100,
        description="HNSW graph degree, m (pgvector default 16).",
        json_schema_extra={"group": "vector database"},
    )
    hnsw_ef_construction: int = Field(
        128,
        ge=4,
        le=1000,
        description="HNSW build beam width, ef_construction (pgvector's default is 64; 128 builds about twice as long "
        "and finds filtered neighbours with half the candidates). Applies to indexes built after a change "
        "(docs/backends.md says how to rebuild an existing one).",
        json_schema_extra={"group": "vector database"},
    )
    hnsw_ef_search: int = Field(
        160,
        ge=1,
        le=1000,
        description="HNSW query beam width, ef_search (raised to top_k per query); 160 keeps recall@10 >= 0.95 up to "
        "1M vectors.",
        json_schema_extra={"group": "vector database"},
    )
    vector_type: Literal["vector", "halfvec"] = Field(
        "vector",
        description="pgvector storage of embeddings: vector (float32) or halfvec (float16, half the table and index); "
        "fixed when the collection is created (a different value later stops the service with a message). pgvector "
        "only.",
        json_schema_extra={"group": "vector database"},
    )

    # --- model ----------------------------------------------------------------------------------------------
    embedder: Literal["auto", "clip", "efficientnet", "none"] = Field(
        "auto",
        description="Embedder: auto (CLIP when its weights load, otherwise the offline EfficientNet-Lite2), clip, "
        "efficientnet, or none (load no model; serve an existing collection through POST /search_vector only).",
        json_schema_extra={"group": "model"},
    )
    clip_model: str = Field(
        "ViT-B-32", description="open_clip architecture name.", json_schema_extra={"group": "model"}
    )
    clip_pretrained: str = Field(
        "laion2b_s34b_b79k",
        description="open_clip pretrained tag, or a path to a local checkpoint file.",
        json_schema_extra={"group": "model"},
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto",
        description="Torch device: auto (cuda > mps > cpu), cpu, cuda or mps.",
        json_schema_extra={"group": "model"},
    )
    embed_batch_size: int = Field(
        32, ge=1, le=1024, description="Images per model call.", json_schema_extra={"group": "model"}
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of the model on CPU (ONNX Runtime or torch); 0 = one per core.",
        json_schema_extra={"group": "model"},
    )
    cpu_encoder: Literal["torch", "bf16", "int8", "onnx"] = Field(
        "onnx",
        description="How the model runs on CPU (ignored on CUDA/MPS): onnx (ONNX Runtime, without torch in the "
        "server: the model is exported once, in a child process, into MODEL_CACHE_DIR/onnx; CLIP's image and text "
        "towers both), torch (fp32), bf16 (autocast; fast only on CPUs with AVX512-BF16/AMX) or int8 (dynamic "
        "quantization of Linear layers: nothing to quantize in EfficientNet). Same weights and model id on every "
        "path.",
        json_schema_extra={"group": "model"},
    )
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Dynamic batching: ms the first embed request waits for concurrent ones to share one model call; "
        "0 = no waiting.",
        json_schema_extra={"group": "model"},
    )

    # --- embedding cache (app/cache/): memory (L1) -> Redis (L2) -> stored vector (L3) -> model ----------------
    query_cache_size: int = Field(
        1024,
        ge=0,
        description="Query embeddings (images by SHA-256 of the bytes, texts by the exact string) kept in this "
        "process's memory; 0 = off.",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_policy: Literal["lru", "lfu"] = Field(
        "lru",
        description="Eviction policy of the memory layer: lru or lfu (compared in docs/benchmarks.md, Embedding "
        "cache).",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_redis_url: str | None = Field(
        None,
        description="Redis shared by all API processes as the second layer, e.g. redis://redis:6379/0 (Compose sets "
        "it); unset: memory only.",
        examples=["redis://127.0.0.1:6379/0"],
        json_schema_extra={"group": "embedding cache"},
    )
    cache_ttl_s: int = Field(
        604800,
        ge=1,
        description="Seconds an embedding lives in Redis (SET ... EX); 604800 = 7 days.",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_redis_timeout_ms: float = Field(
        50.0,
        gt=0,
        le=1000,
        description="Connect and read/write timeout of each Redis command, ms: the most a request waits on a slow or "
        "dead Redis.",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_breaker_failures: int = Field(
        3,
        ge=1,
        le=1000,
        description="Consecutive failed Redis commands that open the circuit breaker (memory only, /health cache: "
        "degraded), once a confirming PING (CACHE_BREAKER_CONFIRM_MS) fails too.",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_breaker_confirm_ms: float = Field(
        250.0,
        ge=0,
        le=5000,
        description="Timeout of the PING that confirms a failing Redis before the breaker opens (and of the "
        "reconnection PINGs), ms. A healthy Redis on a busy host can miss the 50 ms command timeout; it answers this "
        "PING, so the breaker stays closed. 0: open at the threshold without confirming.",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_retry_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Seconds between reconnection PINGs while the breaker is open; the first answer restores the "
        "Redis layer.",
        json_schema_extra={"group": "embedding cache"},
    )
    cache_key_prefix: str = Field(
        "imgsearch",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="First part of every Redis key: deployments sharing one Redis use different prefixes.",
        json_schema_extra={"group": "embedding cache"},
    )

    # --- limits ---------------------------------------------------------------------------------------------
    max_upload_mb: float = Field(
        50.0,
        gt=0,
        description="Largest accepted upload, in MB (10^6 bytes).",
        json_schema_extra={"group": "limits"},
    )
    max_batch_files: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most files in one POST /index_images request (bulk_index.py uploads batches of --batch-size "
        "files).",
        json_schema_extra={"group": "limits"},
    )
    max_batch_mb: float = Field(
        200.0,
        gt=0,
        description="Largest POST /index_images request body, in MB (10^6 bytes), all files together.",
        json_schema_extra={"group": "limits"},
    )
    max_image_pixels: int = Field(
        100_000_000,
        ge=1,
        # Pillow refuses more than 2 * Image.MAX_IMAGE_PIXELS (178,956,970) whatever we allow; say so up front.
        le=178_956_970,
        description="Largest accepted width*height, read from the image header before decoding (at most 178956970, "
        "Pillow's own guard).",
        json_schema_extra={"group": "limits"},
    )
    max_decode_mb: float = Field(
        1100.0,
        ge=0,
        description="Largest decode memory one image may need, MB, estimated from its header (size x measured cost of "
        "its format and mode); more answers 413. 1100 takes any RGB/RGBA photo up to MAX_IMAGE_PIXELS, WebP and "
        "32-bit TIFF up to ~64 MP, so that one image cannot take the server past about 1.5 GB. 0: no limit.",
        json_schema_extra={"group": "limits"},
    )
    max_decode_pixels_in_flight: int = Field(
        200_000_000,
        ge=1,
        description="Decode memory held by all requests at once, in pixels of an 8-bit RGB photo (4 bytes each while "
        "it decodes, measured); more wait in line (first come, first served). Each image is charged its measured "
        "cost from its header (size, format, mode): a WebP or a float TIFF about 4x its pixels, an RGBA PNG 2.2x, a "
        "GIF 1.25x, a progressive JPEG its whole-image coefficients besides; with the model's memory for the images "
        "a request embeds. 200000000: about 0.8 GB. MEMORY_LIMIT_MB applies as well.",
        json_schema_extra={"group": "limits"},
    )
    memory_limit_mb: float = Field(
        1500.0,
        ge=0,
        description="The server process's memory bound, MB (10^6 bytes): a decode starts only while the process's "
        "resident memory now plus the estimated peak of every decode in flight (this one's included, with the "
        "model's memory for the images it embeds) stays within it; otherwise it waits in line like "
        "MAX_DECODE_PIXELS_IN_FLIGHT, or answers 503 at once when even alone it would not fit. Whatever the "
        "process already holds (caches, model, heap) leaves that much less for decoding. 0: no limit (Linux only; "
        "elsewhere only MAX_DECODE_PIXELS_IN_FLIGHT applies).",
        json_schema_extra={"group": "limits"},
    )
    decode_wait_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Longest wait in the line for decode memory (MAX_DECODE_PIXELS_IN_FLIGHT), seconds, before a "
        "request answers 503 with Retry-After.",
        json_schema_extra={"group": "limits"},
    )
    thumbnail_cache_mb: float = Field(
        32.0,
        ge=0,
        description="Thumbnails of stored images kept in memory, MB of JPEG (least recently used dropped): a repeated "
        "thumbnail request does not decode the original again. 0 disables.",
        json_schema_extra={"group": "limits"},
    )
    thumbnail_redis_ttl_s: int = Field(
        604800,
        ge=0,
        description="Seconds a thumbnail lives in the Redis of CACHE_REDIS_URL, shared by all replicas behind "
        "THUMBNAIL_CACHE_MB: a HEIC or large PNG is decoded once for all replicas, not once per replica (about "
        "10-20 KB a thumbnail); 0: not in Redis. Unused without CACHE_REDIS_URL.",
        json_schema_extra={"group": "limits"},
    )
    rate_limit: str = Field(
        "",
        description='Per-client limit on searches, previews, thumbnails, "more like this" and indexing, e.g. '
        "120/minute or 10/second;600/hour (the limits library's notation), counted per client address in memory; "
        "requests with a valid API key are not counted; over it: 429 with Retry-After. Empty: no limit.",
        json_schema_extra={"group": "limits"},
    )
    default_top_k: int = Field(
        5,
        ge=1,
        description="Results returned when a search does not say how many.",
        json_schema_extra={"group": "limits"},
    )
    max_top_k: int = Field(
        100,
        ge=1,
        description="Largest number of results a search may ask for.",
        json_schema_extra={"group": "limits"},
    )

    # --- search features ------------------------------------------------------------------------------------
    # Query expansion (expand=true, app/search/expansion.py); defaults measured with bench/quality.py --expand on
    # caltech101_subset (P@10) and instance_small (mAP): docs/benchmarks.md, "Query expansion".
    expand_n: int = Field(
        2,
        ge=1,
        le=100,
        description="Query expansion (expand=true, αQE): stored neighbours added to the query (measured: "
        "docs/benchmarks.md).",
        json_schema_extra={"group": "search features"},
    )
    expand_alpha: float = Field(
        1.0,
        ge=0,
        le=20,
        description="Query expansion: each neighbour weighs (cosine similarity)^EXPAND_ALPHA; 0 = plain average of "
        "the neighbours.",
        json_schema_extra={"group": "search features"},
    )

    # --- neighbour graph, near-duplicates, DBA (app/neighbours/) -------------------------------------------
    # Defaults measured: docs/benchmarks.md, "Neighbour graph", "Near-duplicate groups" and "DBA".
    neighbours_k: int = Field(
        15,
        ge=1,
        le=100,
        description="Neighbour graph (POST /jobs/neighbours): neighbours kept per image (at least DBA_N).",
        json_schema_extra={"group": "search features"},
    )
    neighbours_ef_search: int = Field(
        64,
        ge=1,
        le=1000,
        description="HNSW beam width of the graph job's searches (user searches keep HNSW_EF_SEARCH): 64 finds 99 % "
        "of the true neighbours at 100k vectors in about 60 % of the time of 160.",
        json_schema_extra={"group": "search features"},
    )
    neighbours_threads: int = Field(
        4,
        ge=1,
        le=64,
        description="Searches the graph job runs at once.",
        json_schema_extra={"group": "search features"},
    )
    neighbours_store: Literal["auto", "sqlite"] = Field(
        "auto",
        description="Where the graph, duplicate groups and job progress live: auto = PostgreSQL tables shared by every "
        "replica when DATABASE_URL is set, with every VECTOR_DB (one replica builds at a time), else "
        "DATA_DIR/neighbours*.sqlite3; sqlite = always the file.",
        json_schema_extra={"group": "search features"},
    )
    duplicate_threshold: float = Field(
        0.92,
        ge=-1,
        le=1,
        description="GET /duplicates: cosine similarity at or above which two images are near-duplicates (measured "
        "on instance_small).",
        json_schema_extra={"group": "search features"},
    )
    dba: bool = Field(
        False,
        description="DBA (database-side augmentation): re-rank search results by each image's vector averaged with "
        "its graph neighbours. Needs the neighbour graph, built while DBA=true (POST /jobs/neighbours).",
        json_schema_extra={"group": "search features"},
    )
    dba_n: int = Field(
        15,
        ge=1,
        le=100,
        description="DBA: graph neighbours averaged into each image's vector.",
        json_schema_extra={"group": "search features"},
    )
    dba_alpha: float = Field(
        3.0,
        ge=0,
        le=20,
        description="DBA: each neighbour weighs (cosine similarity)^DBA_ALPHA.",
        json_schema_extra={"group": "search features"},
    )
    dba_depth: int = Field(
        100,
        ge=1,
        le=1000,
        description="DBA: search results re-ranked (at least the page asked for, at most 1000).",
        json_schema_extra={"group": "search features"},
    )

    # --- photo libraries indexed in place (app/library/) --------------------------------------------------
    library_roots: str = Field(
        "",
        description="Libraries created (or updated) at start: comma-separated name=/absolute/folder entries; a name "
        "given twice gets both folders (photos=/nas1,photos=/nas2). Compose mounts PHOTOS_DIR read-only at /photos "
        "and defaults this to photos=/photos (empty: none). Libraries can also be created with POST /libraries or "
        "image-search-library add.",
        json_schema_extra={"group": "libraries"},
    )
    library_exclude: str = Field(
        "**/@eaDir/**,**/#recycle/**,**/#snapshot/**",
        description="Globs (comma-separated, ** spans folders) of files and folders no library indexes, besides each "
        "library's own; hidden names (a leading dot) are always skipped. The default leaves out Synology's thumbnail "
        "folders, recycle bins and snapshots.",
        json_schema_extra={"group": "libraries"},
    )
    library_watch: bool = Field(
        False,
        description="Follow changes in the libraries' folders with inotify (watchdog) and scan a library once its "
        "files have been quiet for LIBRARY_SETTLE_S (true/false). Network mounts send no events: the periodic scan "
        "covers them.",
        json_schema_extra={"group": "libraries"},
    )
    library_settle_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="Watching and periodic scans leave a new or changed file alone until its size and mtime have been "
        "stable this many seconds, so a file still being copied is not indexed half-written.",
        json_schema_extra={"group": "libraries"},
    )
    library_scan_interval: str = Field(
        "1d",
        description="How often each library is scanned in the background: a number with s, m, h or d (90s, 30m, 12h, "
        "1d), or 0 for never (scans then run only when asked for, or when watching sees a change).",
        json_schema_extra={"group": "libraries"},
    )
    library_offline_grace: str = Field(
        "30d",
        description="How long a library file that went missing stays offline (hidden from results, its vector kept, "
        "back with no model call if it returns) before it is forgotten: s, m, h or d as above; 0 forgets at the next "
        "scan. POST /libraries/{name}/purge forgets the offline files at once.",
        json_schema_extra={"group": "libraries"},
    )
    library_max_offline_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Mount safety: when a scan finds more than this fraction of a library's files missing (and at "
        "least 20), it marks none offline and says why in the library's status and /health; a scan with force "
        "marks them.",
        json_schema_extra={"group": "libraries"},
    )
    library_scan_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Processes that decode a scan's new photos (as bulk_index.py --direct --workers).",
        json_schema_extra={"group": "libraries"},
    )

    @field_validator("library_scan_interval", "library_offline_grace")
    @classmethod
    def _duration_parses(cls, v: str) -> str:
        parse_duration(v)
        return v

    @property
    def library_scan_interval_s(self) -> float:
        """LIBRARY_SCAN_INTERVAL in seconds (0: never)."""
        return parse_duration(self.library_scan_interval)

    @property
    def library_offline_grace_s(self) -> float:
        """LIBRARY_OFFLINE_GRACE in seconds."""
        return parse_duration(self.library_offline_grace)

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

    def for_operator_tool(self) -> Settings:
        """These settings as an operator tool (fsck, reindex, migrate, move_originals, bulk_index --direct) uses
        them: TOOL_STATEMENT_TIMEOUT_S as the deadline of each database call, DB_CONNECT_TIMEOUT_S (when longer) as
        the wait for a pooled connection."""
        return self.model_copy(
            update={
                "db_statement_timeout_s": self.tool_statement_timeout_s,
                "db_request_timeout_s": max(self.db_request_timeout_s, self.db_connect_timeout_s),
            }
        )

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

    @property
    def db_call_deadline_s(self) -> float | None:
        """Client deadline of one database call of a request, seconds: ``DB_STATEMENT_TIMEOUT_S`` +
        :data:`DB_DEADLINE_GRACE_S`; ``None`` while ``DB_STATEMENT_TIMEOUT_S`` is 0 (no deadline)."""
        return self.db_statement_timeout_s + DB_DEADLINE_GRACE_S if self.db_statement_timeout_s else None

    @property
    def shared_state_wait_s(self) -> float:
        """Seconds a request waits for a connection to :attr:`shared_state_url`'s tables (the libraries, the
        neighbour graph) before it answers 503: as long as one of its calls may take, :attr:`db_call_deadline_s`,
        the same "a server that does not answer gives 503 within about 2 s"; ``DB_CONNECT_TIMEOUT_S`` while that
        deadline is off; never less than ``DB_REQUEST_TIMEOUT_S``.

        Why not ``DB_REQUEST_TIMEOUT_S`` itself (0.5 s, floored at 1 s before): these pools open connections when
        they are asked for them, and a new backend on a loaded 2-core machine took over 1 s (CI stop 34: a library
        request answered 503 ``PoolTimeout`` while a scan held the pool's connection); the vector database's pool
        keeps ``DB_POOL_MIN`` connections open instead."""
        deadline = self.db_call_deadline_s
        return max(self.db_request_timeout_s, self.db_connect_timeout_s if deadline is None else deadline)

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
