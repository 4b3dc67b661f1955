"""Smoke run of bench/search_scale.py: a tiny N end to end (COPY, HNSW build, handler and API passes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import PROJECT_ROOT


def test_search_scale_smoke_run_prints_the_json_line():
    cmd = [sys.executable, "bench/search_scale.py", "--n", "2000", "--dim", "32", "--queries", "30", "--ef", "40"]
    # Without DATABASE_URL the bench starts its own embedded PostgreSQL in a temporary directory.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"backend", "n", "dim", "build_s", "index_mb", "results"} <= set(line)
    assert (line["backend"], line["n"], line["dim"]) == ("pgvector", 2000, 32)
    assert line["index_mb"] > 0 and line["build_s"] >= 0
    assert [r["ef_search"] for r in line["results"]] == [40]  # one API server start keeps it short
    for r in line["results"]:
        assert set(r) == {"ef_search", "recall_at_10", "p50_ms", "p95_ms", "p99_ms", "api_p50_ms"}
        assert 0.5 <= r["recall_at_10"] <= 1.0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["api_p50_ms"] > 0
