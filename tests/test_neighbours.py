"""The neighbour graph job, near-duplicate groups and DBA (issue #9, items 5 and 6).

Real photos of ``instance_small``, the real offline model, a real embedded PostgreSQL; expected graphs, groups and
rankings are computed by hand with numpy from the stored vectors (the HNSW search is exact at these sizes).
"""

from __future__ import annotations

import csv
import json
import sqlite3
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.ids import image_id_for
from app.main import create_app
from app.neighbours import graph as graph_module
from app.neighbours.dba import dba_vector
from app.neighbours.duplicates import duplicate_groups
from app.neighbours.store import Edge
from app.search.dba import DbaRerank, rerank
from app.vectordb.base import ImageMetadata, SearchHit
from tests.helpers import INSTANCE, make_settings, run_live_server
from tests.test_cli import run_cli

pytestmark = pytest.mark.slow

KEY = "neighbours-test-key"
# Near-duplicates (same photo: EXIF orientations, re-encodes, thumbnails, a WebP copy) and separate shots of one
# scene that must stay apart (viewpoint and light changes, the four desk photos: at most 0.88 similar). Groups near
# the default threshold (0.92) are left to bench/duplicates.py, which scores the whole dataset.
DUPLICATE_FOLDERS = ["exif_portrait", "plasma_Kite", "plasma_BytheWater", "gdk_bench_photo", "ukbench09380"]
APART_FOLDERS = ["ocv_aero_viewpoint", "ocv_graffiti_viewpoint", "ocv_leuven_light", "pdq_desk_exif"]
SINGLES = ["single_Aqua", "single_Dune", "single_Garden", "single_HappyFish"]


def _files(folders: list[str]) -> list:
    return [p for folder in folders for p in sorted((INSTANCE / folder).iterdir()) if p.is_file()]


def _client(tmp_path, database_url, embedder, **overrides) -> TestClient:
    settings = make_settings(tmp_path / "data", database_url, **overrides)
    return TestClient(create_app(settings, embedder=embedder))


def _index(client: TestClient, paths: list, headers: dict | None = None) -> dict[str, str]:
    """Index ``paths`` in batches; ``{id: folder/name}``."""
    names = {}
    for start in range(0, len(paths), 16):
        part = paths[start : start + 16]
        files = [("files", (p.name, p.read_bytes())) for p in part]
        data = {"filenames": [f"{p.parent.name}/{p.name}" for p in part]}
        r = client.post("/index_images", files=files, data=data, headers=headers or {})
        assert r.status_code == 200, r.text
        for p in part:
            names[image_id_for(p.read_bytes())] = f"{p.parent.name}/{p.name}"
    return names


def _build(client: TestClient, headers: dict | None = None) -> dict:
    r = client.post("/jobs/neighbours", headers=headers or {})
    assert r.status_code in (200, 202), r.text
    assert client.app.state.service.neighbours.wait(timeout=300)
    job = client.get(f"/jobs/{r.json()['id']}").json()
    assert job["state"] == "completed", job
    return job


def _stored(client: TestClient) -> tuple[list[str], np.ndarray]:
    ids, vectors = [], []
    for batch in client.app.state.service.db.scan():
        ids += [r.id for r in batch]
        vectors += [r.vector for r in batch]
    return ids, np.stack(vectors)


def _graph(client: TestClient, job_id: int, ids: list[str], k: int) -> dict[str, list[tuple[str, float]]]:
    return client.app.state.service.neighbours._store.neighbours_of(job_id, ids, k)


@pytest.fixture(scope="module")
def paths() -> list:
    return _files(DUPLICATE_FOLDERS + APART_FOLDERS + SINGLES)


# --- the graph ------------------------------------------------------------------------------------------------
def test_graph_equals_brute_force_knn_and_dba_vectors_are_the_formula(tmp_path, database_url, offline_embedder, paths):
    k, n, alpha = 5, 3, 3.0
    with _client(tmp_path, database_url, offline_embedder, neighbours_k=k, dba=True, dba_n=n, dba_alpha=alpha) as c:
        _index(c, paths)
        job = _build(c)
        assert job["dba"] and job["k"] == k and job["done"] == job["total"] == len(paths)
        ids, x = _stored(c)
        found = _graph(c, job["id"], ids, k)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        overlap = 0
        for row, image_id in enumerate(ids):
            exact = {ids[j] for j in np.argsort(-sims[row])[:k]}
            assert [d for d, _ in found[image_id]] and image_id not in {d for d, _ in found[image_id]}
            overlap += len(exact & {d for d, _ in found[image_id]})
            for dst, score in found[image_id]:  # scores are the cosines
                assert score == pytest.approx(float(sims[row, ids.index(dst)]), abs=1e-4)
        assert overlap / (k * len(ids)) >= 0.95

        # Each DBA vector is normalise(x + Σ s_i^α x_i) over the first n graph neighbours (float16 storage).
        stored = c.app.state.service.neighbours._store.vectors(job["id"], ids, "dba")
        assert set(stored) == set(ids)
        for row, image_id in enumerate(ids[:10]):
            nbrs = found[image_id][:n]
            w = np.array([s for _, s in nbrs]) ** alpha
            by_hand = x[row] + sum(wi * x[ids.index(d)] for wi, (d, _) in zip(w, nbrs, strict=True))
            by_hand /= np.linalg.norm(by_hand)
            np.testing.assert_allclose(stored[image_id], by_hand, atol=2e-3)


def test_dba_search_reranks_by_dba_vectors(tmp_path, database_url, offline_embedder, paths):
    with _client(tmp_path, database_url, offline_embedder, neighbours_k=5, dba=True, dba_n=3, dba_alpha=3.0) as c:
        _index(c, paths[:20])
        ids, x = _stored(c)
        q = x[0] + 0.5 * x[1]
        q /= np.linalg.norm(q)
        before = c.post("/search_vector", json={"vector": q.tolist(), "top_k": 10}).json()["results"]
        assert [r["id"] for r in before] == [ids[j] for j in np.argsort(-(x @ q))[:10]]  # no graph yet: plain

        job = _build(c)
        dba = c.app.state.service.neighbours._store.vectors(job["id"], ids, "dba")
        d = np.stack([dba[i] for i in ids])
        expected = np.argsort(-(d @ q), kind="stable")[:10]
        after = c.post("/search_vector", json={"vector": q.tolist(), "top_k": 10}).json()["results"]
        assert [r["id"] for r in after] == [ids[j] for j in expected]
        np.testing.assert_allclose([r["score"] for r in after], (d @ q)[expected], atol=1e-4)
        assert [r["id"] for r in after] != [r["id"] for r in before]  # DBA did change the ranking here


def test_dba_off_builds_no_dba_vectors_and_searches_plainly(tmp_path, database_url, offline_embedder, paths):
    with _client(tmp_path, database_url, offline_embedder, neighbours_k=5, dba=False) as c:
        _index(c, paths[:12])
        job = _build(c)
        assert not job["dba"] and c.app.state.service.neighbours.dba_rerank() is None


# --- resuming ---------------------------------------------------------------------------------------------------
def _job_row(tmp_path, database_url: str, store: str, job_id: int, set_state: str | None = None) -> tuple[str, int]:
    """``(state, done)`` of a job as stored (the SQLite file, or PostgreSQL's table), optionally setting its state
    first (what a kill -9 leaves: ``running``)."""
    if store == "sqlite":
        with sqlite3.connect(tmp_path / "data" / "neighbours.sqlite3") as conn:
            if set_state:
                conn.execute("UPDATE jobs SET state = ? WHERE id = ?", (set_state, job_id))
            return conn.execute("SELECT state, done FROM jobs WHERE id = ?", (job_id,)).fetchone()
    with psycopg.connect(database_url, autocommit=True) as conn:
        if set_state:
            conn.execute("UPDATE neighbour_jobs SET state = %s WHERE id = %s", (set_state, job_id))
        return conn.execute("SELECT state, done FROM neighbour_jobs WHERE id = %s", (job_id,)).fetchone()


@pytest.mark.parametrize("store", ["sqlite", "auto"])  # auto: PostgreSQL's tables (pgvector with a DATABASE_URL)
def test_job_resumes_after_the_service_stops_mid_job(
    tmp_path, database_url, offline_embedder, paths, monkeypatch, store
):
    monkeypatch.setattr(graph_module, "SCAN_BATCH", 4)  # many small batches, so a stop lands mid-job
    calls, half = [], threading.Event()
    real_nearest = graph_module.nearest

    def slow_nearest(db, record, k, ef_search=None):
        calls.append(record.id)
        if len(calls) >= 10:
            half.set()
            threading.Event().wait(0.05)
        return real_nearest(db, record, k, ef_search)

    monkeypatch.setattr(graph_module, "nearest", slow_nearest)
    settings = dict(neighbours_k=4, neighbours_threads=2, dba=True, dba_n=2, neighbours_store=store)
    with _client(tmp_path, database_url, offline_embedder, **settings) as c:
        assert c.app.state.service.neighbours.shared == (store == "auto")
        _index(c, paths)
        job_id = c.post("/jobs/neighbours").json()["id"]
        assert half.wait(60)
        # One job at a time: asking again answers the running one.
        again = c.post("/jobs/neighbours")
        assert again.status_code == 200 and again.json()["id"] == job_id
    # The service stopped (lifespan ended): the job stopped between two batches.
    state, done = _job_row(tmp_path, database_url, store, job_id)
    assert state == "interrupted" and 0 < done < len(paths)
    walked_first = len(calls)
    # As after a kill -9: the store still says running. The next start must resume it on its own.
    _job_row(tmp_path, database_url, store, job_id, set_state="running")

    monkeypatch.setattr(graph_module, "nearest", real_nearest)
    calls_after = []
    monkeypatch.setattr(
        graph_module, "nearest", lambda db, r, k, ef=None: calls_after.append(r.id) or real_nearest(db, r, k, ef)
    )
    with _client(tmp_path, database_url, offline_embedder, **settings) as c:
        assert c.app.state.service.neighbours.wait(timeout=300)
        job = c.get(f"/jobs/{job_id}").json()
        assert job["state"] == "completed" and job["done"] == len(paths)
        assert len(calls_after) <= len(paths) - done  # what was committed is not searched again
        assert walked_first + len(calls_after) >= len(paths)
        ids, x = _stored(c)
        found = _graph(c, job_id, ids, 4)
        assert all(len(found[i]) == 4 for i in ids)  # complete: every image has its neighbours
        assert len(c.app.state.service.neighbours._store.vectors(job_id, ids, "dba")) == len(ids)


# --- near-duplicates ---------------------------------------------------------------------------------------------
def test_duplicate_groups_on_instance_small_match_the_ground_truth(tmp_path, database_url, offline_embedder, paths):
    with _client(tmp_path, database_url, offline_embedder) as c:  # default NEIGHBOURS_K and DUPLICATE_THRESHOLD
        r = c.get("/duplicates")
        assert r.status_code == 409 and "POST /jobs/neighbours" in r.json()["detail"]
        names = _index(c, paths)
        _build(c)
        body = c.get("/duplicates").json()
        assert set(body) == {"groups", "threshold", "total", "graph_built_at"}
        assert body["threshold"] == c.app.state.settings.duplicate_threshold
        got = sorted(sorted(names[i] for i in g["ids"]) for g in body["groups"])
        expected = sorted(sorted(n for n in names.values() if n.split("/")[0] == f) for f in DUPLICATE_FOLDERS)
        assert got == expected
        sizes = [len(g["ids"]) for g in body["groups"]]
        assert sizes == sorted(sizes, reverse=True) and body["total"] == len(DUPLICATE_FOLDERS)
        for g in body["groups"]:
            assert g["filenames"] == [names[i] for i in g["ids"]]
            assert body["threshold"] <= g["min_score"] <= g["max_score"] <= 1.0 + 1e-6

        # Paging: the same groups, cut.
        page = c.get("/duplicates", params={"offset": 1, "limit": 2}).json()
        assert [g["ids"] for g in page["groups"]] == [g["ids"] for g in body["groups"][1:3]] and page["total"] == 5
        # A lower threshold groups the separate shots of one scene too.
        low = c.get("/duplicates", params={"threshold": 0.8}).json()
        assert low["threshold"] == 0.8 and sum(len(g["ids"]) for g in low["groups"]) > sum(sizes)
        aero = sorted(i for i, n in names.items() if n.startswith("ocv_aero_viewpoint/"))
        assert aero in [g["ids"] for g in low["groups"]]
        assert c.get("/duplicates", params={"threshold": 1.5}).status_code == 422
        assert c.get("/duplicates", params={"limit": 0}).status_code == 422

        # An image deleted since the build is left out; its group of two disappears.
        pair = next(g for g in body["groups"] if len(g["ids"]) == 2)
        assert c.delete(f"/image/{pair['ids'][0]}").status_code == 200
        after = c.get("/duplicates").json()
        assert pair["ids"] not in [g["ids"] for g in after["groups"]] and after["total"] == 4
        assert all(pair["ids"][0] not in g["ids"] for g in after["groups"])


def test_shared_graph_answers_503_fast_while_the_database_is_down(tmp_path, database_url, offline_embedder, paths):
    """The graph in PostgreSQL (pgvector with a DATABASE_URL): while the database refuses connections, the graph's
    routes answer 503 within about a second, like every other route that needs the database, then recover."""
    with _client(tmp_path, database_url, offline_embedder, neighbours_k=4) as c:
        _index(c, paths[:8])
        job = _build(c)
        assert c.get("/duplicates", params={"threshold": 0.5}).status_code == 200
        name = urlsplit(database_url).path.lstrip("/")
        admin = database_url.replace(f"/{name}?", "/postgres?")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            for path in ("/duplicates", f"/jobs/{job['id']}"):
                started = time.monotonic()
                r = c.get(path)
                assert r.status_code == 503 and "detail" in r.json(), r.text
                assert time.monotonic() - started < 5
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        deadline = time.monotonic() + 30
        for path in (f"/jobs/{job['id']}", "/duplicates"):  # /duplicates also waits for the service's breaker
            while c.get(path, params={"threshold": 0.5} if path == "/duplicates" else None).status_code != 200:
                assert time.monotonic() < deadline, f"{path} did not recover"
                time.sleep(0.2)


def test_jobs_api_key_and_unknown_job(tmp_path, database_url, offline_embedder, paths):
    with _client(tmp_path, database_url, offline_embedder, api_key=KEY) as c:
        _index(c, paths[:6], headers={"X-API-Key": KEY})
        assert c.post("/jobs/neighbours").status_code == 401
        assert c.post("/jobs/neighbours", headers={"X-API-Key": "wrong"}).status_code == 401
        job = _build(c, headers={"Authorization": f"Bearer {KEY}"})
        assert c.get(f"/jobs/{job['id']}").status_code == 200  # reads need no key
        assert job["progress"] == 1.0 and job["finished_at"] and job["kind"] == "neighbours"
        r = c.get("/jobs/999")
        assert r.status_code == 404 and "999" in r.json()["detail"]
        assert c.get("/jobs/abc").status_code == 422


def test_duplicate_groups_union_find():
    e = [Edge("a", "b", 0.99), Edge("b", "a", 0.99), Edge("b", "c", 0.95), Edge("d", "e", 0.97), Edge("c", "f", 0.5)]
    groups = duplicate_groups(e, 0.9)
    assert [(g.ids, g.min_score, g.max_score) for g in groups] == [
        (("a", "b", "c"), 0.95, 0.99),
        (("d", "e"), 0.97, 0.97),
    ]
    # b deleted: a and c are no longer joined through it.
    assert [g.ids for g in duplicate_groups(e, 0.9, alive={"a", "c", "d", "e", "f"})] == [("d", "e")]
    assert duplicate_groups(e, 0.999) == []


# --- DBA re-ranking by hand ---------------------------------------------------------------------------------------
def test_rerank_against_vectors_computed_by_hand():
    meta = ImageMetadata("x.jpg", "JPEG", 1, 1, 1, indexed_at=__import__("datetime").datetime(2026, 1, 1))
    x = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0.6, 0.8]], dtype=np.float32)
    ids = ["a", "b", "c", "d"]
    # DBA of each row by hand: n=1 neighbour, α=1 -> normalise(x + s * x_nn).
    by_hand = {}
    for i in range(4):
        s = x @ x[i]
        s[i] = -np.inf
        j = int(np.argmax(s))
        v = x[i] + s[j] * x[j]
        by_hand[ids[i]] = v / np.linalg.norm(v)
        got = dba_vector(x[i], x[[j]], np.array([s[j]]), 1, 1.0)
        np.testing.assert_allclose(got, by_hand[ids[i]], atol=1e-6)
    q = np.array([0.6, 0.8, 0], dtype=np.float32)
    hits = [SearchHit(i, float(x[n] @ q), meta) for n, i in enumerate(ids)]
    hits.sort(key=lambda h: -h.score)
    lookup = {i: by_hand[i] for i in ("a", "b", "c")}  # "d" indexed after the build: no DBA vector
    out = rerank(q, hits, lambda wanted: {i: lookup[i] for i in wanted if i in lookup})
    expected = sorted(
        [(i, float(by_hand[i] @ q) if i in lookup else float(x[ids.index(i)] @ q)) for i in ids], key=lambda t: -t[1]
    )
    assert [h.id for h in out] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in out], [s for _, s in expected], atol=1e-6)
    assert DbaRerank(lambda wanted: {}, 10).rerank(q, hits) == hits  # no DBA vectors: the order stands


# --- the command-line tool -------------------------------------------------------------------------------------
def test_find_duplicates_cli_builds_prints_and_writes_csv(tmp_path, database_url, offline_embedder, paths):
    settings = make_settings(tmp_path / "data", database_url, api_key=KEY)
    with run_live_server(create_app(settings, embedder=offline_embedder)) as api:
        picked = _files(["plasma_Kite", "gdk_bench_photo", "ocv_aero_viewpoint"])
        with TestClient(create_app(settings, embedder=offline_embedder)) as c:
            names = _index(c, picked, headers={"X-API-Key": KEY})
        no_graph = run_cli("find_duplicates.py", "--api", api, check_rc=1)
        assert "409" in no_graph.stderr and "--build" in no_graph.stderr
        refused = run_cli("find_duplicates.py", "--api", api, "--build", check_rc=1)
        assert "401" in refused.stderr

        out = run_cli("find_duplicates.py", "--api", api, "--build", "--api-key", KEY, check_rc=0)
        assert "completed" in out.stderr and "2 groups of near-duplicates" in out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split() == ["group", "size", "score", "id", "filename"]
        assert lines[1].split()[:2] == ["1", "3"]  # the largest group first: gdk_bench_photo's three files
        assert sum(name in out.stdout for name in names.values()) == 5

        target = tmp_path / "dups.csv"
        run_cli("find_duplicates.py", "--api", api, "--csv", target, check_rc=0)
        with target.open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["group"] for r in rows] == ["1", "1", "1", "2", "2"]
        assert {r["filename"] for r in rows} == {n for n in names.values() if not n.startswith("ocv_")}
        assert all(float(r["min_score"]) >= 0.92 for r in rows)

        as_json = run_cli("find_duplicates.py", "--api", api, "--json", "-", "--threshold", "0.999", check_rc=0)
        body = json.loads(as_json.stdout)
        assert body["threshold"] == 0.999 and body["total"] == len(body["groups"])


def test_the_graph_searches_with_its_own_beam_width(tmp_path, database_url, offline_embedder, datasets, monkeypatch):
    # NEIGHBOURS_EF_SEARCH reaches the backend's search (user searches keep HNSW_EF_SEARCH), and never below k + 1.
    from app.vectordb.pgvector import PgVectorHandler

    seen = []
    real_search = PgVectorHandler.search

    def spy(self, vector, top_k, filters=None, *, ef_search=None):
        seen.append(ef_search)
        return real_search(self, vector, top_k, filters, ef_search=ef_search)

    monkeypatch.setattr(PgVectorHandler, "search", spy)
    paths = sorted((datasets / "instance_small/images/ocv_aero_viewpoint").iterdir())[:6]
    with _client(tmp_path, database_url, offline_embedder, neighbours_k=4, neighbours_ef_search=3) as c:
        _index(c, paths)
        job_id = c.post("/jobs/neighbours").json()["id"]
        for _ in range(600):
            if c.get(f"/jobs/{job_id}").json()["state"] == "completed":
                break
            threading.Event().wait(0.1)
        assert c.get(f"/jobs/{job_id}").json()["state"] == "completed"
        graph_searches = [ef for ef in seen if ef is not None]
        assert graph_searches and set(graph_searches) == {5}  # max(NEIGHBOURS_EF_SEARCH, k + 1)
        seen.clear()
        c.get(f"/image/{image_id_for(paths[0].read_bytes())}/similar")
        assert seen == [None]  # a user search: the handler's HNSW_EF_SEARCH
