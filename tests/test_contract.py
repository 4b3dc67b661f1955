"""One API contract: search parameters in the query string or the body, small JSON error bodies that never echo the
input, a streaming upload limit (against a live uvicorn server), HEAD, nosniff, strict /search_vector."""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from app.ids import image_id_for
from app.main import create_app
from tests.helpers import make_settings, run_live_server

pytestmark = pytest.mark.slow

HOPPER = "instance_small/images/grace_hopper"
MAX_ERROR_BYTES = 4096


def _hopper(datasets: Path) -> list[Path]:
    return sorted(p for p in (datasets / HOPPER).iterdir() if p.is_file())


def _index_all(client: TestClient, paths: list[Path]) -> list[str]:
    ids = []
    for path in paths:
        r = client.post("/index_image", files={"file": (path.name, path.read_bytes())})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def _assert_small_error(r: httpx.Response, status: int, *, secret: str | None = None) -> dict:
    assert r.status_code == status, r.text[:500]
    assert len(r.content) <= MAX_ERROR_BYTES, len(r.content)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert set(body) <= {"detail", "errors"}
    if "errors" in body:
        assert 1 <= len(body["errors"]) <= 10 and all(isinstance(e, str) and len(e) <= 200 for e in body["errors"])
    if secret is not None:
        assert secret not in r.text
    return body


def test_top_k_in_query_string_or_form(client, datasets):
    paths = _hopper(datasets)[:8]
    _index_all(client, paths)
    query = paths[0].read_bytes()
    upload = {"file": ("q.jpg", query)}

    def search(params=None, data=None):
        return client.post("/search_image", files=upload, params=params, data=data)

    assert len(search().json()["results"]) == 5  # DEFAULT_TOP_K
    assert len(search(params={"top_k": 7}).json()["results"]) == 7
    assert len(search(data={"top_k": "6"}).json()["results"]) == 6
    assert len(search(params={"top_k": 3}, data={"top_k": "3"}).json()["results"]) == 3
    body = _assert_small_error(search(params={"top_k": 3}, data={"top_k": "4"}), 422)
    assert "top_k" in body["detail"]
    for bad in ("0", "101", "abc"):
        _assert_small_error(search(params={"top_k": bad}), 422)

    # The JSON search endpoints take it from the query string too.
    vector = client.app.state.service.db.get(image_id_for(query)).vector.tolist()
    r = client.post("/search_vector", params={"top_k": 2}, json={"vector": vector})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
    r = client.post("/search_vector", params={"top_k": 2}, json={"vector": vector, "top_k": 2})
    assert len(r.json()["results"]) == 2
    _assert_small_error(client.post("/search_vector", params={"top_k": 2}, json={"vector": vector, "top_k": 4}), 422)
    _assert_small_error(client.post("/search_text", params={"top_k": 2}, json={"query": "x", "top_k": 4}), 422)


def test_error_bodies_are_small_and_never_echo_the_input(client, datasets):
    # 40 MB of JSON numbers: refused for its length before its items are converted, with a short answer.
    huge = b'{"vector": [' + b",".join([b"0.1234567890123"] * 2_700_000) + b"]}"
    assert len(huge) > 40_000_000
    t0 = time.monotonic()
    r = client.post("/search_vector", content=huge, headers={"Content-Type": "application/json"})
    body = _assert_small_error(r, 422)
    assert "16000" in body["detail"], body
    assert time.monotonic() - t0 < 60

    marker = "ECHO-ME-" * 20_000  # 160 kB of a recognisable string
    for r in (
        client.post("/search_text", json={"query": marker}),
        client.post("/search_text", json={"query": "x", "top_k": marker}),
        client.post("/search_vector", json={"vector": [marker, 1.0]}),
        client.post("/search_vector", json={"vector": marker}),
        client.post("/images/exists", json={"ids": [marker[:1000]] * 1001}),
        client.post("/images/exists", json={marker: 1}),
        client.post(
            "/search_vector", content=b'{"vector": [' + marker.encode(), headers={"Content-Type": "application/json"}
        ),
        client.post("/search_image", files={"file": ("q.jpg", marker.encode())}, data={"top_k": marker}),
        client.post("/search_image", data={"top_k": marker}),
        client.get(f"/image/{'0' * 64}/thumbnail", params={"size": marker[:4000]}),
        client.post("/search_vector", params={"top_k": marker[:4000]}, json={"vector": [1.0]}),
    ):
        _assert_small_error(r, 422, secret="ECHO-ME-ECHO-ME")
    _assert_small_error(client.get("/image/" + "a" * 5000), 404, secret="a" * 200)
    _assert_small_error(client.delete("/image/" + "a" * 5000), 404, secret="a" * 200)
    _assert_small_error(client.get("/no/such/route"), 404)
    _assert_small_error(client.put("/index_image"), 405)


def test_search_vector_is_strict(client, datasets):
    path = _hopper(datasets)[0]
    _index_all(client, [path])
    dim = client.get("/stats").json()["dimension"]
    ones = [1.0] * dim
    assert client.post("/search_vector", json={"vector": ones}).status_code == 200
    assert client.post("/search_vector", json={"vector": [1] * dim}).status_code == 200  # JSON integers are numbers
    for vector in ([True] * dim, [1.0] * (dim - 1) + [False], ["1.0"] * dim, [None] * dim, [[1.0]] * dim):
        body = _assert_small_error(client.post("/search_vector", json={"vector": vector}), 422)
        assert body["detail"].startswith("Invalid request: body.vector")
    body = _assert_small_error(client.post("/search_vector", json={"vector": [1.0] * 16001}), 422)
    assert "16000" in body["detail"]
    assert client.post("/search_vector", json={"vector": ones, "top_k": True}).status_code == 422


def test_empty_filename_is_still_an_upload(client, datasets):
    path = _hopper(datasets)[0]
    data = path.read_bytes()
    # httpx leaves the filename parameter out for an empty name, as some other clients do.
    r = client.post("/index_image", files={"file": ("", data)})
    assert r.status_code == 201, r.text[:300]
    assert r.json()["id"] == image_id_for(data)
    r = client.post("/search_image", files={"file": ("", data)}, data={"exclude_self": "false"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == image_id_for(data)
    r = client.post("/index_images", files=[("files", ("", data))])
    assert r.status_code == 200 and r.json()["results"][0]["status"] == "exists"


def test_head_and_nosniff(client, datasets):
    path = _hopper(datasets)[0]
    (image_id,) = _index_all(client, [path])
    head = client.head(f"/image/{image_id}")
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == path.stat().st_size
    assert head.headers["content-type"].startswith("image/")
    assert client.head(f"/image/{'0' * 64}").status_code == 404
    for r in (
        head,
        client.get(f"/image/{image_id}"),
        client.get("/health"),
        client.get("/stats"),
        client.get("/docs"),
        client.get("/no-such-route"),
        client.post("/search_text", json={}),
    ):
        assert r.headers["x-content-type-options"] == "nosniff", r.url


def test_body_limit_by_content_length(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, max_upload_mb=1, max_batch_mb=3)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        big = b"\0" * 2_100_000
        body = _assert_small_error(client.post("/index_image", files={"file": ("a.jpg", big)}), 413)
        assert "MAX_UPLOAD_MB" in body["detail"]
        assert (
            client.post("/search_vector", content=big, headers={"Content-Type": "application/json"}).status_code == 413
        )
        # The batch route has its own, larger limit for all its files together.
        r = client.post("/index_images", files=[("files", ("a.jpg", big))])
        assert r.status_code == 200 and r.json()["results"][0]["code"] == 413
        body = _assert_small_error(client.post("/index_images", files=[("files", ("a.jpg", big * 2))]), 413)
        assert "MAX_BATCH_MB" in body["detail"]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one HTTP/1.1 response with a Content-Length."""
    sock.settimeout(30)
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = sock.recv(65536)
        assert data, raw
        raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def _chunked_upload_over_raw_socket(url: str, path: str, field: str, total: int) -> tuple[int, int, dict]:
    """Stream a multipart file part of ``total`` bytes in chunks (no Content-Length) until the server answers.

    Returns the body bytes sent, the status and the JSON body of the answer.
    """
    parts = urlsplit(url)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    ).encode()
    preamble = (
        f'--xyz\r\nContent-Disposition: form-data; name="{field}"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    frame = _chunk(b"\xff" * 65536)
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + _chunk(preamble))
        sock.setblocking(False)
        pending = memoryview(frame)
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            if writable:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += n
                pending = pending[n:] or memoryview(frame)
        status, body = _read_response(sock)
    return sent, status, body


def test_chunked_upload_over_the_limit_is_cut_off(tmp_path, database_url, offline_embedder):
    settings = make_settings(tmp_path / "data", database_url, max_upload_mb=1, max_batch_mb=2)
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        total = 300_000_000
        for path, field, limit_name in (
            ("/index_image", "file", "MAX_UPLOAD_MB"),
            ("/index_images", "files", "MAX_BATCH_MB"),
        ):
            sent, status, body = _chunked_upload_over_raw_socket(url, path, field, total)
            assert status == 413, body
            assert limit_name in body["detail"]
            assert sent < 50_000_000, sent  # cut off, not read to the end

        # The same with httpx streaming a generator (no Content-Length): the client sees the 413 or a closed
        # connection, long before the generator is exhausted.
        produced = 0

        def body():
            nonlocal produced
            yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
            while produced < total:
                produced += 65536
                yield b"\0" * 65536

        try:
            r = httpx.post(
                f"{url}/search_image",
                content=body(),
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
                timeout=60,
            )
            assert r.status_code == 413
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass
        assert produced < 50_000_000, produced
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # the server carries on


@pytest.mark.parametrize("field", ["top_k"])
def test_openapi_documents_both_places(client, field):
    spec = client.get("/openapi.json").json()
    params = spec["paths"]["/search_image"]["post"]["parameters"]
    assert any(p["name"] == field and p["in"] == "query" for p in params)
    form = spec["components"]["schemas"][
        spec["paths"]["/search_image"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split(
            "/"
        )[-1]
    ]
    assert field in form["properties"]
