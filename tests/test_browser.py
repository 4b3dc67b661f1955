"""The web UI at /ui/ driven in a real browser: Playwright's sync API with Debian's Chromium, against a live server
(offline model, embedded PostgreSQL, real images from ../shared/datasets).

Playwright's own browser download does not work on these machines, so the system's Chromium is used
(``apt-get install chromium``; ``.ci/run`` installs it). Without it these tests skip, except under ``CI=true``, where
they fail. A failed test keeps a screenshot of the page under its tmp_path and prints the path.

Two tests also time what a user waits for, from choosing the file to the first result thumbnail on screen, for a
12 MP JPEG and the same photo as a 12 MP HEIC, and print one JSON line each (``BROWSER_TIMING {...}``); the figures
are recorded in docs/benchmarks.md. They are not asserted.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.helpers import FORMATS, INSTANCE, create_database, make_settings, run_live_server

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PORTS = range(18950, 19000)  # this suite's servers stay in one range, away from the other suites' servers
TIMEOUT_MS = 60_000  # a 2-core machine shared with other jobs: generous, the figures are measured separately

HOPPER = INSTANCE / "grace_hopper"
# Three files of one picture (same pixels once EXIF is applied): the query's nearest results and a duplicate group.
HOPPER_INDEXED = ["pillow_hopper.png", "pillow_hopper_orientation_6.jpg", "pillow_hopper.heif"]
DESK = INSTANCE / "pdq_desk_exif"  # 12 MP phone photos of one desk
OTHERS = [
    INSTANCE / "plasma_Kite" / "Kite_2560x1600.jpg",
    INSTANCE / "ocv_graffiti_viewpoint" / "graf1.png",
    INSTANCE / "exif_landscape" / "Landscape_0.jpg",
    INSTANCE / "pdq_bridge" / "aaa-orig.jpg",
    DESK / "exif-rotn-6.jpg",
]
KEY = "browser-test-key-3d9a"


def _chromium_or_skip() -> str:
    if shutil.which(CHROMIUM) or Path(CHROMIUM).is_file():
        return CHROMIUM
    reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; or set CHROMIUM to its path)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    path = _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Server:
    url: str
    app: object

    def ids(self) -> dict[str, str]:
        """filename -> id of everything indexed."""
        dimension = httpx.get(f"{self.url}/stats", timeout=30).json()["dimension"]
        r = httpx.post(f"{self.url}/search_vector", json={"vector": [1.0] * dimension, "top_k": 100}, timeout=60)
        return {hit["filename"]: hit["id"] for hit in r.json()["results"]}


def _index(url: str, paths: list[Path], headers: dict | None = None) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in paths]
    r = httpx.post(f"{url}/index_images", files=files, headers=headers or {}, timeout=120)
    assert r.status_code == 200 and all(x["status"] == "indexed" for x in r.json()["results"]), r.text


@pytest.fixture(scope="module")
def server(pg_server, offline_embedder, tmp_path_factory) -> Iterator[Server]:
    """One live server with the UI for most tests of this module, 8 images indexed."""
    settings = make_settings(tmp_path_factory.mktemp("browser") / "data", create_database(pg_server), ui_enabled=True)
    app = create_app(settings, embedder=offline_embedder)
    with run_live_server(app, PORTS) as url:
        _index(url, [HOPPER / n for n in HOPPER_INDEXED] + OTHERS)
        yield Server(url, app)


#: 12 MP phone JPEGs used as queries for the timing (the fourth photo of the desk, exif-rotn-6.jpg, is indexed).
#: BROWSER_TIMING_RUNS (1 to 3, default 1) says how many of them each timing uses: every HEIC made costs about 10 s
#: of CPU on a 2-core machine, so the default run times one of each.
TIMED_JPEGS = [DESK / "exif-rotn-1.jpg", DESK / "exif-rotn-3.jpg", DESK / "exif-rotn-8.jpg"][
    : max(1, min(3, int(os.environ.get("BROWSER_TIMING_RUNS", "1"))))
]


@pytest.fixture(scope="module")
def heics_12mp(tmp_path_factory) -> list[Path]:
    """The TIMED_JPEGS as 12 MP HEICs (4032 x 3024, EXIF applied), named as iPhones name them (upper case)."""
    import pillow_heif
    from PIL import Image, ImageOps

    folder = tmp_path_factory.mktemp("heic")
    paths = []
    for n, jpeg in enumerate(TIMED_JPEGS):
        with Image.open(jpeg) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        path = folder / f"IMG_{4032 + n}.HEIC"
        # x265's ultrafast preset: about 10 s instead of 40 s for 12 MP here; decoding (what is timed) is the same.
        pillow_heif.from_pillow(image).save(path, quality=80, enc_params={"preset": "ultrafast"})
        paths.append(path)
    return paths


def _page(browser, request, tmp_path, **context_args):
    context = browser.new_context(accept_downloads=True, **context_args)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh browser tab (desktop size); keeps a screenshot when the test fails; fails on any JavaScript error."""
    context, page, errors = _page(browser, request, tmp_path, viewport={"width": 1280, "height": 900})
    yield page
    _finish(request, context, page, errors, tmp_path)


def _finish(request, context, page, errors, tmp_path) -> None:
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        shot = tmp_path / "failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nScreenshot of the failed page: {shot}")
        except Exception as exc:  # noqa: BLE001 - the test's own failure is what matters
            print(f"\nNo screenshot: {exc}")
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def _open(page, url: str, hash_: str = "") -> None:
    page.goto(f"{url}/ui/{hash_}")
    page.wait_for_selector("body[data-ready=true]")


def _wait_results(page, at_least: int = 1) -> list[dict]:
    """Wait until at least ``at_least`` results are listed with their thumbnails shown; their captions."""
    page.wait_for_function(
        """n => {
            if (document.querySelector('#results').getAttribute('aria-busy') === 'true') return false;
            const items = document.querySelectorAll('#results li');
            return items.length >= n && [...items].slice(0, n).every(li => {
                const img = li.querySelector('img');
                return img.complete && img.naturalWidth > 0;
            });
        }""",
        arg=at_least,
    )
    return page.eval_on_selector_all(
        "#results li",
        """items => items.map(li => ({
            rank: li.querySelector('.rank').textContent,
            score: li.querySelector('.score').textContent,
            name: li.querySelector('.name').textContent,
            title: li.querySelector('.thumb').title,
            id: li.dataset.id,
        }))""",
    )


def _first_thumbnail_ms(page, path: Path) -> float:
    """Choose ``path`` in the search box and time until the first result thumbnail is decoded on screen."""
    start = time.perf_counter()
    page.set_input_files("#query-file", str(path))
    page.wait_for_function(
        """() => { const img = document.querySelector('#results li img');
                   return img && img.complete && img.naturalWidth > 0; }"""
    )
    return (time.perf_counter() - start) * 1000


def _drop_or_paste(page, path: Path, event: str) -> None:
    """Drop (or paste) a file on the page as a user would, with the empty MIME type Chromium gives HEIC files."""
    page.evaluate(
        """([b64, name, event]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: ''}));
            const e = event === 'drop'
                ? new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})
                : new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true});
            document.querySelector('main').dispatchEvent(e);
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name, event],
    )


# --- search -----------------------------------------------------------------------------------------------------------
def test_search_by_jpeg_upload(server, page):
    _open(page, server.url)
    assert page.inner_text("#collection") == "8 photos"
    page.set_input_files("#query-file", str(HOPPER / "pillow_hopper.jpg"))  # not indexed itself
    results = _wait_results(page, 3)
    assert {r["name"] for r in results[:3]} == set(HOPPER_INDEXED)
    assert [r["rank"] for r in results] == [f"#{i}" for i in range(1, len(results) + 1)]
    scores = [float(r["score"]) for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["title"] == r["name"] for r in results)  # the full name on hover
    page.wait_for_function("() => document.querySelector('#query-preview-img').naturalWidth > 0")
    assert page.inner_text("#query-name") == "pillow_hopper.jpg"
    assert page.is_hidden("#search-message")  # no error, no leftover "Searching…"
    # Results are laid out as a grid across the page (several per row), not in a scrolling box.
    boxes = [page.locator("#results li").nth(i).bounding_box() for i in range(3)]
    assert boxes[0]["y"] == boxes[1]["y"] == boxes[2]["y"]
    overflow = page.eval_on_selector("#results", "el => getComputedStyle(el).overflowY")
    assert overflow == "visible"
    # The text boxes explain why they are off for this image-only model.
    assert page.is_disabled("#query-text")
    assert "compares pictures only" in page.inner_text("#text-note")

    # Removing the query removes its results.
    page.click("#query-clear")
    assert page.locator("#results li").count() == 0

    # The engineers' facts live in About, not in the collection line.
    page.click("button.mode[data-mode=about]")
    about = page.inner_text("#about")
    assert "efficientnet-lite2:imagenet" in about and "1280" in about and "pgvector" in about


@pytest.mark.parametrize(
    "name", ["IMG_5195.HEIC", "HMD_Nokia_8.3_5G.heif"], ids=["upper-case-HEIC-picker", "heif-picker"]
)
def test_search_by_heic_upload_with_preview(server, page, name):
    _open(page, server.url)
    page.set_input_files("#query-file", str(FORMATS / "heic" / name))
    assert len(_wait_results(page, 3)) == 8
    page.wait_for_function("() => document.querySelector('#query-preview-img').naturalWidth > 0")


def test_drop_and_paste_anywhere(server, page, tmp_path):
    _open(page, server.url)
    upper = tmp_path / "PILLOW_HOPPER.HEIF"  # upper-case extension, empty MIME type in the browser
    upper.write_bytes((HOPPER / "pillow_hopper.heif").read_bytes())
    _drop_or_paste(page, upper, "drop")
    results = _wait_results(page, 2)
    # The exact bytes of an indexed file are recognised as that file and left out of its own results.
    assert "pillow_hopper.heif" not in [r["name"] for r in results]
    assert {r["name"] for r in results[:2]} == {"pillow_hopper.png", "pillow_hopper_orientation_6.jpg"}
    page.wait_for_function("() => document.querySelector('#query-preview-img').naturalWidth > 0")

    _drop_or_paste(page, DESK / "exif-rotn-3.jpg", "paste")
    page.wait_for_function("() => document.querySelector('#query-name').textContent === 'exif-rotn-3.jpg'")
    assert _wait_results(page, 1)[0]["name"] == "exif-rotn-6.jpg"


def test_more_like_this_and_shareable_link(server, page, browser, request, tmp_path):
    _open(page, server.url)
    page.set_input_files("#query-file", str(HOPPER / "pillow_hopper.jpg"))
    first = _wait_results(page, 3)[0]
    page.locator("#results li").first.locator(".similar").click()
    page.wait_for_function("id => location.hash.includes('id=' + id)", arg=first["id"])
    results = _wait_results(page, 2)
    assert first["id"] not in [r["id"] for r in results]  # the image itself is left out
    assert {r["name"] for r in results[:2]} == set(HOPPER_INDEXED) - {first["name"]}
    assert page.inner_text("#query-name") == first["name"]
    page.wait_for_function("() => document.querySelector('#query-preview-img').naturalWidth > 0")  # its thumbnail

    # The address is the search: opened in another tab, it runs it.
    link = page.url
    context, other, errors = _page(browser, request, tmp_path, viewport={"width": 1280, "height": 900})
    try:
        other.goto(link)
        assert [r["id"] for r in _wait_results(other, 2)] == [r["id"] for r in results]
    finally:
        _finish(request, context, other, errors, tmp_path)


def test_load_more_pages_with_offset(server, page):
    ids = server.ids()
    query = ids["pillow_hopper.png"]
    _open(page, server.url, f"#id={query}&top_k=3")
    first = _wait_results(page, 3)
    assert len(first) == 3 and page.input_value("#opt-top-k") == "3"
    page.click("#load-more")
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 6")
    both = _wait_results(page, 6)
    assert [r["rank"] for r in both] == ["#1", "#2", "#3", "#4", "#5", "#6"]
    assert both[:3] == first and len({r["id"] for r in both}) == 6
    page.click("#load-more")
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 7")  # 8 images, minus itself
    page.wait_for_selector("#load-more", state="hidden")


def test_filter_narrows_the_results(server, page):
    query = server.ids()["pillow_hopper.png"]
    _open(page, server.url, f"#id={query}")
    assert len(_wait_results(page, 7)) == 7
    page.click("#options summary")
    page.fill("#opt-min-score", "0.9")
    page.press("#opt-min-score", "Enter")  # commits the number: the search runs again
    page.wait_for_function("() => document.querySelectorAll('#results li').length < 7")
    narrowed = _wait_results(page, 1)
    assert {r["name"] for r in narrowed} <= set(HOPPER_INDEXED) and all(float(r["score"]) >= 0.9 for r in narrowed)
    assert "min_score=0.9" in page.url  # the filter is part of the link

    page.fill("#opt-min-score", "")
    page.press("#opt-min-score", "Enter")
    page.check('#options input[name=format][value="PNG"]')
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .name')].every(n => n.textContent.endsWith('.png'))"
    )
    assert [r["name"] for r in _wait_results(page, 1)] == ["graf1.png"]
    assert "formats=PNG" in page.url

    # Taken in 2017 (EXIF DateTimeOriginal): only the desk photo; "until" includes its whole last day.
    page.uncheck('#options input[name=format][value="PNG"]')
    page.fill("#opt-taken-after", "2017-11-07")
    page.fill("#opt-taken-before", "2017-11-07")
    page.wait_for_function("() => document.querySelectorAll('#results li').length === 1")
    assert [r["name"] for r in _wait_results(page, 1)] == ["exif-rotn-6.jpg"]


def test_large_view_and_download_original(server, page, tmp_path):
    query = server.ids()["pillow_hopper.png"]
    _open(page, server.url, f"#id={query}")
    results = _wait_results(page, 2)
    index = next(i for i, r in enumerate(results) if r["name"] == "pillow_hopper.heif")
    page.locator("#results li").nth(index).locator(".thumb").click()
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("() => document.querySelector('#viewer-img').naturalWidth > 0")
    facts = page.inner_text("#viewer-facts")
    assert "HEIF" in facts and "128 × 128 pixels" in facts and "Indexed" in facts and "Taken" in facts
    with page.expect_download() as info:
        page.click("#viewer-download")
    download = info.value
    assert download.suggested_filename == "pillow_hopper.heif"
    saved = tmp_path / "download"
    download.save_as(saved)
    assert saved.read_bytes() == (HOPPER / "pillow_hopper.heif").read_bytes()

    # A JPEG original is shown as it is, at its own size.
    page.click("#viewer-similar")  # "more like this" from the large view
    page.wait_for_selector("#viewer", state="hidden")
    assert page.inner_text("#query-name") == "pillow_hopper.heif"
    results = _wait_results(page, 2)
    index = next(i for i, r in enumerate(results) if r["name"] == "pillow_hopper_orientation_6.jpg")
    page.locator("#results li").nth(index).locator(".thumb").click()
    page.wait_for_function("() => document.querySelector('#viewer-img').naturalWidth > 0")
    src = page.get_attribute("#viewer-img", "src")
    assert src.endswith(f"/image/{server.ids()['pillow_hopper_orientation_6.jpg']}")


def test_phone_layout_shows_the_first_result_without_scrolling(server, browser, request, tmp_path):
    context, page, errors = _page(
        browser, request, tmp_path, viewport={"width": 390, "height": 844}, device_scale_factor=3, is_mobile=True
    )
    try:
        _open(page, server.url)
        for mode in ("Search", "Add", "Duplicates", "About"):  # every mode is a visible button, no menu
            box = page.get_by_role("navigation", name="Modes").get_by_role("button", name=mode).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, mode
        page.set_input_files("#query-file", str(HOPPER / "pillow_hopper.jpg"))
        _wait_results(page, 1)
        assert page.evaluate("() => window.scrollY") == 0
        box = page.locator("#results li").first.bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 844, box
        assert box["width"] > 120  # two results per row, not squeezed
    finally:
        _finish(request, context, page, errors, tmp_path)


def test_time_to_first_thumbnail(server, browser, request, tmp_path, heics_12mp):
    """Upload to first result thumbnail for 12 MP JPEGs and the same photos as 12 MP HEICs (printed, not asserted).

    Each run is a new file (no query-embedding cache hit) in a new browser context (no cached thumbnails): what a
    user waits for with a new photo on an open page."""
    figures = {}
    for label, paths in (("jpeg_12mp", TIMED_JPEGS), ("heic_12mp", heics_12mp)):
        runs, searches = [], []
        for path in paths:
            context, page, errors = _page(browser, request, tmp_path, viewport={"width": 1280, "height": 900})
            try:
                _open(page, server.url)
                runs.append(round(_first_thumbnail_ms(page, path)))
                assert _wait_results(page, 1)[0]["name"] == "exif-rotn-6.jpg"  # the same desk, rotated
                # Of that, the search request itself (upload, decode, embed, search), from the page's resource timing.
                searches.append(
                    round(
                        page.evaluate(
                            """() => performance.getEntriesByType('resource')
                                   .find(e => e.name.includes('/search_image')).duration"""
                        )
                    )
                )
            finally:
                _finish(request, context, page, errors, tmp_path)
        figures[label] = {
            "bytes": [p.stat().st_size for p in paths],
            "ms": runs,
            "median_ms": sorted(runs)[len(runs) // 2],
            "search_request_ms": searches,
        }
    line = {"bench": "browser_first_thumbnail", **figures, "load_avg_1m": round(os.getloadavg()[0], 2)}
    print("\nBROWSER_TIMING " + json.dumps(line))


@pytest.fixture(scope="module")
def clip_server(pg_server, tmp_path_factory) -> Iterator[str]:
    """A server with a text model: OpenCLIP ViT-S-32 with random weights (no download; the rankings mean nothing, the
    requests the page sends and what it shows are what is checked)."""
    import torch

    from app.embedders.clip import OpenClipEmbedder

    torch.manual_seed(0)
    clip = OpenClipEmbedder("ViT-S-32", pretrained=None, device="cpu", batch_size=4)
    settings = make_settings(tmp_path_factory.mktemp("clip") / "data", create_database(pg_server), ui_enabled=True)
    with run_live_server(create_app(settings, embedder=clip), PORTS) as url:
        _index(url, [HOPPER / n for n in HOPPER_INDEXED] + OTHERS[:2])
        yield url


def test_text_and_combined_search(clip_server, page):
    _open(page, clip_server)
    assert page.is_enabled("#query-text") and page.is_hidden("#text-note")
    with page.expect_request(lambda r: r.url.split("?")[0].endswith("/search_text")) as sent:
        page.fill("#query-text", "a woman in uniform")
        page.press("#query-text", "Enter")
    assert json.loads(sent.value.post_data) == {"query": "a woman in uniform"}
    assert len(_wait_results(page, 5)) == 5
    assert "text=a+woman+in+uniform" in page.url

    # Like this result, but not these words: one POST /search with the stored image and the negative text.
    first = _wait_results(page, 1)[0]
    page.locator("#results li").first.locator(".similar").click()
    _wait_results(page, 4)
    page.fill("#query-text", "")
    page.fill("#query-not", "a flag")
    with page.expect_request(lambda r: r.url.split("?")[0].endswith("/search")) as sent:
        page.press("#query-not", "Enter")
    assert json.loads(sent.value.post_data) == {
        "positive": [{"image_id": first["id"]}],
        "negative": [{"text": "a flag"}],
    }
    assert len(_wait_results(page, 4)) == 4 and page.is_hidden("#search-message")
    assert "not=a+flag" in page.url

    # An uploaded photo that is not in the collection cannot be combined with words: the page says why.
    page.click("#query-clear")
    page.set_input_files("#query-file", str(HOPPER / "pillow_hopper.jpg"))
    page.wait_for_selector("#search-message.error")
    assert "not in the collection" in page.inner_text("#search-message")
    assert page.locator("#results li").count() == 0


# --- add, duplicates ----------------------------------------------------------------------------------------------
def test_add_reports_a_corrupt_file(server, page, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes((DESK / "exif-rotn-8.jpg").read_bytes()[:2000])
    new = HOPPER / "pillow_hopper_gray.jpg"
    _open(page, server.url)
    before = page.inner_text("#collection")
    page.click("button.mode[data-mode=add]")
    page.set_input_files("#add-files", [str(new), str(corrupt), str(HOPPER / "pillow_hopper.png")])
    assert page.locator("#add-chosen li").count() == 3
    page.wait_for_function("() => document.querySelector('#add-chosen img').naturalWidth > 0")
    page.click("#add-start")
    page.wait_for_function("() => document.querySelectorAll('#add-report li').length === 3")
    lines = page.eval_on_selector_all("#add-report li", "items => items.map(li => [li.className, li.textContent])")
    assert lines[0] == ["ok", "pillow_hopper_gray.jpg — added"]
    assert lines[1][0] == "failed" and lines[1][1].startswith("broken.jpg — ") and len(lines[1][1]) > 25
    assert lines[2] == ["ok", "pillow_hopper.png — already in the collection"]
    assert page.locator("#add-chosen li").count() == 0  # the chosen list is cleared
    assert "1 photo added" in page.inner_text("#add-message")
    page.wait_for_function("b => document.querySelector('#collection').textContent !== b", arg=before)
    assert page.inner_text("#collection") == "9 photos"
    httpx.delete(f"{server.url}/image/{server.ids()['pillow_hopper_gray.jpg']}", timeout=30)


def test_duplicates_tab_lists_a_known_group(server, page):
    _open(page, server.url)
    page.click("button.mode[data-mode=duplicates]")
    page.click("#dup-build")
    page.wait_for_selector(".dup-group")
    groups = page.eval_on_selector_all(
        ".dup-group", "gs => gs.map(g => [...g.querySelectorAll('.name')].map(n => n.textContent))"
    )
    assert any(set(HOPPER_INDEXED) <= set(g) for g in groups), groups
    page.wait_for_function("() => [...document.querySelectorAll('.dup-group img')].every(i => i.naturalWidth > 0)")

    # Delete one photo of the group, after a confirmation (Cancel first: nothing happens).
    ids = server.ids()
    heif = ids["pillow_hopper.heif"]
    group = page.locator(".dup-group", has=page.locator(f'li[data-id="{heif}"]'))
    group.locator(f'input[value="{heif}"]').check()
    group.locator("button.delete").click()
    page.wait_for_selector("#confirm-dialog[open]")
    assert "pillow_hopper.heif" in page.inner_text("#confirm-text")
    page.click("#confirm-dialog button[value=cancel]")
    assert heif in server.ids().values()
    group.locator("button.delete").click()
    page.click("#confirm-ok")
    page.wait_for_selector(f'.dup-group li[data-id="{heif}"]', state="detached")
    page.wait_for_function("() => document.querySelector('#collection').textContent === '7 photos'")
    assert heif not in server.ids().values()
    _index(server.url, [HOPPER / "pillow_hopper.heif"])  # as it was, for the tests after this one


# --- access -------------------------------------------------------------------------------------------------------
def test_login_when_api_key_is_set(pg_server, offline_embedder, tmp_path, browser, request):
    settings = make_settings(
        tmp_path / "data", create_database(pg_server), ui_enabled=True, api_key=KEY, api_key_reads=True
    )
    with run_live_server(create_app(settings, embedder=offline_embedder), PORTS) as url:
        _index(url, [HOPPER / n for n in HOPPER_INDEXED], headers={"X-API-Key": KEY})
        context, page, errors = _page(browser, request, tmp_path, viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{url}/ui/")
            page.wait_for_selector("#key-dialog[open]")  # before anything else
            assert page.inner_text("#collection") == ""
            page.fill("#key-input", "wrong")
            page.click("#key-submit")
            page.wait_for_selector("#key-error:not([hidden])")
            assert "not valid" in page.inner_text("#key-error")
            page.fill("#key-input", KEY)
            page.click("#key-submit")
            page.wait_for_selector("body[data-ready=true]")
            assert page.inner_text("#collection") == "3 photos"
            page.set_input_files("#query-file", str(HOPPER / "pillow_hopper.jpg"))
            _wait_results(page, 3)
            # Images came with the key, as blob URLs; the key is in no URL.
            src = page.get_attribute("#results li img", "src")
            assert src.startswith("blob:")
            assert KEY not in page.url and page.evaluate("() => document.cookie") == ""
            page.click("#forget-key")
            page.wait_for_selector("#key-dialog[open]")
            assert page.locator("#results li").count() == 0
        finally:
            _finish(request, context, page, errors, tmp_path)


def test_key_for_writes_only(pg_server, offline_embedder, tmp_path, browser, request):
    # API_KEY without API_KEY_READS: the page asks first, but searching works without a key; adding asks again.
    # MAX_BATCH_FILES=2: three files go in two requests.
    settings = make_settings(
        tmp_path / "data", create_database(pg_server), ui_enabled=True, api_key=KEY, max_batch_files=2
    )
    with run_live_server(create_app(settings, embedder=offline_embedder), PORTS) as url:
        context, page, errors = _page(browser, request, tmp_path, viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{url}/ui/")
            page.wait_for_selector("#key-dialog[open]")
            assert page.inner_text("#key-skip") == "Search without a key"
            page.click("#key-skip")
            page.wait_for_selector("body[data-ready=true]")
            assert page.inner_text("#collection") == "0 photos" and page.is_hidden("#forget-key")
            page.reload()  # the choice holds for the tab
            page.wait_for_selector("body[data-ready=true]")
            assert page.is_hidden("#key-dialog")

            page.click("button.mode[data-mode=add]")
            names = ["pillow_hopper.png", "pillow_hopper.webp", "pillow_hopper.bmp"]
            page.set_input_files("#add-files", [str(HOPPER / n) for n in names])
            batches: list[str] = []
            page.on("request", lambda r: batches.append(r.url) if r.url.endswith("/index_images") else None)
            page.click("#add-start")
            page.wait_for_selector("#key-dialog[open]")
            page.fill("#key-input", KEY)
            page.click("#key-submit")
            page.wait_for_function("() => document.querySelectorAll('#add-report li.ok').length === 3")
            assert page.inner_text("#add-report").splitlines() == [f"{n} — added" for n in names]
            assert len(batches) == 2
            page.wait_for_function("() => document.querySelector('#collection').textContent === '3 photos'")
            assert page.is_visible("#forget-key")
        finally:
            _finish(request, context, page, errors, tmp_path)


def test_docs_render_with_the_network_blocked(server, page):
    outside: list[str] = []

    def only_the_service(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_service)
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock")
    paths = page.eval_on_selector_all(".opblock-summary-path", "ps => ps.map(p => p.textContent.trim())")
    assert "/search_image" in [p.replace("\u200b", "") for p in paths]
    assert outside == []
