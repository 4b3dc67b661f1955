"""Smoke run of bench/exact_pass_layout.py: a tiny table end to end, every layout answering every filter with the
exact top-10, the covering layouts by an index-only scan."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import PROJECT_ROOT


def test_exact_pass_layout_smoke_run_prints_the_json_line():
    cmd = [sys.executable, "bench/exact_pass_layout.py", "--n", "3000", "--dim", "32", "--matching", "100,300"]
    cmd += ["--queries", "10", "--shared-buffers", "128MB"]
    out = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert (line["bench"], line["n"], line["dim"]) == ("exact_pass_layout", 3000, 32)
    assert [(r["layout"], r["matching"]) for r in line["rows"]] == [
        (layout, m) for layout in ("heap", "covering", "covering_inline") for m in (100, 300)
    ]
    for r in line["rows"]:
        assert r["index_only"] == (r["layout"] != "heap"), r
        assert r["recall_at_10"] >= 0.9, r  # 400 re-ranked of at most 300 rows: exact up to halfvec rounding
        assert 0 < r["p50_ms"] <= r["p95_ms"]
    assert {"images", "images_inline", "images_format_covering", "images_format_upper"} <= set(line["sizes_mb"])
