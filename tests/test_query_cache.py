"""The memory layer of the embedding cache (QUERY_CACHE_SIZE, CACHE_POLICY): unit behaviour of both policies, and
through /search_image + /stats on the real app with real images (memory only: no CACHE_REDIS_URL). The Redis layer
and the layers together: tests/test_cache.py."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.cache.memory import MemoryLayer
from app.main import create_app
from tests.helpers import CI_STALL_DEADLINES, make_settings

HOPPER = "formats/jpeg"  # indexed
QUERIES = ["formats/tiff/hopper.tif", "formats/webp/hopper_orientation_6.webp", "formats/gif/hopper.gif"]


def vec(x: float) -> np.ndarray:
    return np.full(4, x, dtype=np.float32)


# --- unit ------------------------------------------------------------------------------------------------------


def test_lru_eviction_and_counters():
    cache = MemoryLayer(2, "lru")
    assert cache.get("a") is None  # miss
    cache.put("a", vec(1))
    cache.put("b", vec(2))
    np.testing.assert_array_equal(cache.get("a"), vec(1))  # hit; "a" is now the most recent
    cache.put("c", vec(3))  # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    stats = cache.stats()
    assert (stats.size, stats.capacity, stats.hits, stats.misses, stats.hit_rate) == (2, 2, 1, 1, 0.5)


def test_lfu_keeps_the_frequent_entry_over_the_recent_one():
    cache = MemoryLayer(2, "lfu")
    cache.put("a", vec(1))
    cache.put("b", vec(2))
    for _ in range(3):
        assert cache.get("a") is not None  # "a" used 4 times in all, "b" once
    cache.put("c", vec(3))  # evicts "b", the least frequently used (LRU would evict "b" too: no difference yet)
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.get("c")  # "c" is now the most recent, "a" the most frequent
    cache.put("d", vec(4))  # LFU evicts "c" (2 uses) and keeps "a" (4 uses); LRU would have evicted "a"
    assert "a" in cache and "c" not in cache and "d" in cache
    with pytest.raises(ValueError):
        MemoryLayer(2, "fifo")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cached_vectors_are_read_only_copies(policy):
    cache = MemoryLayer(4, policy)
    original = vec(1)
    cache.put("a", original)
    original[:] = 9  # the caller's array changing later does not reach the cache
    got = cache.get("a")
    np.testing.assert_array_equal(got, vec(1))
    with pytest.raises(ValueError):
        got[0] = 5


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_zero_capacity_disables(policy):
    cache = MemoryLayer(0, policy)
    cache.put("a", vec(1))
    assert cache.get("a") is None and len(cache) == 0
    stats = cache.stats()
    assert (stats.size, stats.capacity, stats.hits, stats.misses, stats.hit_rate) == (0, 0, 0, 0, 0.0)
    with pytest.raises(ValueError):
        MemoryLayer(-1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_thread_safe_under_concurrent_use(policy):
    cache = MemoryLayer(8, policy)

    def work(t: int) -> None:
        for i in range(2000):
            key = str((t * 7 + i) % 16)
            if cache.get(key) is None:
                cache.put(key, vec(float(key)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert stats.size == 8 and stats.hits + stats.misses == 8000
    for key in [k for k in map(str, range(16)) if k in cache]:
        np.testing.assert_array_equal(cache.get(key), vec(float(key)))


# --- through the API -------------------------------------------------------------------------------------------


def _app_client(tmp_path: Path, database_url: str, embedder, **overrides) -> TestClient:
    settings = make_settings(tmp_path / "data", database_url, **{**CI_STALL_DEADLINES, **overrides})
    return TestClient(create_app(settings, embedder=embedder))


def _index_hopper(client: TestClient, datasets: Path) -> None:
    for path in sorted((datasets / HOPPER).iterdir())[:3]:
        r = client.post("/index_image", files={"file": (path.name, path.read_bytes())}, data={"filename": path.name})
        assert r.status_code == 201, r.text


def _search(client: TestClient, data: bytes) -> list[dict]:
    r = client.post("/search_image", files={"file": ("q", data)}, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    return r.json()["results"]


@pytest.mark.slow
def test_repeated_unindexed_search_is_a_cache_hit(tmp_path, database_url, offline_embedder, datasets):
    with _app_client(tmp_path, database_url, offline_embedder) as client:
        _index_hopper(client, datasets)
        data = (datasets / QUERIES[0]).read_bytes()
        first = _search(client, data)
        assert client.get("/stats").json()["query_cache"] == {
            "size": 1,
            "capacity": 1024,
            "hits": 0,
            "misses": 1,
            "hit_rate": 0.0,
        }
        second = _search(client, data)
        assert second == first  # same vector, same ranking and scores
        assert client.get("/stats").json()["query_cache"] == {
            "size": 1,
            "capacity": 1024,
            "hits": 1,
            "misses": 1,
            "hit_rate": 0.5,
        }
        # An indexed upload misses memory, then reuses its stored embedding (L3, no model call), which fills memory.
        indexed = sorted((datasets / HOPPER).iterdir())[0].read_bytes()
        r = client.post("/search_image", files={"file": ("q", indexed)}, data={"top_k": "3", "exclude_self": "false"})
        assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        cache = client.get("/stats").json()["cache"]
        assert cache["memory"]["misses"] == 2 and cache["memory"]["size"] == 2
        assert cache["store"] == {"hits": 1, "misses": 1, "hit_rate": 0.5} and cache["computed"] == 1
        assert cache["redis"] is None and cache["redis_state"] == "off"
        # A refused upload caches nothing.
        r = client.post("/search_image", files={"file": ("q", b"not an image")})
        assert r.status_code == 415
        assert client.get("/stats").json()["query_cache"]["size"] == 2


@pytest.mark.slow
def test_capacity_eviction_through_the_api(tmp_path, database_url, offline_embedder, datasets):
    with _app_client(tmp_path, database_url, offline_embedder, query_cache_size=2) as client:
        _index_hopper(client, datasets)
        payloads = [(datasets / q).read_bytes() for q in QUERIES]
        for data in payloads:  # three misses; the first query is evicted
            _search(client, data)
        _search(client, payloads[2])  # hit
        _search(client, payloads[0])  # miss again: it was evicted
        stats = client.get("/stats").json()["query_cache"]
        assert stats == {"size": 2, "capacity": 2, "hits": 1, "misses": 4, "hit_rate": 0.2}


@pytest.mark.slow
def test_query_cache_size_zero_disables(tmp_path, database_url, offline_embedder, datasets):
    with _app_client(tmp_path, database_url, offline_embedder, query_cache_size=0) as client:
        _index_hopper(client, datasets)
        data = (datasets / QUERIES[0]).read_bytes()
        assert _search(client, data) == _search(client, data)
        assert client.get("/stats").json()["query_cache"] == {
            "size": 0,
            "capacity": 0,
            "hits": 0,
            "misses": 0,
            "hit_rate": 0.0,
        }
