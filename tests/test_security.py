"""API keys, the secure default on non-loopback hosts, CORS and what the web UI may serve without a key: the real
app on a real database. The UI's login and key box are driven in tests/test_ui.py and tests/test_browser.py."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api.security import is_loopback, presented_key
from app.main import create_app
from tests.helpers import make_settings

HOPPER = "instance_small/images/grace_hopper"
KEY_OLD = "old-key-5f1c2a"
KEY_NEW = "new-key-9b7e44"


def _image(datasets: Path, n: int = 0) -> tuple[str, bytes]:
    path = sorted((datasets / HOPPER).iterdir())[n]
    return path.name, path.read_bytes()


def _app_client(tmp_path, database_url, offline_embedder, **overrides) -> TestClient:
    settings = make_settings(tmp_path / "data", database_url, **overrides)
    return TestClient(create_app(settings, embedder=offline_embedder))


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("myhost.example", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_presented_key_header_forms():
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "abc"}) == "abc"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({"authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_api_key_reads_needs_a_key(tmp_path):
    with pytest.raises(ValidationError, match="API_KEY_READS"):
        make_settings(tmp_path, "postgresql://unused", api_key_reads=True)
    with pytest.raises(ValidationError, match="API_KEY_READS"):
        make_settings(tmp_path, "postgresql://unused", api_key_reads=True, api_key=" , ")


@pytest.mark.slow
def test_writes_need_a_key_and_both_rotated_keys_work(tmp_path, database_url, offline_embedder, datasets, caplog):
    caplog.set_level(logging.DEBUG)
    name, data = _image(datasets)
    with _app_client(tmp_path, database_url, offline_embedder, api_key=f"{KEY_OLD}, {KEY_NEW}") as client:
        # No key, a wrong key in each header form, a key of the wrong scheme: 401 and nothing stored.
        _assert_401(client.post("/index_image", files={"file": (name, data)}))
        _assert_401(client.post("/index_image", files={"file": (name, data)}, headers={"X-API-Key": "nope"}))
        _assert_401(client.post("/index_image", files={"file": (name, data)}, headers={"Authorization": "Bearer nope"}))
        _assert_401(
            client.post("/index_image", files={"file": (name, data)}, headers={"Authorization": f"Basic {KEY_OLD}"})
        )
        _assert_401(client.post("/index_images", files=[("files", (name, data))]))
        assert client.get("/stats").json()["count"] == 0

        # Either key, in either header form, writes.
        r = client.post("/index_image", files={"file": (name, data)}, headers={"Authorization": f"Bearer {KEY_OLD}"})
        assert r.status_code == 201, r.text
        image_id = r.json()["id"]
        r = client.post("/index_image", files={"file": (name, data)}, headers={"X-API-Key": KEY_NEW})
        assert r.status_code == 200 and r.json()["status"] == "exists"
        other_name, other = _image(datasets, 1)
        r = client.post("/index_images", files=[("files", (other_name, other))], headers={"X-API-Key": KEY_OLD})
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "indexed"

        # Reads stay open without API_KEY_READS.
        assert client.get("/stats").status_code == 200
        assert client.get(f"/image/{image_id}").status_code == 200
        assert client.post("/search_image", files={"file": (name, data)}).status_code == 200
        assert client.get("/docs").status_code == 200

        _assert_401(client.delete(f"/image/{image_id}"))
        _assert_401(client.delete(f"/image/{image_id}", headers={"X-API-Key": KEY_OLD + "x"}))
        r = client.delete(f"/image/{image_id}", headers={"Authorization": f"Bearer {KEY_NEW}"})
        assert r.status_code == 200 and r.json()["status"] == "deleted"

        spec = client.get("/openapi.json").json()
        assert "401" in spec["paths"]["/index_image"]["post"]["responses"]
        assert "401" in spec["paths"]["/image/{image_id}"]["delete"]["responses"]
    for key in (KEY_OLD, KEY_NEW):
        assert key not in caplog.text


@pytest.mark.slow
def test_api_key_reads_protects_everything_but_health(tmp_path, database_url, offline_embedder, datasets):
    name, data = _image(datasets)
    with _app_client(
        tmp_path, database_url, offline_embedder, api_key=KEY_NEW, api_key_reads=True, ui_enabled=True
    ) as client:
        assert client.get("/health").status_code == 200
        for method, path, kwargs in [
            ("GET", "/stats", {}),
            ("GET", "/metrics", {}),
            ("GET", "/docs", {}),
            ("GET", "/openapi.json", {}),
            ("GET", f"/image/{'0' * 64}", {}),
            ("HEAD", f"/image/{'0' * 64}", {}),
            ("GET", f"/image/{'0' * 64}/thumbnail", {}),
            ("POST", "/search_image", {"files": {"file": (name, data)}}),
            ("POST", "/preview", {"files": {"file": (name, data)}}),
            ("POST", "/search_vector", {"json": {"vector": [1.0]}}),
            ("POST", "/images/exists", {"json": {"ids": []}}),
            ("GET", "/no-such-route", {}),
        ]:
            r = client.request(method, path, **kwargs)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
        key = {"X-API-Key": KEY_NEW}
        assert client.get("/stats", headers=key).status_code == 200
        assert client.get("/openapi.json", headers=key).status_code == 200
        assert client.get(f"/image/{'0' * 64}", headers=key).status_code == 404
        assert client.post("/search_image", files={"file": (name, data)}, headers=key).status_code == 200
        _assert_401(client.get("/stats", headers={"X-API-Key": "wrong"}))
        # The Gradio UI sits behind its own login (the key is the password): its data routes refuse without it
        # (tests/test_ui.py checks each), while the page shell that shows the login form loads.
        assert client.get("/ui/").status_code == 200
        assert client.get("/ui/config").status_code == 401


@pytest.mark.slow
def test_non_loopback_host_without_key_refuses_writes(tmp_path, database_url, offline_embedder, datasets, caplog):
    name, data = _image(datasets)
    caplog.set_level(logging.WARNING, logger="app.api.security")
    with _app_client(tmp_path, database_url, offline_embedder, host="0.0.0.0") as client:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "app.api.security"]
        assert len(warnings) == 1 and "API_KEY" in warnings[0].getMessage()
        for r in (
            client.post("/index_image", files={"file": (name, data)}),
            client.post("/index_images", files=[("files", (name, data))]),
            client.delete(f"/image/{'0' * 64}"),
        ):
            assert r.status_code == 403, r.text
            assert "API_KEY" in r.json()["detail"] and "ALLOW_ANONYMOUS_WRITES" in r.json()["detail"]
        assert client.post("/search_image", files={"file": (name, data)}).status_code == 200
        assert client.get("/stats").json()["count"] == 0


@pytest.mark.slow
def test_allow_anonymous_writes_and_keys_on_non_loopback(tmp_path, database_url, offline_embedder, datasets, caplog):
    name, data = _image(datasets)
    caplog.set_level(logging.WARNING, logger="app.api.security")
    with _app_client(tmp_path, database_url, offline_embedder, host="0.0.0.0", allow_anonymous_writes=True) as c:
        assert c.post("/index_image", files={"file": (name, data)}).status_code == 201
    with _app_client(tmp_path, database_url, offline_embedder, host="0.0.0.0", api_key=KEY_NEW) as c:
        _assert_401(c.post("/index_image", files={"file": (name, data)}))
        assert c.post("/index_image", files={"file": (name, data)}, headers={"X-API-Key": KEY_NEW}).status_code == 200
    assert not [r for r in caplog.records if r.name == "app.api.security"]


@pytest.mark.slow
def test_cors_only_when_configured(tmp_path, database_url, offline_embedder):
    preflight = {
        "Origin": "https://photos.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    with _app_client(tmp_path, database_url, offline_embedder) as client:
        r = client.options("/search_vector", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = client.get("/health", headers={"Origin": "https://photos.example"})
        assert "access-control-allow-origin" not in r.headers
    with _app_client(
        tmp_path,
        database_url,
        offline_embedder,
        cors_origins="https://photos.example, https://other.example",
        api_key=KEY_NEW,
        api_key_reads=True,
    ) as client:
        r = client.options("/search_vector", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://photos.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        # A refused request still carries the CORS header, so the browser page can read the 401.
        r = client.get("/stats", headers={"Origin": "https://other.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://other.example"
        r = client.get("/stats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
