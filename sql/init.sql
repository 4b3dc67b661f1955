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

-- A row is stored in its heap page whenever it fits one, vector included: toast_tuple_target is PostgreSQL's largest
-- (8,160 bytes, a block less its header) instead of its default 2,032 bytes, which moved every vector of 508
-- dimensions or more out of line into the TOAST table (a 512-d vector is 2,056 bytes). Each row a search reads by
-- its vector (the exact pass's re-ranked candidates, an iterative scan's results) then costs one heap page instead
-- of a heap page, a TOAST index descent and two TOAST pages: at 1M x 512-d, filters keeping 0.5-2 % 1.2-1.7x and
-- 10 % 1.2-1.4x faster, the table 10 % smaller (docs/benchmarks.md, "Vectors stored in the row"; a 1,280-d table
-- grows instead, one row per page). Rows larger than a page (a vector of more than about 1,900 dimensions) still
-- move their vector out of line. Tables from before get the setting here, for the rows written from now on; their
-- older rows move into the row when the table is rewritten (VACUUM FULL, docs/backends.md). Set only where
-- missing, so that a start does not rewrite the catalog each time.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = 'images'::regclass
                   AND 'toast_tuple_target=8160' = ANY (reloptions)) THEN
        ALTER TABLE images SET (toast_tuple_target = 8160);
    END IF;
END
$$;

-- The B-tree indexes on the search filter columns (issues #9 and #29) are created by the service, not here: their
-- one owner is FILTER_INDEXES in app/vectordb/pgvector.py, which builds them plain on a table without embedding_bq
-- and covering (INCLUDE (id, embedding_bq)) on one with it, so that the filtered exact pass reads the matching rows'
-- bits by an index-only scan. The service creates them on every start that finds them missing.
