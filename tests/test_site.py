"""What a browser gets besides the API: / redirects, a favicon, and /docs and /redoc that need no internet."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_root_redirects_to_the_docs_without_ui_and_favicon_is_served(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/docs"
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def test_docs_and_redoc_load_their_assets_from_the_service(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "cdn.jsdelivr.net" not in html and "unpkg.com" not in html
        assets = [part.split('"')[0] for part in html.split('src="')[1:]] + [
            part.split('"')[0] for part in html.split('href="')[1:] if part.split('"')[0].endswith(".css")
        ]
        assert assets, page
        for url in assets:
            assert url.startswith("/"), url  # served by this service, not a CDN
            response = client.get(url)
            assert response.status_code == 200 and len(response.content) > 1000, url
