"""The smaller items of issue #20: private caching when reads need a key, job ids out of range, truthful status of
simultaneous identical uploads, JSON error bodies, repeated query parameters refused, and a ``/health`` that says
"unavailable" at once after the database died. The real app on a real database (a live server where concurrency
matters)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import make_settings, run_live_server

HOPPER = "instance_small/images/grace_hopper"
KEY = "edge-key-71aa"


def _image(datasets: Path, n: int = 0) -> tuple[str, bytes]:
    path = sorted((datasets / HOPPER).iterdir())[n]
    return path.name, path.read_bytes()


def _client(tmp_path, database_url, offline_embedder, **overrides) -> TestClient:
    return TestClient(
        create_app(make_settings(tmp_path / "data", database_url, **overrides), embedder=offline_embedder)
    )


def test_images_are_cached_privately_when_reads_need_a_key(tmp_path, database_url, offline_embedder, datasets):
    auth = {"X-API-Key": KEY}
    with _client(tmp_path, database_url, offline_embedder, api_key=KEY, api_key_reads=True) as client:
        image_id = client.post("/index_image", files={"file": _image(datasets)}, headers=auth).json()["id"]
        for path in (f"/image/{image_id}", f"/image/{image_id}/thumbnail?size=64"):
            r = client.get(path, headers=auth)
            assert r.status_code == 200
            assert r.headers["cache-control"].startswith("private") and "public" not in r.headers["cache-control"]
            assert {v.strip() for v in r.headers["vary"].split(",")} >= {"Authorization", "X-API-Key"}
    with _client(tmp_path, database_url, offline_embedder) as client:  # the same data, no key: public, as before
        r = client.get(f"/image/{image_id}")
        assert r.status_code == 200 and r.headers["cache-control"].startswith("public")
        assert "immutable" in r.headers["cache-control"] and "vary" not in r.headers


@pytest.mark.parametrize("job_id", ["0", "-1", str(2**63), str(2**64 + 5), "9" * 40])
def test_a_job_id_out_of_range_is_not_found(client, job_id):
    r = client.get(f"/jobs/{job_id}")
    assert r.status_code == 404, r.text
    assert r.json()["detail"].startswith("No job with id")


def test_repeated_single_valued_query_parameters_are_refused(client, datasets):
    for method, path, kwargs in (
        ("POST", "/search_image?top_k=3&top_k=50", {"files": {"file": _image(datasets)}}),
        ("POST", "/search_text?top_k=1&top_k=2", {"json": {"query": "a cat"}}),
        ("GET", "/duplicates?limit=1&limit=2", {}),
        ("GET", "/image/" + "a" * 64 + "/thumbnail?size=64&size=512", {}),
        ("POST", "/search_image?exclude_self=true&exclude_self=false", {"files": {"file": _image(datasets)}}),
    ):
        r = client.request(method, path, **kwargs)
        assert r.status_code == 422, (path, r.text)
        assert "given 2 times" in r.json()["detail"]
    assert client.get("/jobs/1?x=1&y=1").status_code == 404  # different names are fine (no such job: 404)


def test_middleware_refusals_are_json(tmp_path, database_url, offline_embedder):
    with _client(tmp_path, database_url, offline_embedder, cors_origins="https://ok.example") as client:
        preflight = {"Access-Control-Request-Method": "POST"}
        r = client.options("/search_text", headers={"Origin": "https://bad.example", **preflight})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json() == {"detail": "Disallowed CORS origin"}
        r = client.options("/search_text", headers={"Origin": "https://ok.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        r = client.get("/health", headers={"Host": "elsewhere.example"})
        assert r.status_code == 400 and "ALLOWED_HOSTS" in r.json()["detail"]


def test_simultaneous_identical_uploads_say_which_one_indexed(live_api, datasets):
    name, data = _image(datasets, 1)
    n = 16
    barrier = threading.Barrier(n)
    answers: list[tuple[int, str]] = []

    def upload() -> None:
        with httpx.Client(timeout=120) as http:
            barrier.wait()
            r = http.post(f"{live_api}/index_image", files={"file": (name, data)})
            answers.append((r.status_code, r.json().get("status", r.text)))

    threads = [threading.Thread(target=upload) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(answers) == [(200, "exists")] * (n - 1) + [(201, "indexed")]
    assert httpx.get(f"{live_api}/stats").json()["count"] == 1
    # The batch endpoint tells the same truth.
    r = httpx.post(f"{live_api}/index_images", files=[("files", (name, data))], timeout=60)
    assert [i["status"] for i in r.json()["results"]] == ["exists"]


@pytest.mark.slow
def test_health_is_unavailable_at_once_after_the_database_died(tmp_path, offline_embedder):
    from app.vectordb.watchdog import postmaster_pid

    settings = make_settings(tmp_path / "data", None)  # its own embedded server: killing it disturbs no other test
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url, httpx.Client(timeout=30) as http:
        assert http.get(f"{url}/health").status_code == 200
        os.kill(postmaster_pid(settings.data_dir / "pgdata"), signal.SIGKILL)
        start = time.monotonic()
        # No cached "ok": each /health is a probe made for it, so it turns as soon as the server's processes are
        # gone (the backends of a killed postmaster exit within milliseconds), not a probe interval later.
        while (r := http.get(f"{url}/health")).status_code == 200:
            assert time.monotonic() - start < 0.75, "/health still said ok 0.75 s after the database died"
        assert r.status_code == 503 and r.json()["database"] == "unavailable", r.text
        print(f"/health said unavailable {time.monotonic() - start:.2f} s after the kill")
        deadline = time.monotonic() + 20
        while http.get(f"{url}/health").status_code != 200:  # the watchdog restarts it
            assert time.monotonic() < deadline
            time.sleep(0.2)
