"""Search features of issue #9 over the backend contract: more like this, rank and metadata, paging and thresholds,
leaving the query image out, combined and negative queries, query expansion (αQE), and the CLI flags for them.

Real photos, the real offline model, a real embedded PostgreSQL; expected rankings are computed by hand with numpy
from the stored vectors (12 images: the HNSW search is exact at this size).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.errors import InvalidParameterError, InvalidVectorError
from app.ids import image_id_for
from app.main import create_app
from app.search.expansion import alpha_qe
from app.search.paging import MAX_SEARCH_WINDOW
from app.search.query import combine
from tests.helpers import CI_STALL_DEADLINES, make_settings
from tests.test_cli import run_cli

FOLDERS = [
    "instance_small/images/ocv_aero_viewpoint",
    "instance_small/images/ocv_graffiti_viewpoint",
    "instance_small/images/plasma_Kite",
    "instance_small/images/plasma_Autumn",
    "instance_small/images/ocv_leuven_light",
    "instance_small/images/exif_portrait",
]
EXPAND_N, EXPAND_ALPHA = 2, 3.0


@pytest.fixture
def collection(tmp_path, database_url, offline_embedder, datasets):
    """A client (EXPAND_N=2, EXPAND_ALPHA=3) on 12 indexed photos, two of each of 6 scenes; yields
    ``(client, {filename: id}, {id: stored (D,) float32 vector}, {filename: path})``."""
    settings = make_settings(
        tmp_path / "data", database_url, expand_n=EXPAND_N, expand_alpha=EXPAND_ALPHA, **CI_STALL_DEADLINES
    )
    paths = {p.name: p for folder in FOLDERS for p in sorted((datasets / folder).iterdir())[:2]}
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        for name, path in paths.items():
            r = client.post("/index_image", files={"file": (name, path.read_bytes())})
            assert r.status_code == 201, r.text
        ids = {name: image_id_for(path.read_bytes()) for name, path in paths.items()}
        db = client.app.state.service.db
        vectors = {i: db.get(i).vector for i in ids.values()}
        yield client, ids, vectors, paths


def exact_ranking(query: np.ndarray, vectors: dict[str, np.ndarray], leave_out=()) -> list[tuple[str, float]]:
    """``(id, cosine)`` of every stored vector but ``leave_out``, best first: the expected answer, by hand."""
    q = query / np.linalg.norm(query)
    scored = [(i, float(v @ q)) for i, v in vectors.items() if i not in leave_out]
    return sorted(scored, key=lambda t: -t[1])


def assert_same_ranking(results: list[dict], expected: list[tuple[str, float]], start_rank: int = 1) -> None:
    assert [r["id"] for r in results] == [i for i, _ in expected]
    np.testing.assert_allclose([r["score"] for r in results], [s for _, s in expected], atol=2e-5)
    assert [r["rank"] for r in results] == list(range(start_rank, start_rank + len(results)))


# --- more like this, rank and metadata --------------------------------------------------------------------------
@pytest.mark.slow
def test_similar_leaves_the_image_out_and_carries_the_metadata(collection):
    client, ids, vectors, paths = collection
    me = ids["aero1.jpg"]
    r = client.get(f"/image/{me}/similar", params={"top_k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert_same_ranking(results, exact_ranking(vectors[me], vectors, leave_out={me})[:5])
    assert results[0]["filename"] == "aero3.jpg"  # the other view of the same aeroplane
    # exclude_self=false cannot bring it back: "more like this" never answers the image itself.
    again = client.get(f"/image/{me}/similar", params={"top_k": 5, "exclude_self": "false"}).json()["results"]
    assert [h["id"] for h in again] == [h["id"] for h in results]

    stored = client.app.state.service.db.get(results[0]["id"]).metadata
    first = results[0]
    assert (first["format"], first["width"], first["height"], first["bytes"]) == (
        stored.format,
        stored.width,
        stored.height,
        stored.bytes,
    )
    assert first["bytes"] == paths["aero3.jpg"].stat().st_size and first["format"] == "JPEG"
    assert first["indexed_at"].startswith(stored.indexed_at.strftime("%Y-%m-%dT%H:%M:%S"))
    assert first["image_url"].endswith(f"/image/{first['id']}")


@pytest.mark.slow
def test_similar_unknown_id_is_404(collection):
    client, *_ = collection
    for unknown in ("0" * 64, "not-an-id"):
        r = client.get(f"/image/{unknown}/similar")
        assert r.status_code == 404 and "detail" in r.json()


# --- paging, thresholds, the query image left out ---------------------------------------------------------------
@pytest.mark.slow
def test_pages_continue_the_ranking_and_min_score_cuts_it(collection):
    client, ids, vectors, _ = collection
    me = ids["graf1.png"]
    expected = exact_ranking(vectors[me], vectors, leave_out={me})  # 11 others
    pages = [
        client.get(f"/image/{me}/similar", params={"top_k": 4, "offset": offset}).json()["results"]
        for offset in (0, 4, 8)
    ]
    assert [len(p) for p in pages] == [4, 4, 3]  # the last page ends with the collection
    for page, offset in zip(pages, (0, 4, 8), strict=True):
        assert_same_ranking(page, expected[offset : offset + 4], start_rank=offset + 1)

    threshold = (expected[2][1] + expected[3][1]) / 2  # between the 3rd and the 4th score
    r = client.get(f"/image/{me}/similar", params={"top_k": 10, "min_score": threshold}).json()["results"]
    assert_same_ranking(r, expected[:3])
    # The threshold applies within the page: ranks stay the positions in the whole ranking.
    r = client.get(f"/image/{me}/similar", params={"top_k": 10, "offset": 1, "min_score": threshold}).json()
    assert_same_ranking(r["results"], expected[1:3], start_rank=2)

    # The JSON body carries the same options; given twice with different values they are refused.
    body = {"vector": vectors[me].tolist(), "top_k": 4, "offset": 4}
    r = client.post("/search_vector", json=body)
    assert_same_ranking(r.json()["results"], exact_ranking(vectors[me], vectors)[4:8], start_rank=5)
    assert client.post("/search_vector", json=body, params={"offset": 4}).status_code == 200
    r = client.post("/search_vector", json=body, params={"offset": 5})
    assert r.status_code == 422 and "offset is given twice" in r.json()["detail"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"offset": -1}, None),
        ({"offset": 1001}, None),
        ({"min_score": 1.5}, None),
        ({"offset": 1000, "top_k": 5}, f"at most {MAX_SEARCH_WINDOW - 1}"),  # the image itself takes one place
    ],
)
def test_out_of_range_options_are_422(collection, params, message):
    client, ids, *_ = collection
    r = client.get(f"/image/{ids['aero1.jpg']}/similar", params=params)
    assert r.status_code == 422, r.text
    if message:
        assert message in str(r.json()["detail"])


@pytest.mark.slow
def test_search_image_leaves_out_its_own_indexed_bytes(collection):
    client, ids, vectors, paths = collection
    data = paths["Kite_2560x1600.jpg"].read_bytes()
    me = ids["Kite_2560x1600.jpg"]

    def search(**form):
        r = client.post("/search_image", files={"file": ("q.jpg", data)}, data={"top_k": "3", **form})
        assert r.status_code == 200, r.text
        return r.json()["results"]

    assert_same_ranking(search(), exact_ranking(vectors[me], vectors, leave_out={me})[:3])
    with_self = search(exclude_self="false")
    assert with_self[0]["id"] == me and with_self[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert_same_ranking(with_self, exact_ranking(vectors[me], vectors)[:3])
    # Form field and query parameter alike; offset works on uploads too.
    r = client.post("/search_image?offset=1", files={"file": ("q.jpg", data)}, data={"top_k": "2"}).json()
    assert_same_ranking(r["results"], exact_ranking(vectors[me], vectors, leave_out={me})[1:3], start_rank=2)
    r = client.post("/search_image?offset=1", files={"file": ("q.jpg", data)}, data={"offset": "2"})
    assert r.status_code == 422


# --- combined and negative queries ------------------------------------------------------------------------------
@pytest.mark.slow
def test_combined_query_is_the_weighted_sum_computed_by_hand(collection):
    client, ids, vectors, _ = collection
    a, b, c, d = (ids[n] for n in ("aero1.jpg", "graf1.png", "Kite_2560x1600.jpg", "Portrait_1.jpg"))
    external = (vectors[c] * 5.0).tolist()  # a vector term, at any scale
    body = {
        "positive": [{"image_id": a, "weight": 2}, {"image_id": b}, {"vector": external, "weight": 0.5}],
        "negative": [{"image_id": d, "weight": 0.7}],
        "top_k": 6,
    }
    by_hand = 2 * vectors[a] + 1 * vectors[b] + 0.5 * vectors[c] - 0.7 * vectors[d]
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    # The positive images are the query images: left out by default.
    assert_same_ranking(r.json()["results"], exact_ranking(by_hand, vectors, leave_out={a, b})[:6])
    r = client.post("/search", json={**body, "exclude_self": False, "offset": 1, "top_k": 3})
    assert_same_ranking(r.json()["results"], exact_ranking(by_hand, vectors)[1:4], start_rank=2)

    # A negative term pushes its image (and what looks like it) to the end.
    only_neg = {"positive": [{"image_id": a}], "negative": [{"image_id": d, "weight": 3}], "top_k": 11}
    last = client.post("/search", json=only_neg).json()["results"][-1]
    assert last["id"] == d and last["score"] < 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"positive": [{"text": "a red bicycle"}]}, 400, "text encoder"),
        ({"positive": [{"image_id": "0" * 64}]}, 404, "No image"),
        ({"positive": []}, 422, None),
        ({"positive": [{"image_id": "ID", "weight": 0}]}, 422, None),
        ({"positive": [{"image_id": "ID", "weight": -1}]}, 422, None),
        ({"positive": [{"image_id": "ID", "text": "both"}]}, 422, "exactly one"),
        ({"positive": [{"weight": 1}]}, 422, "exactly one"),
        ({"positive": [{"image_id": "ID"}], "negative": [{"image_id": "ID"}]}, 422, "cancel"),
        ({"positive": [{"vector": [0.0] * 1280}]}, 422, "zeros"),
        ({"positive": [{"vector": [1.0] * 3}]}, 422, "1280 values"),
    ],
)
def test_combined_query_errors(collection, body, status, message):
    client, ids, *_ = collection
    text = json.dumps(body).replace('"ID"', json.dumps(ids["aero1.jpg"]))
    r = client.post("/search", content=text, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    if message:
        assert message in str(r.json()["detail"])


def test_combine_and_alpha_qe_by_hand():
    e1, e2, e3 = np.eye(3, dtype=np.float32)
    # 2*e1 + e2 - 0.5*e3, normalised by its length sqrt(4 + 1 + 0.25).
    np.testing.assert_allclose(combine([(e1, 2), (e2, 1)], [(e3, 0.5)]), np.array([2, 1, -0.5]) / np.sqrt(5.25))
    with pytest.raises(InvalidVectorError):
        combine([(e1, 1)], [(e1, 1)])
    with pytest.raises(InvalidParameterError):
        combine([(e1, float("nan"))])
    with pytest.raises(InvalidParameterError):
        combine([])
    # αQE: q + 0.5^3 x1 + 0.25^3 x2; a negative similarity weighs nothing.
    q = e1
    x = np.stack([e2, e3, -e1])
    got = alpha_qe(q, x, np.array([0.5, 0.25, -0.9]), alpha=3)
    want = np.array([1, 0.125, 0.015625]) / np.linalg.norm([1, 0.125, 0.015625])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(alpha_qe(q, x[:0], np.array([]), alpha=3), q)


# --- query expansion --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_expand_is_alpha_qe_computed_by_hand(collection):
    client, ids, vectors, paths = collection
    me = ids["leuvenA.jpg"]
    q = vectors[me]
    neighbours = exact_ranking(q, vectors, leave_out={me})[:EXPAND_N]  # the image is not its own neighbour
    by_hand = q + sum(score**EXPAND_ALPHA * vectors[i] for i, score in neighbours)
    expected = exact_ranking(by_hand, vectors, leave_out={me})

    r = client.get(f"/image/{me}/similar", params={"top_k": 5, "expand": "true"})
    assert r.status_code == 200, r.text
    assert_same_ranking(r.json()["results"], expected[:5])
    # The same through an upload of its bytes. Through the query vector there is no query image: the stored image
    # itself is then its first neighbour and a result like any other.
    up = client.post("/search_image", files={"file": ("q", paths["leuvenA.jpg"].read_bytes())}, data={"expand": "true"})
    assert_same_ranking(up.json()["results"], expected[:5])
    vec = client.post("/search_vector", json={"vector": q.tolist(), "expand": True, "top_k": 3}).json()["results"]
    by_vector = q + sum(score**EXPAND_ALPHA * vectors[i] for i, score in exact_ranking(q, vectors)[:EXPAND_N])
    assert_same_ranking(vec, exact_ranking(by_vector, vectors)[:3])


# --- the CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_find_similar_by_id_text_and_options(live_api, datasets):
    import httpx

    paths = [p for folder in FOLDERS[:3] for p in sorted((datasets / folder).iterdir())[:2]]
    for p in paths:
        httpx.post(f"{live_api}/index_image", files={"file": (p.name, p.read_bytes())}, timeout=120).raise_for_status()
    me = image_id_for(paths[0].read_bytes())
    api = ("--api", live_api)

    by_id = json.loads(run_cli("find_similar.py", "--id", me, "--top-k", "5", "--json", *api, check_rc=0).stdout)
    assert len(by_id["results"]) == 5 and me not in {h["id"] for h in by_id["results"]}
    page = run_cli("find_similar.py", "--id", me, "--top-k", "2", "--offset", "2", "--json", *api, check_rc=0)
    assert json.loads(page.stdout)["results"] == by_id["results"][2:4]
    # The table shows the server's ranks, so a page continues the numbering.
    table = run_cli("find_similar.py", "--id", me, "--top-k", "2", "--offset", "2", *api, check_rc=0).stdout
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["3", "4"]
    cut = by_id["results"][1]["score"] - 1e-5  # scores are shown rounded to 6 decimals
    high = run_cli("find_similar.py", "--id", me, "--min-score", str(cut), "--json", *api, check_rc=0)
    assert [h["id"] for h in json.loads(high.stdout)["results"]] == [h["id"] for h in by_id["results"][:2]]
    expanded = run_cli("find_similar.py", paths[0], "--expand", "--json", *api, check_rc=0)
    assert me not in {h["id"] for h in json.loads(expanded.stdout)["results"]}

    # Text needs a CLIP model: the server's 400 is reported, exit status 1; a negative text goes to POST /search.
    proc = run_cli("find_similar.py", "--text", "an aeroplane", *api, check_rc=1)
    assert proc.stderr.startswith("error: 400 ") and "text encoder" in proc.stderr
    proc = run_cli("find_similar.py", "--id", me, "--negative-text", "clouds", *api, check_rc=1)
    assert proc.stderr.startswith("error: 400 ")
    # Two images (a file and an id) combine; the file counts by its id, so it must be indexed.
    both = run_cli("find_similar.py", paths[2], "--id", me, "--json", *api, check_rc=0)
    assert {me, image_id_for(paths[2].read_bytes())}.isdisjoint(h["id"] for h in json.loads(both.stdout)["results"])
    run_cli("find_similar.py", *api, check_rc=2)  # no query at all: a usage error


def test_find_similar_builds_the_request_for_each_mode(tmp_path):
    from app.cli.find_similar import build_request, parse_args

    image = tmp_path / "q.jpg"
    image.write_bytes(b"x")

    def req(*argv, data=None):
        return build_request(parse_args([*map(str, argv)]), data)

    r = req(image, "--top-k", "3", "--offset", "6", "--min-score", "0.5", "--expand", data=b"x")
    assert (r["method"], r["url"], r["data"]) == ("POST", "/search_image", {"top_k": "3"})
    assert r["params"] == {"offset": "6", "min_score": "0.5", "expand": "true"}
    assert req("--id", "ab", "--top-k", "2")["url"] == "/image/ab/similar"
    assert req("--text", "cat")["json"] == {"query": "cat", "top_k": None}
    r = req(image, "--text", "cat", "--negative-text", "dog", data=b"x")
    assert r["url"] == "/search" and r["json"]["negative"] == [{"text": "dog"}]
    assert r["json"]["positive"] == [{"image_id": image_id_for(b"x")}, {"text": "cat"}]
