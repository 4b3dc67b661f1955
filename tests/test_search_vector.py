"""POST /search_vector (search by an embedding computed elsewhere) and EMBEDDER=none (serve without a model):
real photos, the real offline model, a real embedded PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.ids import image_id_for
from app.imaging.decode import decode_image
from app.main import create_app
from tests.helpers import CI_STALL_DEADLINES, make_settings

# Loads a model, a database or a server: left out of `make test-fast`.
pytestmark = pytest.mark.slow

HOPPER = "instance_small/images/grace_hopper/pillow_hopper.png"
QUERY = "formats/tiff/hopper.tif"  # another encoding of the Grace Hopper photo, never indexed


def _first(datasets: Path, folder: str) -> Path:
    return sorted(p for p in (datasets / folder).iterdir() if p.is_file())[0]


COFFEE_DIR = "instance_small/images/single_coffee"


@pytest.fixture
def indexed(client, datasets) -> dict[str, str]:
    """Index one Grace Hopper photo and one coffee photo; returns name -> image id."""
    ids = {}
    for name, path in (("hopper", datasets / HOPPER), ("coffee", _first(datasets, COFFEE_DIR))):
        r = client.post("/index_image", files={"file": (path.name, path.read_bytes())})
        assert r.status_code == 201, r.text
        ids[name] = image_id_for(path.read_bytes())
    return ids


def test_search_vector_finds_the_image_an_external_embedding_shows(client, datasets, indexed, offline_embedder):
    # The embedding is computed outside the service, as a client with its own copy of the model would.
    image = decode_image((datasets / QUERY).read_bytes(), max_pixels=100_000_000).image
    vector = offline_embedder.embed_images([image])[0]
    r = client.post("/search_vector", json={"vector": vector.tolist(), "top_k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [hit["id"] for hit in results] == [indexed["hopper"], indexed["coffee"]]
    assert results[0]["score"] > 0.9 > results[1]["score"]
    assert results[0]["image_url"].endswith(f"/image/{indexed['hopper']}")

    # Any scale works: the service normalises, and scores stay cosine similarities.
    scaled = client.post("/search_vector", json={"vector": (vector * 7.5).tolist(), "top_k": 2}).json()["results"]
    assert [h["id"] for h in scaled] == [h["id"] for h in results]
    np.testing.assert_allclose([h["score"] for h in scaled], [h["score"] for h in results], atol=1e-5)


def test_search_vector_default_top_k(client, indexed):
    r = client.post("/search_vector", json={"vector": [1.0] * 1280})
    assert r.status_code == 200 and len(r.json()["results"]) == 2  # DEFAULT_TOP_K is 5, only 2 are indexed


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"vector": [0.5, 0.5], "top_k": 3}', "1280 values"),  # wrong length
        ('{"vector": [], "top_k": 3}', "at least 1"),
        ('{"vector": [' + ", ".join(["0.0"] * 1280) + '], "top_k": 3}', "all zeros"),
        ('{"vector": [NaN' + ", 0.1" * 1279 + '], "top_k": 3}', "finite"),
        ('{"vector": [Infinity' + ", 0.1" * 1279 + '], "top_k": 3}', "finite"),
        ('{"vector": [1e39' + ", 0.1" * 1279 + '], "top_k": 3}', "float32"),  # finite in JSON, inf as float32
        ('{"vector": ["a"' + ", 0.1" * 1279 + '], "top_k": 3}', "number"),
        ('{"vector": [' + ", ".join(["0.1"] * 1280) + '], "top_k": 0}', "greater than or equal to 1"),
        ('{"vector": [' + ", ".join(["0.1"] * 1280) + '], "top_k": 101}', "MAX_TOP_K"),
        ('{"top_k": 3}', "vector"),
    ],
)
def test_search_vector_refuses_bad_vectors_with_422(client, indexed, body, fragment):
    r = client.post("/search_vector", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json()["detail"])


def test_embedder_none_serves_an_existing_collection_by_vector_only(client, settings, datasets, indexed):
    stored = client.app.state.service.db.get(indexed["coffee"]).vector
    # A second server on the same database, without any model.
    vector_only = settings.model_copy(update={"embedder": "none"})
    with TestClient(create_app(vector_only)) as c:
        stats = c.get("/stats").json()
        assert (stats["model"], stats["dimension"], stats["device"]) == ("efficientnet-lite2:imagenet", 1280, "none")
        r = c.post("/search_vector", json={"vector": stored.tolist(), "top_k": 1})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == indexed["coffee"]
        # Anything that needs the model is refused with a 400 that says why.
        new = datasets / QUERY
        r = c.post("/search_image", files={"file": ("q.tif", new.read_bytes())})
        assert r.status_code == 400 and "EMBEDDER=none" in r.json()["detail"]
        r = c.post("/index_image", files={"file": ("q.tif", new.read_bytes())})
        assert r.status_code == 400 and "EMBEDDER=none" in r.json()["detail"]
        assert c.get("/stats").json()["count"] == 2


def test_embedder_none_refuses_to_start_on_an_empty_database(tmp_path, database_url):
    settings = make_settings(tmp_path / "data", database_url, embedder="none", **CI_STALL_DEADLINES)
    with pytest.raises(RuntimeError, match="EMBEDDER=none"), TestClient(create_app(settings)):
        pass
