-- Schema of the pgvector backend. The service applies this file itself at startup (every statement is
-- idempotent); docker-compose.yml also mounts it into the database container's initdb directory.
--
-- The embedding column is created without a dimension: the service fixes it to vector(D) the first time a
-- model fills the collection (ALTER on the still-empty table), records the model in collection_meta, and then
-- builds the HNSW index, which needs a fixed dimension.

CREATE EXTENSION IF NOT EXISTS vector;

-- One row: which model (and so which embedding space and dimension) the images table holds.
CREATE TABLE IF NOT EXISTS collection_meta (
    name        text        PRIMARY KEY,
    model_id    text        NOT NULL,
    dim         integer     NOT NULL CHECK (dim > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Storage type of images.embedding: vector (float32) or halfvec (float16), VECTOR_TYPE. Added after the first
-- release, hence ALTER ... IF NOT EXISTS; collections created before it hold vector.
ALTER TABLE collection_meta ADD COLUMN IF NOT EXISTS vector_type text NOT NULL DEFAULT 'vector'
    CHECK (vector_type IN ('vector', 'halfvec'));
-- Per-dimension thresholds of images.embedding_bq, the binary quantisation filtered searches rank by (issue #29):
-- bit i is set when component i exceeds bq_threshold[i], the collection's median. NULL until the collection holds
-- enough rows to calibrate it (app/vectordb/pgvector.py, bq_thresholds); its bits are then plain signs.
ALTER TABLE collection_meta ADD COLUMN IF NOT EXISTS bq_threshold vector;

CREATE TABLE IF NOT EXISTS images (
    id          char(64)    PRIMARY KEY CHECK (id ~ '^[0-9a-f]{64}$'),  -- SHA-256 of the file bytes
    embedding   vector      NOT NULL,                                     -- L2-normalised
    filename    text        NOT NULL,
    format      text        NOT NULL,
    width       integer     NOT NULL CHECK (width > 0),
    height      integer     NOT NULL CHECK (height > 0),
    bytes       bigint      NOT NULL CHECK (bytes >= 0),
    indexed_at  timestamptz NOT NULL DEFAULT now()
);
-- EXIF DateTimeOriginal of the image (issue #9), NULL when the file has none. Added after the first release, hence
-- ALTER ... IF NOT EXISTS: tables created before it get the column (NULL for every existing row) on the next start.
ALTER TABLE images ADD COLUMN IF NOT EXISTS taken_at timestamptz;

-- The B-tree indexes on the search filter columns (issues #9 and #29) are created by the service, not here: their
-- one owner is FILTER_INDEXES in app/vectordb/pgvector.py, which builds them plain on a table without embedding_bq
-- and covering (INCLUDE (id, embedding_bq)) on one with it, so that the filtered exact pass reads the matching rows'
-- bits by an index-only scan. The service creates them on every start that finds them missing.
