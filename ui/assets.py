"""What the web UI's page looks like and runs in the browser, apart from Gradio's own: the CSS, the JavaScript
snippets its events run, and the theme. :mod:`ui.mount` hands ``CSS``, ``PASTE_JS`` and :func:`theme` to
``gr.mount_gradio_app``; the panels attach the other snippets to their events."""

from __future__ import annotations

import gradio as gr

#: Runs in the browser after each search: put the search in the address (``history.replaceState``), so the
#: address can be copied and opens the same search; an uploaded photo cannot travel in a link.
UPDATE_ADDRESS_JS = """(query) => {
    const next = location.pathname + (query || "");
    if (next !== location.pathname + location.search) history.replaceState(null, "", next);
}"""


def stamp_js(n_inputs: int) -> str:
    """Frontend code run when a search is triggered, before it is sent: the last of its ``n_inputs`` inputs (a
    hidden number) becomes this tab's next trigger number. The server runs searches on several threads, which may
    start in another order than the browser triggered them (a filter's blur and the next filter's Enter within a few
    ms); the number lets the server drop one that an already started, later-triggered search supersedes."""
    return (
        f"(...args) => {{ const a = args.slice(0, {n_inputs}); "
        f"a[{n_inputs - 1}] = (window.__imageSearchSeq = (window.__imageSearchSeq || 0) + 1); return a; }}"
    )


#: Runs after a search on a phone: the photo box and the word boxes fill the screen, so the page scrolls to the
#: results (the search status line above them).
SHOW_RESULTS_JS = """() => {
    if (window.innerWidth > 640) return;
    const status = document.getElementById("search-status");
    if (status && status.textContent.trim()) status.scrollIntoView({ block: "start" });
}"""

#: Runs once when the page loads: a photo pasted anywhere on the page (Ctrl+V / Cmd+V) goes to the search's photo
#: box, or to "Add" when that tab is open, as if it had been chosen there (the same upload, no type filter).
PASTE_JS = """() => {
    const box = (id) => document.getElementById(id);
    const pick = () => {
        const add = box("add-files");
        return add && add.offsetParent !== null ? add : box("query-file");
    };
    document.addEventListener("paste", async (event) => {
        const files = [...((event.clipboardData && event.clipboardData.files) || [])];
        const target = pick();
        if (!files.length || !target) return;
        event.preventDefault();
        let input = target.querySelector("input[type=file]");
        const clear = target.querySelector("button[aria-label='Clear']");
        if (!input && clear) {
            clear.click();
            for (let i = 0; i < 50 && !(input = target.querySelector("input[type=file]")); i++) {
                await new Promise((r) => setTimeout(r, 20));
            }
        }
        if (!input) return;
        const transfer = new DataTransfer();
        (input.multiple ? files : files.slice(0, 1)).forEach((f) => transfer.items.add(f));
        input.files = transfer.files;
        input.dispatchEvent(new Event("change", { bubbles: true }));
    });
}"""

#: Layout rules Gradio has no parameter for: results fill the page's width in as many columns as fit, grow with the
#: page instead of scrolling inside a box, and show the whole file name; the tabs stay visible on a phone (they wrap).
CSS = """
.photo-grid .grid-wrap { max-height: none !important; min-height: 0 !important; height: auto !important;
    overflow: visible !important; }
.photo-grid .grid-wrap.fixed-height { min-height: 0 !important; }
.photo-grid .grid-container { grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important; }
.dup-group .photo-grid .grid-container { grid-template-columns: repeat(auto-fill, minmax(120px, 1fr)) !important; }
.photo-grid .caption-label {
    white-space: normal !important; overflow-wrap: break-word; word-break: normal; max-width: 100% !important;
}
/* The results' label above the thumbnails, not floating over the first row. */
#results label[data-testid="block-label"] { position: static !important; margin-bottom: var(--spacing-sm); }
/* The "chosen" mark only while the large view shows that result: Gradio's gallery keeps the marked position when
   its results are replaced (a null selected_index never reaches the page), and every search closes the view. */
body:not(:has(#large-view)) #results .thumbnail-item.selected {
    --ring-color: transparent; border-color: var(--border-color-primary);
}
/* The Add table fits its column (a phone's 390 px too): fixed layout, the reasons wrap instead of being cut off. */
#add-results table { width: 100% !important; table-layout: fixed; }
#add-results th, #add-results td { width: auto !important; min-width: 0 !important; max-width: none !important; }
#add-results th:first-child, #add-results td:first-child { width: 2.5em !important; }
#add-results .cell-wrap { white-space: normal !important; overflow-wrap: anywhere; }
/* A 64-character image id wraps inside the large view's details instead of running out of them. */
#view-details code { overflow-wrap: anywhere; word-break: break-all; white-space: normal; }
.tab-wrapper .tab-container { flex-wrap: wrap !important; height: auto !important; overflow: visible !important; }
.tab-wrapper .overflow-menu { display: none !important; }
#large-view img { max-height: 80vh; object-fit: contain; }
@media (max-width: 640px) {
    #title h2 { font-size: 1.2rem; margin: 0; }
    #collection-line { font-size: 0.8rem; }
    #words-note { font-size: 0.8rem; }
}
"""


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts: the default theme loads its fonts from Google Fonts, and nothing
    may be loaded from outside the service."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )
