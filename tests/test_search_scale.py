"""Smoke runs of bench/search_scale.py: a tiny N end to end on every backend (load, index, handler and API passes,
a timed full scan), all printing the same JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import PROJECT_ROOT
from tests.test_vectordb_contract import manticore_address

# Runs a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def _run(backend: str, n: int, *extra: str) -> dict:
    cmd = [sys.executable, "bench/search_scale.py", "--backend", backend, "--n", str(n), "--dim", "32"]
    cmd += ["--queries", "30", "--ef", "40", "--check-scan", *extra]
    # Without DATABASE_URL / MILVUS_URI the bench starts its own embedded database in a temporary directory.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MILVUS_URI")}
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert (line["backend"], line["n"], line["dim"]) == (backend, n, 32)
    assert line["build_s"] >= 0
    assert [r["ef_search"] for r in line["results"]] == [40]  # one API server start keeps it short
    for r in line["results"]:
        assert set(r) == {"ef_search", "recall_at_10", "p50_ms", "p95_ms", "p99_ms", "api_p50_ms"}
        assert 0.5 <= r["recall_at_10"] <= 1.0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert line["scan"] == {"rows": n, "distinct": n, "complete": True, "seconds": line["scan"]["seconds"]}
    return line


def test_search_scale_smoke_run_prints_the_json_line():
    line = _run("pgvector", 2000)
    assert {"build_s", "index_mb", "table_mb", "results"} <= set(line)
    assert line["index_mb"] > 0
    assert line["results"][0]["api_p50_ms"] > 0


def test_search_scale_runs_milvus_lite_with_the_same_line():
    line = _run("milvus", 3000, "--batch-size", "500")
    assert 0 < line["index_mb"] <= line["table_mb"]  # Lite's FAISS index files inside its database directory
    assert line["results"][0]["api_p50_ms"] > 0  # the service itself served the Lite database


@pytest.mark.skipif(manticore_address() is None, reason="Manticore Search is not reachable (MANTICORE_HOST)")
def test_search_scale_runs_manticore_with_the_same_line():
    _run("manticore", 3000)


@pytest.mark.parametrize("backend", ["pgvector", "milvus"])
def test_search_scale_reports_filtered_recall(backend):
    """``--filter-selectivity``: one filtered row per selectivity and ef, every search full, the folders keeping
    about the asked fraction of the rows."""
    line = _run(backend, 3000, "--no-api", "--filter-selectivity", "0.1,0.5", "--filter-ef", "40")
    assert [(r["selectivity"], r["ef_search"]) for r in line["filtered"]] == [(0.1, 40), (0.5, 40)]
    for r in line["filtered"]:
        keys = {"kind", "selectivity", "matching", "ef_search", "recall_at_10", "full", "p50_ms", "p95_ms"}
        if backend == "pgvector":  # the planner's estimate, which plan answered, a filter's first search (#29)
            keys |= {"planner_estimate", "plans", "p50_first_ms", "p95_first_ms", "first_plans"}
            plans = r["plans"]
            assert plans["exact_pass"] + plans["iterative"] + plans["exact_fallback"] == 30  # each search once
            assert plans["row_counts"] <= 1  # the warm-up's searches counted the filter's rows; kept for 30 s
            assert 0 < r["p50_first_ms"] <= r["p95_first_ms"]
            first = r["first_plans"]  # each first search's exact pass counted its rows or trusted its estimate
            assert first["exact_pass"] > 0 and first["row_counts"] + first["estimates_held"] == first["exact_pass"]
        assert set(r) == keys and r["kind"] == "folder"
        assert abs(r["matching"] / 3000 - r["selectivity"]) < 0.05
        assert r["full"] == 1.0 and r["recall_at_10"] >= 0.9


@pytest.mark.parametrize("order", ["random", "clustered"])
def test_synthetic_metadata_order_places_folders_and_dates(order):
    """``--metadata-order clustered``: a folder and a date window are runs of consecutive rows (a library indexed
    folder by folder); ``random`` scatters them. Either way each filter keeps about its share, and format and size
    stay scattered."""
    sys.path.insert(0, str(PROJECT_ROOT / "bench"))
    from search_scale import SyntheticMetadata

    meta = SyntheticMetadata(20_000, [0.02, 0.1], seed=3, kinds=("folder", "format", "size", "date"), order=order)
    for kind, share, _filter, mask in meta.filters():
        rows = np.flatnonzero(mask)  # _mask checked these against SearchFilter.matches on a sample of rows
        assert abs(len(rows) / 20_000 - share) < 0.01, (kind, share)
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        assert contiguous == (order == "clustered" and kind in ("folder", "date")), (kind, share)


def test_filtered_ab_compares_two_databases_holding_the_same_rows(pg_server):
    """bench/filtered_ab.py on the rows search_scale.py left in a database (``DATABASE_URL``) and on a copy of them
    (``CREATE DATABASE ... TEMPLATE``) whose table keeps its vectors in TOAST: both answer every filter with the
    same recall, and every search is counted."""
    import psycopg

    from tests.helpers import create_database

    url_a = create_database(pg_server)
    load = [sys.executable, "bench/search_scale.py", "--n", "3000", "--dim", "32", "--queries", "10", "--ef", "40"]
    load += ["--no-api", "--filter-selectivity", "0.02,0.1", "--filter-kinds", "folder,size"]
    out = subprocess.run(
        load, cwd=PROJECT_ROOT, env={**os.environ, "DATABASE_URL": url_a}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with psycopg.connect(url_a) as conn:
        name_a, name_b = conn.execute("SELECT current_database()").fetchone()[0], "ab_copy_" + os.urandom(4).hex()
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name_b}" TEMPLATE "{name_a}"')
    url_b = pg_server.get_uri(name_b)
    with psycopg.connect(url_b, autocommit=True) as conn:
        conn.execute("ALTER TABLE images RESET (toast_tuple_target)")
        conn.execute("VACUUM FULL images")
    cmd = [sys.executable, "bench/filtered_ab.py", url_a, url_b, "--n", "3000", "--dim", "32", "--queries", "12"]
    cmd += ["--ef", "40", "--filter-selectivity", "0.02,0.1", "--filter-kinds", "folder,size"]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert (line["bench"], line["n"], line["queries"]) == ("filtered_ab", 3000, 12)
    assert [(r["kind"], r["selectivity"]) for r in line["rows"]] == [
        ("folder", 0.02),
        ("folder", 0.1),
        ("size", 0.02),
        ("size", 0.1),
    ]
    for r in line["rows"]:
        assert r["a"]["recall_at_10"] >= 0.9 and r["b"]["recall_at_10"] >= 0.9
        assert sum(r["a"]["plans"].values()) == sum(r["b"]["plans"].values()) == 12
        assert 0 < r["a"]["p50_ms"] <= r["a"]["p95_ms"]
    # one database, two plans: b's exact pass is switched off (EXACT_SEARCH_MAX_ROWS 0), a's is not
    cmd = [*cmd[:2], url_a, url_a, *cmd[4:], "--b-set", "EXACT_SEARCH_MAX_ROWS=0", "--b-set", "EXACT_ALWAYS_ROWS=0"]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["b_set"] == {"EXACT_SEARCH_MAX_ROWS": 0, "EXACT_ALWAYS_ROWS": 0}
    folder_2 = line["rows"][0]  # 60 of 3,000 rows: the exact pass, unless it is switched off
    assert folder_2["a"]["plans"]["exact_pass"] == 12 and folder_2["b"]["plans"]["exact_pass"] == 0
    assert folder_2["b"]["last_ef"] is not None
