"""The web UI for everyone (issue #28): axe-core on every state of the page at 1280 px and 390 px, the main flow by
keyboard alone, and what a newcomer found confusing, in Chromium (the fixtures and waits of tests/test_browser.py).

axe-core is injected from the copy the PyPI package ``axe-playwright-python`` ships (``axe.min.js``; the page's
network stays blocked for anything but the service). The test sweeps the states (cold page, results, the Filters
panel open with a filter on, large view, Add with results and refusals, Duplicates, About, the login page and the
empty collection behind it) and prints one JSON line (``A11Y_AXE {...}``: violating nodes per impact, state and
width; recorded in docs/benchmarks.md), then asserts no critical and no serious violation anywhere. The keyboard
test drives the whole main flow with ``page.keyboard`` only and prints the Tab presses from page load to the first
result's large view (``A11Y_TABS {...}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.test_browser as tb
from app.main import create_app
from tests.helpers import create_database, make_settings, run_live_server

pytestmark = pytest.mark.slow

browser = tb.browser  # the module-scoped Chromium of tests/test_browser.py (skips without Chromium)

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
#: Impacts that fail the test (axe-core's four: minor, moderate, serious, critical).
FAILING = ("critical", "serious")


def _axe_script() -> str:
    """axe-core's ``axe.min.js`` as ``axe-playwright-python`` ships it (``AXE_JS`` points at another copy, e.g.
    the npm package's, to compare versions)."""
    if path := os.environ.get("AXE_JS"):
        return Path(path).read_text(encoding="utf-8")
    from axe_playwright_python.base import AXE_SCRIPT

    return AXE_SCRIPT


@pytest.fixture(scope="module")
def axe_js() -> str:
    return _axe_script()


def _axe(page, axe_js: str) -> dict[str, list[dict]]:
    """axe-core's violations of the page as it is now, by impact: ``{impact: [{rule, targets}]}``.

    Every rule axe-core runs by default (WCAG 2.0-2.2 A and AA, best practices), plus the experimental
    ``label-content-name-mismatch`` (WCAG 2.5.3, which issue #28 lists)."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.evaluate(axe_js)
    result = page.evaluate(
        """async () => {
            const r = await axe.run(document, {
                resultTypes: ['violations'],
                rules: {'label-content-name-mismatch': {enabled: true}},
            });
            return {version: axe.version, violations: r.violations.map(v => ({
                rule: v.id, impact: v.impact, targets: v.nodes.map(n => n.target.join(' ')),
            }))};
        }"""
    )
    by_impact: dict[str, list[dict]] = {}
    for v in result["violations"]:
        by_impact.setdefault(v["impact"] or "unknown", []).append({"rule": v["rule"], "targets": v["targets"]})
    by_impact["_version"] = result["version"]
    return by_impact


def _counts(found: dict) -> dict[str, int]:
    return {impact: sum(len(v["targets"]) for v in vs) for impact, vs in found.items() if impact != "_version"}


class Sweep:
    """axe-core's findings per state and width."""

    def __init__(self, axe_js: str) -> None:
        self.axe_js = axe_js
        self.found: dict[str, dict[str, dict]] = {}

    def check(self, page, state: str) -> None:
        """Run axe-core on the page at 1280 px, then at 390 px, then back at 1280 px."""
        for label, size in (("1280", DESKTOP), ("390", PHONE)):
            page.set_viewport_size(size)
            page.wait_for_timeout(150)  # one layout at the new width (Gradio's columns wrap by CSS)
            self.found.setdefault(state, {})[label] = _axe(page, self.axe_js)
        page.set_viewport_size(DESKTOP)

    def report(self) -> dict:
        version = next((w["_version"] for s in self.found.values() for w in s.values()), None)
        return {
            "bench": "ui_axe",
            "axe_core": version,
            "nodes": {state: {w: _counts(f) for w, f in widths.items()} for state, widths in self.found.items()},
            "rules": sorted(
                {
                    f"{v['rule']} ({impact})"
                    for widths in self.found.values()
                    for found in widths.values()
                    for impact, vs in found.items()
                    if impact != "_version"
                    for v in vs
                }
            ),
        }

    def failures(self) -> list[str]:
        return [
            f"{state} @ {width} px: {impact} {v['rule']} on {v['targets'][:4]}"
            for state, widths in self.found.items()
            for width, found in widths.items()
            for impact in FAILING
            for v in found.get(impact, [])
        ]


@pytest.fixture(scope="module")
def server(pg_server, offline_embedder, tmp_path_factory) -> Iterator[tb.Server]:
    """A live server with the UI and the 8 images of tests/test_browser.py."""
    settings = make_settings(tmp_path_factory.mktemp("a11y") / "data", create_database(pg_server), ui_enabled=True)
    with run_live_server(create_app(settings, embedder=offline_embedder), tb.PORTS) as url:
        tb._index(url, [tb.HOPPER / n for n in tb.HOPPER_INDEXED] + tb.OTHERS)
        yield tb.Server(url, None)


@pytest.fixture(scope="module")
def locked_server(pg_server, offline_embedder, tmp_path_factory) -> Iterator[str]:
    """A live server whose reads need the key (the login page) and whose collection is empty."""
    settings = make_settings(
        tmp_path_factory.mktemp("a11y-locked") / "data",
        create_database(pg_server),
        ui_enabled=True,
        api_key=tb.KEY,
        api_key_reads=True,
    )
    with run_live_server(create_app(settings, embedder=offline_embedder), tb.PORTS) as url:
        yield url


@pytest.fixture
def page_1280(browser, server, request, tmp_path):
    """A fresh browser tab (1280 px wide) on the module's server; see ``tests.test_browser._finish``."""
    context, tab = tb._tab(browser, server.url, viewport=DESKTOP)
    yield tab.page
    tb._finish(request, context, tab, tmp_path)


def _login(page, url: str) -> None:
    page.goto(f"{url}/ui/")
    page.wait_for_selector("input[type=password]")


def test_axe_finds_nothing_serious_in_any_state(server, locked_server, browser, axe_js, request, tmp_path):
    sweep = Sweep(axe_js)
    context, tab = tb._tab(browser, server.url, viewport=DESKTOP)
    page = tab.page
    try:
        tb._open(page, server.url)
        sweep.check(page, "cold")
        tb._choose(page, tb.HOPPER / "pillow_hopper.jpg")
        tb._wait_results(page, count=8)
        sweep.check(page, "results")
        # The Filters panel open, with a filter on (every photo is at least 100 pixels wide: the same results).
        # Typed once Gradio has drawn the panel (see tb._open_panel: typed earlier, the value is wiped).
        tb._open_filters(page)
        tb._type_and_enter(page, "#filter-min-width", "100")
        tb._settled_text(page, "#search-status", r"1 filter on")
        tb._wait_results(page, count=8)
        sweep.check(page, "filters")
        # The focus is still in the box: the click below leaves it (a rerun) and must still open the large view.
        page.locator("#results .thumbnail-item").first.click()
        tb._settled_text(page, "#view-details", tb.DETAILS)
        page.wait_for_function(
            "() => { const i = document.querySelector('#view-image img'); return i && i.naturalWidth > 0; }"
        )
        sweep.check(page, "large_view")

        corrupt = tmp_path / "broken.jpg"
        corrupt.write_bytes((tb.DESK / "exif-rotn-8.jpg").read_bytes()[:2000])
        page.get_by_role("tab", name="Add").click()
        page.set_input_files("#add-files input[type=file]", [str(tb.HOPPER / "pillow_hopper.png"), str(corrupt)])
        tb._wait_chosen(page, "#add-files", ["pillow_hopper", "broken"])
        page.click("#add-button")
        tb._settled_text(page, "#add-results", r"broken\.jpg")
        tb._settled_text(page, "#add-summary", r"refused")
        sweep.check(page, "add_results")

        page.get_by_role("tab", name="Duplicates").click()
        page.click("#find-duplicates")
        page.wait_for_selector(".dup-group")
        tb._settled_text(page, "#tab-duplicates", r"groups at similarity")
        sweep.check(page, "duplicates")

        page.get_by_role("tab", name="About").click()
        tb._settled_text(page, "#about", r"photo")
        sweep.check(page, "about")
    finally:
        tb._finish(request, context, tab, tmp_path)

    context, tab = tb._tab(browser, locked_server, viewport=DESKTOP)
    page = tab.page
    try:
        _login(page, locked_server)
        sweep.check(page, "login")
        page.fill("input[type=text], input[name=username]", "me")
        page.fill("input[type=password]", tb.KEY)
        page.keyboard.press("Enter")
        page.wait_for_selector("#collection-line")
        assert tb._collection(page) == "0 photos"
        # An empty collection says to add photos first.
        assert "add photos on the Add tab first" in tb._settled_text(page, "#search-status", "empty")
        sweep.check(page, "empty_collection")
    finally:
        tb._finish(request, context, tab, tmp_path)

    print("\nA11Y_AXE " + json.dumps(sweep.report()))
    failures = sweep.failures()
    assert not failures, "\n".join(failures)


# --- keyboard ---------------------------------------------------------------------------------------------------
_FOCUSED_JS = """() => {
    const e = document.activeElement;
    if (!e || e === document.body) return 'body';
    const owner = e.closest('[id]');
    const name = (e.getAttribute('aria-label') || e.textContent || e.getAttribute('alt') || '').trim().slice(0, 40);
    return `${e.tagName.toLowerCase()}${owner ? '#' + owner.id : ''} ${name}`;
}"""


def _focused(page) -> str:
    """What has the keyboard focus: ``tag#id-of-the-closest-element-with-an-id name``."""
    return page.evaluate(_FOCUSED_JS)


def _tab_to(page, matches: str, limit: int = 80) -> int:
    """Press Tab until the focused element matches the CSS selector ``matches``; the number of presses. Fails with
    the path the focus took after ``limit`` presses."""
    path = []
    for n in range(1, limit + 1):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement && document.activeElement.matches(s)", matches):
            return n
        path.append(_focused(page))
    raise AssertionError(f"{matches} not reached in {limit} Tab presses: {path}")


def _visible_focus(page) -> bool:
    """Whether the focused element shows that it has the focus (an outline or a box shadow ring)."""
    return page.evaluate(
        """() => { const s = getComputedStyle(document.activeElement);
                   return (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== 'none'; }"""
    )


def _focus_is(page, selector: str) -> None:
    """Wait until the element ``selector`` has the keyboard focus (events move it a frame or more after they end),
    then check that the focus shows."""
    page.wait_for_function("s => document.activeElement && document.activeElement.matches(s)", arg=selector)
    assert _visible_focus(page), f"the focus on {_focused(page)} does not show"


def _press(page, key: str, times: int = 1) -> None:
    for _ in range(times):
        page.keyboard.press(key)


def test_the_main_flow_by_keyboard_alone(server, browser, request, tmp_path):
    """Choose a photo, search, move through the results, open one, close it, download, more like this, the page size
    by its number box and by its slider's arrow keys, load more: ``page.keyboard`` only, the focus always showing.
    Prints the Tab presses from the page's load to the first result's large view (``A11Y_TABS``)."""
    ids = server.ids()
    context, tab = tb._tab(browser, server.url, viewport=DESKTOP)
    page = tab.page
    keys = page.keyboard
    # Playwright intercepts file choosers once a listener exists; subscribing only in expect_file_chooser raced
    # with the Enter that opened it under load (the browser's own dialog opened, and no event came).
    page.on("filechooser", lambda _chooser: None)
    try:
        tb._open(page, server.url)
        tabs = _tab_to(page, "#query-file .upload-container")
        assert _visible_focus(page)
        with page.expect_file_chooser() as chooser:
            keys.press("Enter")
        chooser.value.set_files(str(tb.HOPPER / "pillow_hopper.jpg"))
        tb._wait_results(page, count=8)
        # The upload button the focus was on is gone: the focus is on the status line, one Tab before the results.
        _focus_is(page, "#search-status")
        tabs += _tab_to(page, "#results .thumbnail-item")
        _focus_is(page, "#results .gallery-item:nth-child(1) .thumbnail-item")
        keys.press("Tab")
        _focus_is(page, "#results .gallery-item:nth-child(2) .thumbnail-item")
        keys.press("Shift+Tab")
        keys.press("Enter")
        tb._settled_text(page, "#view-details", tb.DETAILS)
        print("\nA11Y_TABS " + json.dumps({"bench": "ui_tabs_to_large_view", "tab_presses": tabs}))
        # The focus goes into the large view, and back to its result when it closes (Escape or Close).
        _focus_is(page, "#view-details")
        keys.press("Escape")
        page.wait_for_selector("#large-view", state="hidden")
        _focus_is(page, "#results .gallery-item:nth-child(1) .thumbnail-item")
        keys.press("Tab")
        keys.press("Enter")
        details = tb._settled_text(page, "#view-details", r"Indexed[\s\S]*pillow_hopper\.heif|heif[\s\S]*Indexed")
        _focus_is(page, "#view-details")
        assert _tab_to(page, "#download-original", limit=3) <= 2
        with page.expect_download() as download:
            keys.press("Enter")
        assert download.value.suggested_filename == "pillow_hopper.heif", details
        assert _tab_to(page, "#more-like-this", limit=3) == 1
        keys.press("Enter")
        page.wait_for_function("id => location.search.includes('id=' + id)", arg=ids["pillow_hopper.heif"])
        assert "pillow_hopper.heif" not in tb._names(tb._wait_results(page, count=7))
        _focus_is(page, "#search-status")

        # Filters: the page size typed into its number box with Enter, then one less with the slider's arrow key.
        keys.press("Shift+Tab")
        _focus_is(page, "#filters button")
        keys.press("Enter")
        # Waited for as a person sees the panel open, not a key: keys typed into a box of it before Gradio has drawn
        # it are wiped (tb._open_panel). The ~37 Tab presses to the page size box outlast that today; fewer do not.
        tb._wait_drawn(page, tb.FILTERS_LAST)
        _tab_to(page, "#top-k input[type=number]")
        keys.press("Control+A")
        keys.type("3")
        keys.press("Enter")
        tb._wait_results(page, count=3)
        page.wait_for_function("() => location.search.includes('top_k=3')")
        assert _tab_to(page, "#top-k input[type=range]", limit=3) <= 2  # past the slider's reset button
        assert _visible_focus(page)
        keys.press("ArrowLeft")
        tb._wait_results(page, count=2)
        page.wait_for_function("() => location.search.includes('top_k=2')")
        # Load more.
        _tab_to(page, "#load-more")
        assert _visible_focus(page)
        keys.press("Enter")
        tb._wait_results(page, count=4)
    finally:
        tb._finish(request, context, tab, tmp_path)


# --- what a newcomer found confusing ------------------------------------------------------------------------------
def test_what_a_newcomer_found_confusing_is_answered_on_the_page(server, page_1280):
    page = page_1280
    ids = server.ids()
    # A bad link: what could not be used stays on the status line (no toast that fades over the header); the
    # link's filters are on, so the Filters panel is open and the status line says how many.
    tb._open(page, server.url, f"?id={ids['pillow_hopper.png']}&formats=JPEG,HEIF&top_k=oops")
    status = tb._settled_text(page, "#search-status", r"results")
    assert status.startswith("⚠ Part of this link could not be used")
    assert "results per page (top_k) must be a whole number" in status
    assert "1 filter on" in status
    assert page.locator(tb.TOAST).count() == 0
    page.wait_for_selector("#filter-formats", state="visible")  # the panel is open
    # The header: plain words first, the model and the database behind "Details".
    header = page.inner_text("#collection-line")
    assert header.startswith("8 photos · search by photo") and "pgvector" not in header
    page.click("#collection-details summary")
    details = page.inner_text("#collection-line")
    assert "pgvector" in details and "1280 dimensions" in details

    # A photo that is in the collection: left out of its own results, and the page says so.
    tb._choose(page, tb.HOPPER / "pillow_hopper.png")
    names = tb._names(tb._wait_results(page, count=6))  # 8 photos, minus itself and the PNG (JPEG, HEIF only)
    assert "pillow_hopper.png" not in names
    assert "Your photo is in the collection" in tb._settled_text(page, "#search-status", r"left out")
    # Clear: the results, the status and the link go with the photo.
    page.click("#query-file button[aria-label='Clear']")
    page.wait_for_function("() => document.querySelectorAll('#results .thumbnail-item').length === 0")
    page.wait_for_function("() => !document.querySelector('#search-status').innerText.trim()")
    assert page.locator("#load-more").is_hidden()
