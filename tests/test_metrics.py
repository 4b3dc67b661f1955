"""GET /metrics (parsed with prometheus_client's own parser) and the per-route latency view of GET /stats, on the real
app with the real model and database."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.api.metrics import RecentLatencies
from app.main import create_app
from app.observe import timed_embed
from tests.helpers import make_settings

HOPPER = "instance_small/images/grace_hopper"


def _scrape(client: TestClient, **kwargs) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``GET /metrics`` as ``{(name, labels): value}``."""
    r = client.get("/metrics", **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.mark.slow
def test_metrics_count_requests_model_calls_cache_and_collection(client, datasets):
    paths = sorted((datasets / HOPPER).iterdir())[:4]
    for path in paths:
        assert client.post("/index_image", files={"file": (path.name, path.read_bytes())}).status_code == 201
    query = (datasets / "formats/tiff/hopper.tif").read_bytes()  # not indexed: decode + model, then the cache
    for _ in range(2):
        assert client.post("/search_image", files={"file": ("q.tif", query)}, params={"top_k": 3}).status_code == 200
    assert client.get("/no/such/page").status_code == 404
    assert client.get(f"/image/{'0' * 64}").status_code == 404
    assert client.post("/search_text", json={}).status_code == 422

    samples = _scrape(client)
    requests = "image_search_http_requests_total"
    assert _value(samples, requests, method="POST", route="/index_image", status="201") == 4
    assert _value(samples, requests, method="POST", route="/search_image", status="200") == 2
    assert _value(samples, requests, method="GET", route="/image/{image_id}", status="404") == 1
    assert _value(samples, requests, method="GET", route="unmatched", status="404") == 1
    assert _value(samples, requests, method="POST", route="/search_text", status="422") == 1
    latency = "image_search_http_request_duration_seconds"
    assert _value(samples, f"{latency}_count", method="POST", route="/search_image", status="200") == 2
    assert _value(samples, f"{latency}_sum", method="POST", route="/index_image", status="201") > 0
    assert _value(samples, f"{latency}_bucket", method="POST", route="/index_image", status="201", le="+Inf") == 4

    # Reported by the service through the app/observe.py hooks: 4 indexed images and one new query image were
    # decoded and embedded (the repeated query came from the cache), in however many batches the batcher made.
    assert _value(samples, "image_search_embed_batch_size_sum") == 5
    batches = _value(samples, "image_search_embed_batch_size_count")
    assert 1 <= batches <= 5 and _value(samples, "image_search_embed_seconds_count") == batches
    assert _value(samples, "image_search_embed_seconds_sum") > 0
    assert _value(samples, "image_search_query_cache_hits_total") == 1
    assert _value(samples, "image_search_query_cache_misses_total") == 1
    assert _value(samples, "image_search_query_cache_entries") == 1
    assert _value(samples, "image_search_collection_images") == 4
    assert _value(samples, "image_search_embed_queue_depth") == 0
    assert _value(samples, "image_search_decode_seconds_count") == 5

    # The same numbers per route in /stats, over the recent window.
    stats = client.get("/stats").json()
    assert stats["sla_p95_ms"] == 500.0
    search = stats["routes"]["POST /search_image"]
    assert search["count"] == 2 and search["window"] == 2
    assert 0 < search["p50_ms"] <= search["p95_ms"]
    assert isinstance(search["meets_sla"], bool)
    assert stats["routes"]["POST /index_image"]["count"] == 4
    assert not any(route.endswith("unmatched") for route in stats["routes"])


@pytest.mark.slow
def test_observer_hooks_feed_the_metrics(client, offline_embedder, datasets):
    from PIL import Image

    metrics = client.app.state.metrics
    metrics.observe_decode(0.02)
    metrics.count_database_error("write")
    # timed_embed around the real model, as the batcher will call it once wired.
    embed = timed_embed(offline_embedder.embed_images, metrics)
    with Image.open(sorted((datasets / HOPPER).iterdir())[0]) as im:
        images = [im.convert("RGB")] * 3
    assert embed(images).shape == (3, offline_embedder.dim)
    samples = _scrape(client)
    assert _value(samples, "image_search_decode_seconds_count") == 1
    assert _value(samples, "image_search_decode_seconds_sum") == pytest.approx(0.02)
    assert _value(samples, "image_search_embed_batch_size_sum") == 3
    assert _value(samples, "image_search_embed_seconds_count") == 1
    assert _value(samples, "image_search_embed_seconds_sum") > 0
    assert _value(samples, "image_search_database_errors_total", operation="write") == 1


@pytest.mark.slow
def test_each_app_has_its_own_registry(tmp_path, database_url, offline_embedder):
    apps = [create_app(make_settings(tmp_path / f"d{i}", database_url), embedder=offline_embedder) for i in range(2)]
    assert apps[0].state.metrics.registry is not apps[1].state.metrics.registry


@pytest.mark.slow
def test_database_errors_and_sla(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, db_connect_timeout_s=1, sla_p95_ms=0.001)
    path = sorted((datasets / HOPPER).iterdir())[0]
    name = urlsplit(database_url).path.lstrip("/")
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        assert client.post("/index_image", files={"file": (path.name, path.read_bytes())}).status_code == 201
        stats = client.get("/stats").json()
        assert stats["routes"]["POST /index_image"]["meets_sla"] is False  # nothing answers in 1 µs
        admin = database_url.replace(f"/{name}?", "/postgres?")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            r = client.post("/search_image", files={"file": ("q.jpg", path.read_bytes())})
            assert r.status_code == 503, r.text
            samples = _scrape(client)
            assert _value(samples, "image_search_database_errors_total", operation="request") == 1
            assert _value(samples, "image_search_database_errors_total", operation="count") == 1
            assert ("image_search_collection_images", frozenset()) not in samples
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


def test_recent_latencies_window_and_percentiles():
    recent = RecentLatencies(window=100)
    for ms in range(1, 201):  # 1..200 ms; the window keeps 101..200
        recent.add("GET /x", ms / 1000)
    summary = recent.summary(sla_p95_ms=195)["GET /x"]
    assert summary == {"count": 200, "window": 100, "p50_ms": 150.0, "p95_ms": 195.0, "meets_sla": True}
    assert recent.summary(sla_p95_ms=194.9)["GET /x"]["meets_sla"] is False


@pytest.mark.slow
def test_metrics_obey_api_key_reads(tmp_path, database_url, offline_embedder):
    settings = make_settings(tmp_path / "data", database_url, api_key="k-1", api_key_reads=True)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        assert client.get("/metrics").status_code == 401
        samples = _scrape(client, headers={"Authorization": "Bearer k-1"})
        assert _value(samples, "image_search_http_requests_total", method="GET", route="unmatched", status="401") == 1
