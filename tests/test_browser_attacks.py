"""A hostile web page against the default server (issue #20, item 2): DNS rebinding (a foreign ``Host``) and
cross-site form posts are refused, same-origin pages, configured origins, key-bearing and non-browser clients are
not; ``image_url`` never copies an unchecked ``Host``. The real app on a real database, requests shaped as a
browser sends them (``Origin``, ``Sec-Fetch-Site``), plus one through a real HTTP server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.security import allowed_hosts
from app.main import create_app
from tests.helpers import make_settings, run_live_server

HOPPER = "instance_small/images/grace_hopper"
EVIL = "http://evil.example"
KEY = "k-3c9d1e"


def _image(datasets: Path, n: int = 0) -> tuple[str, bytes]:
    path = sorted((datasets / HOPPER).iterdir())[n]
    return path.name, path.read_bytes()


def _client(tmp_path, database_url, offline_embedder, base_url="http://localhost:8000", **overrides) -> TestClient:
    overrides.setdefault("allowed_hosts", "")  # the production default, not the test helper's "testserver"
    settings = make_settings(tmp_path / "data", database_url, **overrides)
    return TestClient(create_app(settings, embedder=offline_embedder), base_url=base_url)


def _count(client: TestClient) -> int:
    return client.get("/stats").json()["count"]


@pytest.mark.parametrize(
    ("host", "allowed", "expected"),
    [
        ("127.0.0.1", "", ["localhost", "127.0.0.1", "[::1]"]),
        ("::1", "", ["localhost", "127.0.0.1", "[::1]"]),
        ("127.0.0.2", "", ["localhost", "127.0.0.1", "[::1]", "127.0.0.2"]),
        ("0.0.0.0", "", ["*"]),
        ("0.0.0.0", "Images.Example.com, *.example.org", ["images.example.com", "*.example.org"]),
    ],
)
def test_allowed_hosts_default_to_the_loopback_names(tmp_path, host, allowed, expected):
    settings = make_settings(tmp_path, None, host=host, allowed_hosts=allowed)
    assert allowed_hosts(settings) == expected


@pytest.mark.parametrize("base_url", ["http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"])
def test_the_loopback_names_are_served(tmp_path, database_url, offline_embedder, base_url):
    with _client(tmp_path, database_url, offline_embedder, base_url=base_url) as client:
        assert client.get("/health").status_code == 200


def test_a_foreign_host_is_refused_with_json_and_deletes_nothing(tmp_path, database_url, offline_embedder, datasets):
    with _client(tmp_path, database_url, offline_embedder) as client:
        r = client.post("/index_image", files={"file": _image(datasets)})
        assert r.status_code == 201, r.text
        image_id = r.json()["id"]
        # DNS rebinding: the attacker's name now points at 127.0.0.1, so the browser sends Host: evil.example:8000
        # and calls its own origin (no Origin check can tell): only the Host allow-list refuses it.
        for method, path in (("DELETE", f"/image/{image_id}"), ("GET", "/stats"), ("GET", f"/image/{image_id}")):
            r = client.request(method, path, headers={"Host": "evil.example:8000"})
            assert r.status_code == 400, (method, path, r.text)
            assert r.headers["content-type"].startswith("application/json") and "ALLOWED_HOSTS" in r.json()["detail"]
            assert r.headers["x-content-type-options"] == "nosniff"
        assert client.get(f"/image/{image_id}").status_code == 200 and _count(client) == 1


def test_a_cross_site_form_post_is_refused_and_stores_nothing(tmp_path, database_url, offline_embedder, datasets):
    with _client(tmp_path, database_url, offline_embedder) as client:
        # What a browser sends for <form method=post enctype=multipart/form-data action=http://localhost:8000/...>
        # on a page of another site: no preflight, Origin and Sec-Fetch-Site say where it comes from.
        for headers in (
            {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
            {"Origin": EVIL},  # a browser without Fetch Metadata
            {"Origin": "null", "Sec-Fetch-Site": "cross-site"},  # a sandboxed iframe, a file:// page
            {"Sec-Fetch-Site": "cross-site"},
            {"Origin": "http://localhost:9999", "Sec-Fetch-Site": "same-site"},  # another port is another origin
        ):
            for path in ("/index_image", "/index_images", "/search_image"):
                field = "files" if path == "/index_images" else "file"
                r = client.post(path, files={field: _image(datasets)}, headers=headers)
                assert r.status_code == 403, (headers, path, r.text)
                assert "CORS_ORIGINS" in r.json()["detail"]
        r = client.post("/jobs/neighbours", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        assert _count(client) == 0
        # Reads by GET stay open (a cross-site page cannot read the answer without CORS anyway).
        assert client.get("/stats", headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_same_origin_pages_and_non_browser_clients_may_write(tmp_path, database_url, offline_embedder, datasets):
    with _client(tmp_path, database_url, offline_embedder) as client:
        accepted = (
            {"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-origin"},  # the service's own page (/ui)
            {"Origin": "http://localhost:8000"},  # same origin, no Fetch Metadata
            {"Sec-Fetch-Site": "same-origin"},
            {},  # curl, scripts, the CLI: no Origin, no Sec-Fetch-Site
        )
        for n, headers in enumerate(accepted):
            r = client.post("/index_image", files={"file": _image(datasets, n)}, headers=headers)
            assert r.status_code == 201, (headers, r.text)
        assert _count(client) == len(accepted)


def test_configured_origins_and_key_headers_pass(tmp_path, database_url, offline_embedder, datasets):
    app_origin = "https://app.example.com"
    with _client(
        tmp_path, database_url, offline_embedder, cors_origins=app_origin, api_key=KEY, public_url="https://img.test/x/"
    ) as client:
        auth = {"X-API-Key": KEY}
        r = client.post("/index_image", files={"file": _image(datasets, 0)}, headers={"Origin": app_origin, **auth})
        assert r.status_code == 201, r.text
        # A key in a header is proof enough: a browser sends one cross-origin only after a CORS preflight.
        r = client.post("/index_image", files={"file": _image(datasets, 1)}, headers={"Origin": EVIL, **auth})
        assert r.status_code == 201, r.text
        # PUBLIC_URL's origin is the service's own; a configured CORS origin may search without a key.
        for origin in ("https://img.test", app_origin):
            r = client.post(
                "/search_image?exclude_self=false", files={"file": _image(datasets, 0)}, headers={"Origin": origin}
            )
            assert r.status_code == 200, (origin, r.text)
        # ... and image_url is built from PUBLIC_URL, path prefix included, whatever Host the request had.
        assert r.json()["results"][0]["image_url"] == f"https://img.test/x/image/{r.json()['results'][0]['id']}"
        r = client.post(
            "/search_image?exclude_self=false", files={"file": _image(datasets, 0)}, headers={"Origin": EVIL}
        )
        assert r.status_code == 403


def test_image_url_never_copies_an_unchecked_host(tmp_path, database_url, offline_embedder, datasets):
    # Bound to all interfaces with no ALLOWED_HOSTS: any Host is answered, so image_url is the path alone.
    with _client(tmp_path, database_url, offline_embedder, host="0.0.0.0", api_key=KEY) as client:
        r = client.post("/index_image", files={"file": _image(datasets)}, headers={"X-API-Key": KEY})
        assert r.status_code == 201, r.text
        r = client.post(
            "/search_image?exclude_self=false", files={"file": _image(datasets)}, headers={"Host": "evil.example"}
        )
        assert r.status_code == 200
        hit = r.json()["results"][0]
        assert hit["image_url"] == f"/image/{hit['id']}"
    # With the loopback allow-list, the (checked) Host of the request is used, as before.
    with _client(tmp_path, database_url, offline_embedder, base_url="http://127.0.0.1:8000") as client:
        hit = client.post("/search_image?exclude_self=false", files={"file": _image(datasets)}).json()["results"][0]
        assert hit["image_url"] == f"http://127.0.0.1:8000/image/{hit['id']}"


def test_a_real_server_refuses_a_foreign_host_and_a_cross_site_post(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, allowed_hosts="")
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url, httpx.Client(timeout=30) as http:
        port = url.rsplit(":", 1)[1]
        r = http.get(f"{url}/health", headers={"Host": f"rebound.evil.example:{port}"})
        assert r.status_code == 400 and r.json()["detail"]
        form = {"file": _image(datasets)}
        r = http.post(f"{url}/index_image", files=form, headers={"Origin": EVIL, "Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403, r.text
        r = http.post(f"{url}/index_image", files=form, headers={"Origin": url, "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 201, r.text
        # A page of http://localhost:PORT (this server by another name): same origin when the Host says so too ...
        own = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
        r = http.post(f"{url}/index_image", files={"file": _image(datasets, 1)}, headers=own)
        assert r.status_code == 201, r.text
        # ... while to a browser http://localhost:PORT and http://127.0.0.1:PORT are two origins.
        r = http.post(f"{url}/index_image", files={"file": _image(datasets, 2)}, headers={"Origin": own["Origin"]})
        assert r.status_code == 403, r.text


def test_a_cross_site_referer_without_origin_is_refused_on_rest_and_gradio_routes(
    tmp_path, database_url, offline_embedder, datasets
):
    """Issue #27 item 4: with no Origin, the Referer's origin is checked in its place (OWASP, "Verifying origin with
    standard headers"), on the REST routes (index, delete) and Gradio's alike; through a real HTTP server."""
    settings = make_settings(tmp_path / "data", database_url, allowed_hosts="", ui_enabled=True)
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url, httpx.Client(timeout=30) as http:
        r = http.post(f"{url}/index_image", files={"file": _image(datasets, 0)})  # curl: no Origin, no Referer
        assert r.status_code == 201, r.text
        image_id = r.json()["id"]
        for referer in (f"{EVIL}/page.html", "http://localhost:1/x", "about:blank", "not a url"):
            for method, path, form in (
                ("POST", "/index_image", {"file": _image(datasets, 1)}),
                ("DELETE", f"/image/{image_id}", None),
                ("POST", "/ui/gradio_api/upload", {"files": _image(datasets, 1)}),
            ):
                r = http.request(method, f"{url}{path}", files=form, headers={"Referer": referer})
                assert r.status_code == 403, (referer, path, r.text)
                assert r.headers["content-type"].startswith("application/json")
                detail = r.json()["detail"]
                assert "Cross-origin request refused" in detail and "referring page" in detail, detail
        assert http.get(f"{url}/stats").json()["count"] == 1
        # The service's own pages (a Referer of its own origin, path and query included) and an Origin, which
        # wins over the Referer, still pass; so does a configured origin's page (below).
        r = http.post(f"{url}/index_image", files={"file": _image(datasets, 1)}, headers={"Referer": f"{url}/ui/?x=1"})
        assert r.status_code == 201, r.text
        r = http.post(f"{url}/ui/gradio_api/upload", files={"files": _image(datasets, 2)}, headers={"Referer": url})
        assert r.status_code == 200, r.text
        r = http.post(
            f"{url}/index_image", files={"file": _image(datasets, 2)}, headers={"Origin": url, "Referer": EVIL}
        )
        assert r.status_code == 201, r.text
        r = http.delete(f"{url}/image/{image_id}", headers={"Referer": f"{url}/ui/"})
        assert r.status_code == 200, r.text
        assert http.get(f"{url}/stats").json()["count"] == 2


def test_a_referer_of_a_configured_origin_passes(tmp_path, database_url, offline_embedder, datasets):
    app_origin = "https://app.example.com"
    with _client(tmp_path, database_url, offline_embedder, cors_origins=app_origin) as client:
        r = client.post("/index_image", files={"file": _image(datasets)}, headers={"Referer": f"{app_origin}/a/b"})
        assert r.status_code == 201, r.text
        r = client.post("/index_image", files={"file": _image(datasets, 1)}, headers={"Referer": f"{EVIL}/"})
        assert r.status_code == 403 and "'http://evil.example'" in r.json()["detail"]


@pytest.mark.slow
def test_a_page_of_another_origin_in_a_real_browser(tmp_path, database_url, offline_embedder, datasets):
    """Chromium loads a page from another origin (another port of 127.0.0.1: same site, other origin) that posts a
    form and a no-cors fetch carrying an image to the service: both refused, nothing stored; the same fetch from the
    service's own page is accepted."""
    import base64
    import http.server
    import os
    import shutil
    import threading

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not (shutil.which(chromium) or Path(chromium).is_file()):
        pytest.skip(f"Chromium is not installed at {chromium}")
    from playwright.sync_api import sync_playwright

    from tests.helpers import free_port

    name, data = _image(datasets)
    b64 = base64.b64encode(data).decode()
    settings = make_settings(tmp_path / "data", database_url, allowed_hosts="")
    post_js = """async ([url, b64, name, mode]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const form = new FormData();
        form.append("file", new Blob([bytes], {type: "image/jpeg"}), name);
        const r = await fetch(url + "/index_image", {method: "POST", body: form, mode: mode});
        return r.type === "opaque" ? "opaque" : r.status;
    }"""
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        evil_page = (
            f'<form id="f" method="post" enctype="multipart/form-data" action="{url}/index_image">'
            '<input name="note" value="x"></form>'
        ).encode()

        class Evil(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(evil_page)

            def log_message(self, *args):
                pass

        evil = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Evil)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        evil_url = f"http://127.0.0.1:{evil.server_address[1]}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
                try:
                    page = browser.new_page()
                    page.goto(evil_url + "/")
                    assert (
                        page.evaluate(post_js, [url, b64, name, "no-cors"]) == "opaque"
                    )  # the page cannot read the answer ...
                    with page.expect_navigation():
                        page.evaluate("document.getElementById('f').submit()")
                    body = page.inner_text("body")  # ... but the form's answer is shown as the new page
                    assert "Cross-origin request refused" in body, body
                    assert httpx.get(f"{url}/stats").json()["count"] == 0  # ... and nothing was stored
                    page.goto(url + "/health")  # the service's own origin
                    assert page.evaluate(post_js, [url, b64, name, "same-origin"]) == 201
                    assert httpx.get(f"{url}/stats").json()["count"] == 1
                finally:
                    browser.close()
        finally:
            evil.shutdown()
            evil.server_close()
