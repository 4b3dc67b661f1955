"""The SQL the Manticore backend emits, checked against Manticore's documented syntax without an engine.

Statements are rendered with pymysql's own literal escaping (what ``cursor.execute`` sends). String literals are
then read back the way Manticore's SQL lexer does (``src/sphinxql.l``: ``'([^'\\\\]|\\\\.|\\\\\\\\)*'``) and unescaped
with its ``SqlUnescape`` rules, so the injection tests show what the server would see. The real round trip against
an engine is in ``tests/test_vectordb_contract.py`` (skipped unless MANTICORE_HOST is reachable).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pymysql
import pytest

from app.errors import CollectionMismatchError, DatabaseUnavailableError
from app.ids import to_epoch_us
from app.vectordb import manticore_sql as mc
from app.vectordb.base import ImageMetadata, ImageRecord, SearchFilter
from app.vectordb.manticore import ManticoreHandler

DIM = 8
HOSTILE = ["'; DROP TABLE x; --", "a\\'b", "back\\slash", 'dq"uote', "new\nline\r\ttab", "x\\", "\\'", "日本語.jpg"]

# Manticore's lexer: a quoted string, and a float constant (optionally after a unary minus handled by the grammar).
_QUOTED = re.compile(r"'(?:[^'\\]|\\.|\\\\)*'", re.S)
_FLOAT = re.compile(r"-?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d*\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)")


def manticore_unescape(literal: str) -> str:
    """Manticore's SqlUnescape: drop the quotes; ``\\b \\n \\r \\t`` are control characters, ``\\0`` a space,
    any other ``\\x`` is ``x``."""
    body, out, i = literal[1:-1], [], 0
    special = {"b": "\b", "n": "\n", "r": "\r", "t": "\t", "0": " "}
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(special.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def literals(statement: str) -> list[str]:
    """The string values Manticore would parse out of ``statement``, in order."""
    return [manticore_unescape(m.group(0)) for m in _QUOTED.finditer(statement)]


def outside_literals(statement: str) -> str:
    return _QUOTED.sub("''", statement)


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _record(i: int, vector: np.ndarray, filename: str = "a.jpg", fmt: str = "JPEG") -> ImageRecord:
    when = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)
    return ImageRecord(f"{i:064x}", vector, ImageMetadata(filename, fmt, 640 + i, 480, 10_000 + i, when))


# --- names and ids ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["images", "t_0123456789ab", "_x", "a" * 63])
def test_valid_table_names(name):
    assert mc.validate_table_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Images", "1abc", "a-b", "a b", "a" * 64, "select", "table", "x; DROP TABLE y", "t`x", "é", None]
)
def test_bad_table_names_are_rejected(name):
    with pytest.raises(ValueError):
        mc.validate_table_name(name)
    if name is None:
        return  # the handler's table=None means "the active collection" (see the tests at the end)
    with pytest.raises(ValueError):
        ManticoreHandler("127.0.0.1", 9306, table=name)


@pytest.mark.parametrize("image_id", ["", "f" * 63, "f" * 65, "F" * 64, "g" * 64, " " + "a" * 63, "'" + "a" * 63, 5])
def test_invalid_image_ids_are_rejected(image_id):
    with pytest.raises(ValueError):
        mc.validate_image_id(image_id)
    with pytest.raises(ValueError):
        mc.doc_id_for(image_id)
    with pytest.raises(ValueError):
        mc.delete_sql("images", image_id)


def test_doc_ids_are_63_bit_nonzero_deterministic_and_spread():
    ids = [f"{i:064x}" for i in range(5000)]  # the contract suite's ids: identical first 16 hex digits
    ids += ["a" * 64, "e" * 64, "f" * 64, "1" * 64]
    doc_ids = [mc.doc_id_for(i) for i in ids]
    assert all(0 < d < 2**63 for d in doc_ids)
    assert len(set(doc_ids)) == len(ids)
    assert doc_ids == [mc.doc_id_for(i) for i in ids]  # deterministic (no per-process hash seed)
    assert mc.doc_id_for("0" * 64) == 2_394_430_296_773_573_620  # pinned: changing it would orphan stored rows


# --- table definitions --------------------------------------------------------------------------------------------
def test_create_table_uses_documented_float_vector_options_and_attribute_types():
    sql = mc.create_table_sql("images", 512, 16, 64)
    assert sql.startswith("CREATE TABLE IF NOT EXISTS images (")
    assert (
        "embedding float_vector knn_type='hnsw' knn_dims='512' hnsw_similarity='COSINE' "
        "hnsw_m='16' hnsw_ef_construction='64')" in sql
    )
    for column in [
        "image_id string",
        "filename string",
        "img_format string",
        "width int",
        "height int",
        "size_bytes bigint",
        "indexed_us bigint",
        "taken_us bigint",
        "has_taken bool",
    ]:
        assert column in sql
    assert " text" not in sql and "timestamp" not in sql  # no full-text field needed; no 32-bit seconds timestamp
    assert literals(sql) == ["hnsw", "512", "COSINE", "16", "64"]


@pytest.mark.parametrize(
    ("dim", "m", "ef"), [(0, 16, 64), (-1, 16, 64), (True, 16, 64), (8.0, 16, 64), (8, 1, 64), (8, 16, 0)]
)
def test_create_table_rejects_out_of_range_parameters(dim, m, ef):
    with pytest.raises(ValueError):
        mc.create_table_sql("images", dim, m, ef)


def test_meta_table_statements():
    assert mc.meta_table_name("images") == "images_meta"
    assert mc.create_meta_table_sql("images") == "CREATE TABLE IF NOT EXISTS images_meta (model_id string, dim int)"
    assert mc.select_meta_sql("images") == "SELECT model_id, dim FROM images_meta WHERE id = 1"
    sql, params = mc.insert_meta_sql("images", "open_clip:ViT-B-32/laion2b_s34b_b79k", 512)
    rendered = mc.render_sql(sql, params)
    assert rendered == (
        "INSERT INTO images_meta (id, model_id, dim) VALUES (1, 'open_clip:ViT-B-32/laion2b_s34b_b79k', 512)"
    )
    hostile_sql = mc.render_sql(*mc.insert_meta_sql("images", "m'); DROP TABLE images; --", 4))
    assert literals(hostile_sql) == ["m'); DROP TABLE images; --"]
    assert "DROP" not in outside_literals(hostile_sql)
    with pytest.raises(ValueError):
        mc.insert_meta_sql("images", "", 4)


def test_show_describe_and_count_statements():
    sql, params = mc.show_tables_sql("images_meta")
    assert mc.render_sql(sql, params) == "SHOW TABLES LIKE 'images_meta'"
    assert mc.describe_sql("images") == "DESCRIBE images"
    assert mc.show_create_table_sql("images") == "SHOW CREATE TABLE images"
    assert mc.count_sql("images") == "SELECT COUNT(*) FROM images"


# --- writes -------------------------------------------------------------------------------------------------------
def test_replace_renders_one_multi_row_statement():
    vectors = _unit(np.random.default_rng(0), 2)
    records = [_record(1, vectors[0]), _record(2, vectors[1], "b.png", "PNG")]
    sql, params = mc.replace_sql("images", records, DIM)
    rendered = mc.render_sql(sql, params)
    assert rendered.startswith(
        "REPLACE INTO images (id, image_id, filename, img_format, width, height, size_bytes, indexed_us, taken_us, "
        "has_taken, embedding) VALUES ("
    )
    assert rendered.count("), (") == 1  # two rows in one statement
    expected_us = (datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        microseconds=1
    )
    # No taken_at: 0 with has_taken 0 (a real 1970-01-01T00:00:00Z would be 0 with has_taken 1).
    first = (
        f"({mc.doc_id_for(records[0].id)}, '{records[0].id}', 'a.jpg', 'JPEG', 641, 480, 10001, {expected_us}, 0, 0, ("
    )
    assert first in rendered
    assert literals(rendered) == [records[0].id, "a.jpg", "JPEG", records[1].id, "b.png", "PNG"]
    # The vector literal is the float32 values with 9 significant digits: they parse back exactly.
    vec_text = re.search(r", (\([^()']*\))\), \(", rendered).group(1)
    parsed = np.array([float(x) for x in vec_text.strip("()").split(",")], dtype=np.float32)
    np.testing.assert_array_equal(parsed, vectors[0])


def test_same_render_as_a_pymysql_cursor():
    conn = pymysql.connections.Connection(defer_connect=True, charset="utf8mb4")
    conn.server_status = 0  # what a server reports without NO_BACKSLASH_ESCAPES (Manticore does not set it)
    records = [_record(3, _unit(np.random.default_rng(1), 1)[0], filename=HOSTILE[0])]
    sql, params = mc.replace_sql("images", records, DIM)
    assert conn.cursor().mogrify(sql, params) == mc.render_sql(sql, params)


@pytest.mark.parametrize("filename", HOSTILE)
def test_hostile_file_names_stay_one_escaped_literal(filename):
    record = _record(4, _unit(np.random.default_rng(2), 1)[0], filename=filename, fmt="JP'EG")
    rendered = mc.render_sql(*mc.replace_sql("images", [record], DIM))
    assert literals(rendered) == [record.id, filename, "JP'EG"]
    outside = outside_literals(rendered)
    assert "DROP" not in outside and "--" not in outside and ";" not in outside
    if "'" in filename:
        assert "\\'" in rendered  # the quote is backslash-escaped, not doubled


def test_text_that_manticore_cannot_unescape_is_replaced_not_corrupted():
    # pymysql sends NUL as \\0 and 0x1A as \\Z; Manticore would store a space and a 'Z'.
    assert mc.clean_text("a\x00b\x1ac") == "a\ufffdb\ufffdc"
    assert mc.clean_text("bad\udcffname") == "bad\ufffdname"
    everything = "".join(chr(c) for c in range(1, 128) if c != 0x1A) + "é日本\U0001f600"
    for text in [everything, "a\x00b\x1ac"]:
        cleaned = mc.clean_text(text)
        assert literals(mc.render_sql("SELECT %s", (cleaned,))) == [cleaned]
    assert literals(mc.render_sql("SELECT %s", ("a\x00b\x1ac",))) == ["a bZc"]  # why: uncleaned text is altered


@pytest.mark.parametrize(
    "bad",
    [
        np.full(DIM, np.nan, dtype=np.float32),
        np.array([np.inf] + [0.1] * (DIM - 1), dtype=np.float32),
        np.array([1e39] + [0.1] * (DIM - 1)),  # finite float64, inf as float32
        np.zeros(DIM, dtype=np.float32),
        np.ones(DIM + 1, dtype=np.float32),
        np.ones((1, DIM), dtype=np.float32),
    ],
)
def test_bad_vectors_are_rejected(bad):
    with pytest.raises(ValueError):
        mc.format_vector(bad, DIM)
    with pytest.raises(ValueError):
        mc.replace_sql("images", [_record(5, bad)], DIM)
    with pytest.raises(ValueError):
        mc.knn_search_sql("images", bad, 5, 40, DIM)


def test_vector_components_match_the_float_grammar():
    v = np.array([1e-5, -1e-5, 1.0, -0.5, 3.4e38, 1.17549435e-38, 0.1, -0.0], dtype=np.float32)
    text = mc.format_vector(v, DIM)
    parts = text.strip("()").split(",")
    assert all(_FLOAT.fullmatch(p) for p in parts), parts
    np.testing.assert_array_equal(np.array([float(p) for p in parts], dtype=np.float32), v)


@pytest.mark.parametrize(
    ("field", "value"), [("width", -1), ("height", 2**32), ("bytes", -5), ("bytes", 2**63), ("width", 1.5)]
)
def test_metadata_out_of_attribute_range_is_rejected(field, value):
    md = dict(filename="a", format="PNG", width=1, height=1, bytes=1, indexed_at=datetime.now(UTC))
    md[field] = value
    record = ImageRecord("a" * 64, _unit(np.random.default_rng(3), 1)[0], ImageMetadata(**md))
    with pytest.raises(ValueError):
        mc.replace_sql("images", [record], DIM)


def test_delete_and_get_statements_check_the_image_id():
    image_id = "ab" * 32
    assert mc.render_sql(*mc.delete_sql("images", image_id)) == (
        f"DELETE FROM images WHERE id = {mc.doc_id_for(image_id)} AND image_id = '{image_id}'"
    )
    assert mc.render_sql(*mc.get_sql("images", image_id)) == (
        "SELECT id, image_id, filename, img_format, width, height, size_bytes, indexed_us, taken_us, has_taken, "
        f"embedding FROM images WHERE id = {mc.doc_id_for(image_id)} AND image_id = '{image_id}'"
    )
    assert mc.render_sql(*mc.get_sql("images", image_id, taken=False)).startswith(
        "SELECT id, image_id, filename, img_format, width, height, size_bytes, indexed_us, embedding FROM images "
    )


# --- reads --------------------------------------------------------------------------------------------------------
def test_knn_query_shape():
    v = _unit(np.random.default_rng(4), 1)[0]
    sql, params = mc.knn_search_sql("images", v, 5, 40, DIM)
    assert params == ()
    assert sql.startswith(
        "SELECT id, image_id, filename, img_format, width, height, size_bytes, indexed_us, taken_us, has_taken, "
        "knn_dist() AS distance FROM images WHERE knn(embedding, 5, ("
    )
    assert sql.endswith(", {ef=40, early_termination=0}) LIMIT 5")
    assert mc.format_vector(v, DIM) in sql
    assert "%" not in sql and "'" not in sql  # nothing but validated numbers
    legacy, _ = mc.knn_search_sql("images", v, 5, 40, DIM, taken=False)
    assert legacy.startswith("SELECT id, image_id, filename, img_format, width, height, size_bytes, indexed_us, knn")


def test_knn_query_above_the_default_max_matches_raises_it():
    v = _unit(np.random.default_rng(5), 1)[0]
    assert mc.knn_search_sql("images", v, 1500, 1500, DIM)[0].endswith(
        "{ef=1500, early_termination=0}) LIMIT 1500 OPTION max_matches=1500"
    )
    with pytest.raises(ValueError):
        mc.knn_search_sql("images", v, 0, 40, DIM)


def test_scan_pages_by_document_id_never_by_a_string_range():
    # A string range filter (image_id > '...') gave wrong results on a real engine's disk chunks (issue #12).
    assert mc.scan_sql("images", 0, 10) == (
        "SELECT id, image_id, filename, img_format, width, height, size_bytes, indexed_us, taken_us, has_taken, "
        "embedding FROM images WHERE id > 0 ORDER BY id ASC LIMIT 10"
    )
    after = mc.doc_id_for("0" * 63 + "9")
    assert mc.scan_sql("images", after, 5000, taken=False) == (
        "SELECT id, image_id, filename, img_format, width, height, size_bytes, indexed_us, embedding FROM images "
        f"WHERE id > {after} ORDER BY id ASC LIMIT 5000 OPTION max_matches=5000"
    )
    for bad in ("x' OR 1=1 --", -1, 2**63, None):
        with pytest.raises(ValueError):
            mc.scan_sql("images", bad, 10)


def test_lookup_by_document_ids():
    ids = [mc.doc_id_for(f"{i:064x}") for i in range(3)]
    assert mc.lookup_doc_ids_sql("images", ids) == (
        f"SELECT id, image_id FROM images WHERE id IN ({ids[0]}, {ids[1]}, {ids[2]}) LIMIT 3"
    )
    with pytest.raises(ValueError):
        mc.lookup_doc_ids_sql("images", [0])


def test_vectors_are_parsed_from_manticores_text_form():
    v = mc.parse_vector("0.100000,-0.200000,0.300000", 3)
    assert v.dtype == np.float32 and v.shape == (3,)
    np.testing.assert_allclose(v, [0.1, -0.2, 0.3])
    np.testing.assert_allclose(mc.parse_vector(b"(0.5, 0.25)", 2), [0.5, 0.25])
    with pytest.raises(DatabaseUnavailableError):
        mc.parse_vector("0.1,0.2", 3)


# --- the handler without an engine --------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_engine_raises_database_unavailable_quickly():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as err:
        ManticoreHandler("127.0.0.1", port, timeout_s=2)
    assert time.monotonic() - start < 5
    assert f"127.0.0.1:{port}" in str(err.value)


class _FakeCursor:
    """Replays canned results; records the statements (the handler's logic, not Manticore's, is under test)."""

    def __init__(self, conn):
        self.conn = conn
        self._rows: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql, params=()):
        self.conn.sent.append(mc.render_sql(sql, params))
        outcome = self.conn.script.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        self._rows = list(outcome)
        return len(self._rows)

    def fetchall(self):
        return self._rows

    def fetchone(self):
        return self._rows[0] if self._rows else None


class _FakeConnection:
    def __init__(self, script, sent):
        self.script, self.sent, self.closed = script, sent, False

    def cursor(self):
        return _FakeCursor(self)

    def close(self):
        self.closed = True


def _handler(monkeypatch, script) -> tuple[ManticoreHandler, list[str], list[_FakeConnection]]:
    sent: list[str] = []
    made: list[_FakeConnection] = []

    def connect(self, io_timeout_s=None):
        made.append(_FakeConnection(script, sent))
        return made[-1]

    monkeypatch.setattr(ManticoreHandler, "_connect", connect)
    return ManticoreHandler("127.0.0.1", 9306, table="images", ef_search=10), sent, made


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one(monkeypatch):
    meta = [("images_meta", "rt")]
    h, sent, made = _handler(monkeypatch, [meta, [("m", DIM)]])
    assert h._dim == DIM and len(made) == 1  # the constructor read the meta; its connection is now pooled
    made[0].script[:] = [pymysql.err.OperationalError(2006, "MySQL server has gone away"), meta, [("m", DIM)]]
    info = h.collection_info()
    assert (info.model_id, info.dim) == ("m", DIM)
    assert made[0].closed and len(made) == 2


def test_rejected_statement_is_reported_and_the_connection_kept(monkeypatch):
    h, sent, made = _handler(monkeypatch, [[]])  # constructor: no meta table
    made[0].script[:] = [pymysql.err.ProgrammingError(1064, "P01: syntax error")]
    with pytest.raises(DatabaseUnavailableError, match="syntax error"):
        h.collection_info()
    assert not made[0].closed and len(made) == 1


def test_mismatched_model_is_refused(monkeypatch):
    h, sent, made = _handler(monkeypatch, [[]])
    made[0].script[:] = [[], [("images_meta", "rt")], [("other:v2", DIM)]]
    with pytest.raises(CollectionMismatchError):
        h.ensure_collection("test:v1", DIM)
    assert sent[1] == "CREATE TABLE IF NOT EXISTS images_meta (model_id string, dim int)"


_COLUMNS = [(c,) for c in mc.REQUIRED_COLUMNS + ("taken_us", "has_taken")]  # DESCRIBE of an up-to-date table


def test_search_scores_are_one_minus_knn_dist_and_ef_is_raised_to_top_k(monkeypatch):
    h, sent, made = _handler(monkeypatch, [[("images_meta", "rt")], [("m", DIM)]])
    when = to_epoch_us(datetime(2026, 1, 1, tzinfo=UTC))
    rows = [
        (2, "b" * 64, "b.jpg", "JPEG", 3, 4, 5, when, when - 1, 1, 0.25),
        (1, "a" * 64, "a.jpg", "PNG", 1, 2, 3, when, 0, 0, 0.125),
    ]
    made[0].script[:] = [_COLUMNS, rows]  # first use: DESCRIBE finds the taken columns; then the search
    hits = h.search(_unit(np.random.default_rng(6), 1)[0], 20)
    assert [x.id for x in hits] == ["a" * 64, "b" * 64]
    assert [x.score for x in hits] == [0.875, 0.75]
    assert hits[0].metadata == ImageMetadata("a.jpg", "PNG", 1, 2, 3, datetime(2026, 1, 1, tzinfo=UTC))
    assert hits[1].metadata.taken_at == datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert sent[-2] == "DESCRIBE images"
    assert ", {ef=20, early_termination=0}) LIMIT 20" in sent[-1]


def test_health_never_raises_and_close_is_idempotent(monkeypatch):
    h, sent, made = _handler(monkeypatch, [[]])
    made[0].script[:] = [pymysql.err.OperationalError(2013, "Lost connection")]
    monkeypatch.setattr(
        ManticoreHandler, "_connect", lambda self: (_ for _ in ()).throw(DatabaseUnavailableError("down"))
    )
    assert h.health() is False
    h.close()
    h.close()
    assert h.health() is False


# --- filters and taken_at (issue #9) -------------------------------------------------------------------------------
HOSTILE_FOLDERS = [
    "trips/2024",
    "odd/50%_off",
    'q/it\'s "quoted"',
    "q/back\\slash",
    "a.b*c+d?(e)[f]{g}|h^i$",
    "x\ny",
    "日本",
]


@pytest.mark.parametrize("folder", HOSTILE_FOLDERS)
def test_path_prefix_is_one_literal_regex_anchored_at_the_start(folder):
    """The folder reaches REGEX() as one string literal whose RE2 pattern matches exactly the names under it.

    Python's ``re`` stands in for RE2 here: both read a backslash before an ASCII punctuation character (or a space
    or newline) as that character, and ``^`` as the start of the text.
    """
    f = SearchFilter.create(path_prefix=folder)
    sql, params = mc.knn_search_sql("images", _unit(np.random.default_rng(7), 1)[0], 10, 40, DIM, f)
    rendered = mc.render_sql(sql, params)
    assert ", REGEX(filename, '" in rendered and " AND path_ok = 1 LIMIT 10" in rendered
    [pattern] = literals(rendered)
    assert pattern == "^" + mc.re2_literal(f"{folder}/")
    outside = outside_literals(rendered)
    assert "DROP" not in outside and "quoted" not in outside
    regex = re.compile(pattern, re.S)
    names = [f"{folder}/a.jpg", f"{folder}/sub/b.jpg", f"{folder}x/c.jpg", f"{folder}", f"z{folder}/d.jpg"]
    names += [f"{folder.replace('%', 'Q').replace('_', 'Q').replace('.', 'Q')}/e.jpg"]
    assert [bool(regex.match(n)) for n in names] == [n.startswith(f"{folder}/") for n in names]


def test_each_filter_becomes_a_condition_beside_knn():
    f = SearchFilter.create(
        formats="jpeg,png",
        indexed_after=datetime(2024, 1, 1, tzinfo=UTC),
        indexed_before=datetime(2024, 2, 1, tzinfo=UTC),
        taken_after=datetime(1970, 1, 1, tzinfo=UTC),
        taken_before=datetime(2000, 1, 1),
        min_width=640,
        min_height=0,
    )
    sql, params = mc.knn_search_sql("images", _unit(np.random.default_rng(8), 1)[0], 10, 40, DIM, f)
    assert "REGEX" not in sql and params == ("JPEG", "PNG")
    assert sql.endswith(
        "{ef=40, early_termination=0}) AND img_format IN (%s, %s) AND indexed_us >= 1704067200000000 "
        "AND indexed_us < 1706745600000000 AND has_taken = 1 AND taken_us >= 0 AND taken_us < 946684800000000 "
        "AND width >= 640 AND height >= 0 LIMIT 10"
    )
    assert mc.render_sql(sql, params).count("'JPEG', 'PNG'") == 1
    # A taken_* filter on a table without the taken columns can match nothing: no statement at all.
    assert mc.knn_search_sql("images", _unit(np.random.default_rng(8), 1)[0], 10, 40, DIM, f, taken=False) is None
    assert mc.filter_sql(SearchFilter()) == ("", "", ())
    with pytest.raises(ValueError):
        mc.filter_sql(SearchFilter(min_width=2**32))


def test_taken_at_is_written_with_its_flag_and_read_back():
    taken = datetime(1970, 1, 1, tzinfo=UTC)  # a reset camera clock: 0 microseconds, still a time
    record = _record(5, _unit(np.random.default_rng(9), 1)[0])
    record = ImageRecord(record.id, record.vector, replace(record.metadata, taken_at=taken))
    rendered = mc.render_sql(*mc.replace_sql("images", [record], DIM))
    assert f", {to_epoch_us(record.metadata.indexed_at)}, 0, 1, (" in rendered
    legacy = mc.render_sql(*mc.replace_sql("images", [record], DIM, taken=False))
    assert "taken_us" not in legacy and f", {to_epoch_us(record.metadata.indexed_at)}, (" in legacy
    row = ("a.jpg", "JPEG", 1, 2, 3, 10, 0, 1)
    assert mc.metadata_from_row(row).taken_at == taken
    assert mc.metadata_from_row(row[:6] + (0, 0)).taken_at is None
    assert mc.metadata_from_row(row[:6]).taken_at is None
    assert mc.add_column_sql("images", "taken_us") == "ALTER TABLE images ADD COLUMN taken_us bigint"
    assert mc.add_column_sql("images", "has_taken") == "ALTER TABLE images ADD COLUMN has_taken bool"
    with pytest.raises(ValueError):
        mc.add_column_sql("images", "x; DROP TABLE images")


def test_table_from_before_taken_at_gets_the_columns_on_first_use(monkeypatch):
    h, sent, made = _handler(monkeypatch, [[("images_meta", "rt")], [("m", DIM)]])
    old_columns = [(c,) for c in mc.REQUIRED_COLUMNS]
    made[0].script[:] = [old_columns, [], [], [(0,)]]
    assert h.count() == 0
    assert sent[-4:] == [
        "DESCRIBE images",
        "ALTER TABLE images ADD COLUMN taken_us bigint",
        "ALTER TABLE images ADD COLUMN has_taken bool",
        "SELECT COUNT(*) FROM images",
    ]
    assert h._taken is True


def test_engine_refusing_the_new_columns_leaves_the_handler_working_without_them(monkeypatch):
    h, sent, made = _handler(monkeypatch, [[("images_meta", "rt")], [("m", DIM)]])
    old_columns = [(c,) for c in mc.REQUIRED_COLUMNS]
    refused = pymysql.err.ProgrammingError(1064, "alter not supported")
    made[0].script[:] = [old_columns, refused, old_columns, []]
    q = _unit(np.random.default_rng(10), 1)[0]
    assert h.search(q, 5, SearchFilter.create(taken_after=datetime(2020, 1, 1))) == []  # no query: nothing matches
    assert h._taken is False and sent[-1] == "DESCRIBE images"
    when = to_epoch_us(datetime(2026, 1, 1, tzinfo=UTC))
    made[0].script[:] = [[(1, "a" * 64, "a.jpg", "PNG", 1, 2, 3, when, 0.5)]]
    [hit] = h.search(q, 5)
    assert hit.metadata.taken_at is None and "taken_us" not in sent[-1]


def test_filtered_search_with_too_few_rows_asks_once_more_with_a_larger_k(monkeypatch):
    """An engine before 19.0.1 filters the k candidates after the KNN step: fewer than top_k rows come back."""
    h, sent, made = _handler(monkeypatch, [[("images_meta", "rt")], [("m", DIM)]])
    when = to_epoch_us(datetime(2026, 1, 1, tzinfo=UTC))

    def row(i, dist):  # HIT_COLUMNS, path_ok, distance
        return (i, f"{i:064x}", f"trips/{i}.jpg", "JPEG", 1, 2, 3, when, 0, 0, 1, dist)

    made[0].script[:] = [_COLUMNS, [row(1, 0.5)], [row(2, 0.25), row(1, 0.5), row(3, 0.75)]]
    hits = h.search(_unit(np.random.default_rng(11), 1)[0], 2, SearchFilter.create(path_prefix="trips"))
    assert [x.id for x in hits] == [f"{2:064x}", f"{1:064x}"]
    assert hits[0].metadata.filename == "trips/2.jpg" and hits[0].score == 0.75
    assert "knn(embedding, 2, (" in sent[-2] and "{ef=10, early_termination=0}) AND path_ok = 1 LIMIT 2" in sent[-2]
    assert f"knn(embedding, {2 * mc.FILTER_RETRY_FACTOR}, (" in sent[-1]
    assert f"{{ef={2 * mc.FILTER_RETRY_FACTOR}, early_termination=0}}) AND path_ok = 1 LIMIT 2" in sent[-1]


# --- several collections: the active-collection pointer (scripts/reindex.py) ----------------------------------
def test_active_collection_statements():
    assert mc.create_active_table_sql() == "CREATE TABLE IF NOT EXISTS image_search_active (collection string)"
    assert mc.select_active_sql() == "SELECT collection FROM image_search_active WHERE id = 1"
    assert mc.render_sql(*mc.replace_active_sql("clip_small")) == (
        "REPLACE INTO image_search_active (id, collection) VALUES (1, 'clip_small')"
    )
    assert mc.drop_table_sql("clip_small_meta") == "DROP TABLE IF EXISTS clip_small_meta"
    assert mc.render_sql(*mc.show_meta_tables_sql()) == "SHOW TABLES LIKE '%_meta'"
    for hostile in ("x'; DROP TABLE images; --", "Images", "select"):
        with pytest.raises(ValueError):
            mc.replace_active_sql(hostile)
        with pytest.raises(ValueError):
            mc.drop_table_sql(hostile)


def test_handler_without_a_table_opens_the_active_one_and_switches_in_one_statement(monkeypatch):
    pointer = [("image_search_active", "rt")]
    script = [pointer, [("clip_small",)], [("clip_small_meta", "rt")], [("m2", DIM)]]
    sent: list[str] = []
    made: list[_FakeConnection] = []

    def connect(self, io_timeout_s=None):
        made.append(_FakeConnection(script, sent))
        return made[-1]

    monkeypatch.setattr(ManticoreHandler, "_connect", connect)
    h = ManticoreHandler("127.0.0.1", 9306)
    assert (h.collection_name, h._dim) == ("clip_small", DIM)
    assert sent[:2] == ["SHOW TABLES LIKE 'image_search_active'", mc.select_active_sql()]
    assert sent[2:] == ["SHOW TABLES LIKE 'clip_small_meta'", "SELECT model_id, dim FROM clip_small_meta WHERE id = 1"]

    # Switching back to `images`: its bookkeeping must exist, then one REPLACE of the pointer document.
    sent.clear()
    script[:] = [[("images_meta", "rt")], [("m1", DIM)], [], []]
    h.activate_collection("images")
    assert sent == [
        "SHOW TABLES LIKE 'images_meta'",
        "SELECT model_id, dim FROM images_meta WHERE id = 1",
        mc.create_active_table_sql(),
        "REPLACE INTO image_search_active (id, collection) VALUES (1, 'images')",
    ]
    script[:] = [[]]  # no bookkeeping table: nothing to switch to, nothing written
    with pytest.raises(ValueError, match="no collection 'other'"):
        h.activate_collection("other")

    # The active collection is never dropped; another one loses both of its tables.
    script[:] = [pointer, [("images",)]]
    with pytest.raises(ValueError, match="active collection"):
        h.drop_collection("images")
    sent.clear()
    script[:] = [pointer, [("images",)], [("clip_small_meta", "rt")], [("m2", DIM)], [], []]
    assert h.drop_collection("clip_small") is True
    assert sent[-2:] == ["DROP TABLE IF EXISTS clip_small", "DROP TABLE IF EXISTS clip_small_meta"]


def test_handler_without_a_pointer_opens_images(monkeypatch):
    script = [[], [("images_meta", "rt")], [("m1", DIM)]]
    monkeypatch.setattr(ManticoreHandler, "_connect", lambda self: _FakeConnection(script, []))
    assert ManticoreHandler("127.0.0.1", 9306).collection_name == "images"


# --- a hung engine (issue #20): a real loopback socket that stops answering -------------------------------------
class _SilentMySQL:
    """A loopback MySQL-protocol listener that greets and logs clients in (``answer_login``), answers pymysql's
    ``SET NAMES``, and then never answers a statement, or (``answer_login=False``) accepts connections and never
    says anything: a hung engine.

    Threads are daemons; :meth:`close` closes the listener and every accepted socket. At most ``max_clients``.
    """

    def __init__(self, *, answer_login: bool, max_clients: int = 8) -> None:
        self.answer_login = answer_login
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.statements = 0
        self._stop = threading.Event()
        self._max = max_clients
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _packet(seq: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "little") + bytes([seq]) + payload

    def _serve(self) -> None:
        while not self._stop.is_set() and len(self.accepted) < self._max:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)
            if self.answer_login:
                threading.Thread(target=self._login, args=(conn,), daemon=True).start()

    def _login(self, conn: socket.socket) -> None:
        caps = 0x1 | 0x200 | 0x2000 | 0x8000 | 0x80000  # long password, 4.1 protocol, transactions, auth plugin
        greeting = (
            b"\x0a5.7.0-silent\x00"
            + (1).to_bytes(4, "little")
            + b"abcdefgh\x00"
            + (caps & 0xFFFF).to_bytes(2, "little")
            + bytes([45])  # utf8mb4
            + (0x0002).to_bytes(2, "little")  # autocommit
            + (caps >> 16).to_bytes(2, "little")
            + bytes([21])
            + b"\x00" * 10
            + b"ijklmnopqrst\x00"
            + b"mysql_native_password\x00"
        )
        conn.sendall(self._packet(0, greeting))
        conn.settimeout(5)
        try:
            conn.recv(4096)  # the login
            conn.sendall(self._packet(2, b"\x00\x00\x00\x02\x00\x00\x00"))  # OK, autocommit
            while b"SET NAMES" in conn.recv(4096):  # what pymysql sends on connecting: answered
                conn.sendall(self._packet(1, b"\x00\x00\x00\x02\x00\x00\x00"))
            self.statements += 1  # any other statement: read, never answered
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for conn in list(self.accepted):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv
        self._thread.join(timeout=2)
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def test_a_hung_engine_gives_a_timeout_error_within_the_request_deadline():
    from app.errors import DatabaseTimeoutError

    server = _SilentMySQL(answer_login=True)
    try:
        start = time.monotonic()
        with pytest.raises(DatabaseTimeoutError) as err:  # the constructor reads the collection's bookkeeping
            ManticoreHandler("127.0.0.1", server.port, table="images", timeout_s=30, request_timeout_s=0.5)
        took = time.monotonic() - start
        assert server.statements == 1  # logged in, sent one statement, not retried on a fresh connection
        # Bounded by the 0.5 s request deadline, not the 30 s timeout; the upper bound leaves room for a stall of a
        # shared 2-core CI machine (1.10 s was seen at load 7.5), while a retry is caught by the count above.
        assert 0.45 < took < 5.0, took
        assert "did not answer within 0.5 s" in str(err.value)
    finally:
        server.close()


def test_an_engine_silent_from_the_first_byte_is_unavailable_within_the_request_deadline():
    server = _SilentMySQL(answer_login=False)
    try:
        start = time.monotonic()
        with pytest.raises(DatabaseUnavailableError):  # connected, but no greeting: not reachable as Manticore
            ManticoreHandler("127.0.0.1", server.port, table="images", timeout_s=30, request_timeout_s=0.2)
        assert time.monotonic() - start < 5.0  # the request deadline, not the 30 s timeout (room for a CI stall)
    finally:
        server.close()


def test_long_operations_get_a_connection_of_their_own_with_the_long_timeout():
    server = _SilentMySQL(answer_login=True)
    try:
        handler = object.__new__(ManticoreHandler)  # no constructor: it would read from the silent engine
        handler.__dict__.update(
            _host="127.0.0.1",
            _port=server.port,
            _timeout_s=10.0,
            _long_io_s=60.0,
            _request_io_s=0.5,
            _lock=threading.Lock(),
            _closed=False,
            _idle=[],
            _max_idle=4,
        )
        short = handler._connect()
        long = handler._connect(handler._long_io_s)
        try:
            assert (short._read_timeout, short._write_timeout) == (0.5, 0.5)
            assert (long._read_timeout, long._write_timeout) == (60.0, 60.0)
        finally:
            short.close()
            long.close()
    finally:
        server.close()
