"""The front door and the documentation site: the README fits on a page and its links lead somewhere; the MkDocs
site builds in strict mode (a broken link or anchor, or a page missing from the navigation, fails it) and shows
offline, fetching nothing from outside at view time (issue #25).

The static checks read the built HTML and CSS; the browser check serves the site from a loopback web server (as
``make docs-serve`` or any static server would) and opens every page in Debian's Chromium with every other request
blocked and counted.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import system_binary_or_skip

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250  # issue #25: the README is a one-page front door; the rest lives in docs/
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Tags whose attribute the browser fetches by itself when the page loads (an <a href> is only followed on a click).
FETCHED = {"link": "href", "script": "src", "img": "src", "source": "src", "iframe": "src", "audio": "src"}
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by the same command as ``make docs`` (strict), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


class _Fetches(HTMLParser):
    """Collects the URLs a page fetches when it loads (see FETCHED)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = FETCHED.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves the built site without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's signature
        pass


def _is_outside(url: str) -> bool:
    return url.startswith(("http://", "https://", "//"))


def test_readme_fits_on_a_page_and_its_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/ (at most 250)"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if _is_outside(target) or target.startswith("mailto:"):
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_every_docs_page_is_in_the_navigation_and_every_link_resolves(site: Path) -> None:
    # The strict build (the fixture) already failed on a missing page or anchor; this checks it produced the pages.
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix(".html") for p in (ROOT / "docs").rglob("*.md"))
    missing = [str(p) for p in pages if not (site / p).is_file()]
    assert not missing, f"pages not built: {missing}"


def test_the_site_loads_nothing_from_outside(site: Path) -> None:
    outside: list[str] = []
    for html in site.rglob("*.html"):
        parser = _Fetches()
        parser.feed(html.read_text(encoding="utf-8"))
        outside += [f"{html.relative_to(site)}: {u}" for u in parser.urls if _is_outside(u)]
    for css in site.rglob("*.css"):
        for match in CSS_URL.finditer(css.read_text(encoding="utf-8")):
            url = match.group(1) or match.group(2)
            if _is_outside(url):
                outside.append(f"{css.relative_to(site)}: {url}")
    assert not outside, f"the site fetches from outside: {outside[:10]}"
    # Material fetches Google Fonts unless `theme.font: false` (mkdocs.yml): no page may name them.
    assert not any("fonts.googleapis.com" in p.read_text(encoding="utf-8") for p in site.rglob("*.html"))


@pytest.mark.slow
def test_every_page_shows_in_a_browser_with_the_network_blocked(site: Path) -> None:
    """Chromium opens each page from a loopback web server; any request elsewhere is aborted and counted."""
    path = system_binary_or_skip(CHROMIUM, "chromium", "CHROMIUM")
    from playwright.sync_api import sync_playwright

    asked: list[str] = []
    errors: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    base = f"http://127.0.0.1:{server.server_port}/"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()

            def route(r):
                if r.request.url.startswith((base, "data:", "blob:")):
                    r.continue_()
                else:
                    asked.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("pageerror", lambda e: errors.append(str(e)))
            for html in sorted(site.glob("*.html")):
                page.goto(base + html.name)
                page.wait_for_load_state("load")
                assert page.locator("h1").count() >= 1, f"{html.name} shows no heading"
            # Search runs in the page (a web worker over search/search_index.json): a word of the docs finds a page.
            page.goto(base + "index.html")
            page.keyboard.press("/")
            page.keyboard.type("pgvector")
            page.wait_for_selector(".md-search-result__item", timeout=30_000)
        finally:
            browser.close()
            server.shutdown()
    assert not asked, f"pages asked for something outside the site: {asked[:10]}"
    assert not errors, f"JavaScript errors: {errors[:5]}"
