"""Smoke run of bench/neighbours.py: a tiny N end to end (COPY of the synthetic rows, HNSW build, the neighbour-graph
job, its exact check), printing its JSON line. It had gone untested and broke when search_scale.copy_rows gained
its metadata argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import PROJECT_ROOT

# Runs a database: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_neighbours_bench_smoke_run_prints_the_json_line():
    cmd = [sys.executable, "bench/neighbours.py", "--n", "2000", "--dim", "32", "--check", "100"]
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # its own embedded database
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert (line["benchmark"], line["n"], line["dim"]) == ("neighbours", 2000, 32)
    assert line["recall_at_k"] >= 0.9 and line["graph_s"] > 0
