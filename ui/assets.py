"""What the web UI's page looks like and runs in the browser, apart from Gradio's own: the CSS, the JavaScript
snippets its events run, and the theme. :mod:`ui.mount` hands ``CSS``, :func:`page_js` (``PASTE_JS``, the
accessibility fix-ups of ``A11Y_JS`` and the Add tab's size check ``ADD_LIMIT_JS``) and :func:`theme` to
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
    """Frontend code run when a search is triggered, before it is sent: the first of its ``n_inputs`` inputs (a
    hidden number; first, so that the handlers can take the filters as ``*filter_values`` after it) becomes this
    tab's next trigger number. The server runs searches on several threads, which may start in another order than
    the browser triggered them (a filter's blur and the next filter's Enter within a few ms); the number lets the
    server drop one that an already started, later-triggered search supersedes."""
    return (
        f"(...args) => {{ const a = args.slice(0, {n_inputs}); "
        "a[0] = (window.__imageSearchSeq = (window.__imageSearchSeq || 0) + 1); return a; }"
    )


#: Runs after a search: on a phone the photo box and the word boxes fill the screen, so the page scrolls to the
#: results (the search status line above them); a keyboard focus the search took away goes to that line.
SHOW_RESULTS_JS = """() => {
    const status = document.getElementById("search-status");
    if (!status || !status.textContent.trim()) return;
    if (window.innerWidth <= 640) status.scrollIntoView({ block: "start" });
    // The focus was on something the search took away (the photo box's upload button once a photo is chosen,
    // "More like this" in the closed large view): it goes to the status line, one Tab before the first result.
    // Looked at once the page has drawn the search's other outputs (the large view hides in the same update).
    requestAnimationFrame(() => setTimeout(() => {
        const focused = document.activeElement;
        if (!focused || focused === document.body || focused.offsetParent === null) {
            status.tabIndex = -1;
            status.focus({ preventScroll: window.innerWidth > 640 });
        }
    }, 50));
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

#: Runs once when the page loads (with PASTE_JS: page_js): what Gradio 6.31's components lack for keyboard and
#: screen-reader users, worked around in the page because Gradio has no parameter for it (issue #28; axe-core's
#: rule in brackets). Each fix-up is applied again whenever Gradio redraws (a MutationObserver, at most once a frame):
#: - upload boxes are named "Click to upload or drop files" while they show "Drop File Here - or - Click to
#:   Upload" (label-content-name-mismatch, WCAG 2.5.3): their name becomes the text they show;
#: - gallery thumbnails are named "Thumbnail 1 of 8" while they show their caption, which their image repeats as
#:   its alt text (label-content-name-mismatch, image-redundant-alt): the caption is their name, the image is
#:   decoration;
#: - the button Gradio wraps a shown image in (the query photo, the large view) does nothing unless the image is
#:   selectable: it leaves the Tab order (its name is the image's alt text, set by the server);
#: - a slider sends its ``release`` event (what reruns the search) only on a pointer's release or when its number
#:   box loses the focus: arrow, Page and Home/End keys on the slider, and Enter in its number box, send it too;
#: - Escape in the large view closes it (its "Close" button).
A11Y_JS = """() => {
    const fix = () => {
        document.querySelectorAll(".upload-container[aria-label]").forEach((b) => b.removeAttribute("aria-label"));
        document.querySelectorAll("button.thumbnail-item").forEach((b) => {
            if (!b.querySelector(".caption-label")) return;
            if (b.hasAttribute("aria-label")) b.removeAttribute("aria-label");
            const img = b.querySelector("img");
            if (img && img.getAttribute("alt") !== "") img.setAttribute("alt", "");
        });
        document.querySelectorAll(".image-container > button:not(.icon-button)").forEach((b) => {
            if (b.tabIndex !== -1) b.tabIndex = -1;
        });
    };
    let queued = false;
    new MutationObserver(() => {
        if (queued) return;
        queued = true;
        requestAnimationFrame(() => { queued = false; fix(); });
    }).observe(document.body, {
        subtree: true, childList: true, attributes: true, attributeFilter: ["aria-label", "alt"],
    });
    fix();
    const slider = (el) => el instanceof HTMLInputElement && el.closest(".block")
        && el.closest(".block").querySelector("input[type=range]");
    const release = (el) => el.dispatchEvent(new PointerEvent("pointerup", { bubbles: true }));
    const keys = ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"];
    document.addEventListener("keyup", (e) => {
        if (e.target.type === "range" && keys.includes(e.key) && slider(e.target)) release(e.target);
    });
    document.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && e.target.type === "number" && slider(e.target)) release(e.target);
        if (e.key === "Escape" && e.target.closest && e.target.closest("#large-view")) {
            const close = document.getElementById("close-view");
            if (close) close.click();
        }
    });
}"""

#: Runs once when the page loads (:func:`page_js` fills in the limit): a choice of files for the Add tab (chosen,
#: dropped or pasted) over MAX_BATCH_MB in total is stopped before Gradio uploads it, with a sentence under the file
#: box that names the limit and says what to do. Gradio would send it, get the upload route's 413 (one request
#: carries the whole choice: app.api.limits) and show "HTTP 413: {...}" in a toast. The sentence goes with the next
#: choice, a Clear or an Add. Sizes in MB of 10^6 bytes, as the settings count them.
ADD_LIMIT_JS = """(limit, limitMb) => {
    const box = () => document.getElementById("add-files");
    const say = (text) => {
        let note = document.getElementById("add-too-large");
        if (!text) { if (note) note.remove(); return; }
        if (!note) {
            note = document.createElement("p");
            note.id = "add-too-large";
            note.setAttribute("role", "alert");
            box().insertAdjacentElement("afterend", note);
        }
        note.textContent = text;
    };
    // Whether the files are over the limit: then the event stops here, before Gradio's own listeners.
    const refused = (event, files) => {
        const total = [...files].reduce((sum, f) => sum + f.size, 0);
        if (total <= limit) { say(""); return false; }
        event.preventDefault();
        event.stopImmediatePropagation();
        let mb = (total / 1e6).toFixed(1);
        if (parseFloat(mb) <= limitMb) mb = (total / 1e6).toFixed(3);
        const what = files.length === 1
            ? `The file chosen is ${mb} MB`
            : `The ${files.length} files chosen are ${mb} MB together`;
        say(`${what}; one Add takes at most ${limitMb} MB (MAX_BATCH_MB). `
            + "Choose fewer files, and add the others in another go.");
        return true;
    };
    const inBox = (el) => { const b = box(); return b && el instanceof Node && b.contains(el); };
    document.addEventListener("change", (e) => {
        if (e.target instanceof HTMLInputElement && e.target.type === "file" && inBox(e.target)
            && refused(e, e.target.files || [])) e.target.value = "";
    }, true);
    document.addEventListener("drop", (e) => {
        if (inBox(e.target) && e.dataTransfer && refused(e, e.dataTransfer.files)) {
            const zone = e.target.closest(".upload-container");  // Gradio's "dragging" look ends with its drop
            if (zone) zone.dispatchEvent(new DragEvent("dragleave", { bubbles: true }));
        }
    }, true);
    document.addEventListener("click", (e) => {
        if (e.target instanceof Element && e.target.closest("#add-button, #add-files button[aria-label='Clear']")) {
            say("");
        }
    }, true);
}"""


def page_js(max_batch_bytes: int, max_batch_mb: float) -> str:
    """What the page runs once when it loads (``gr.mount_gradio_app``'s ``js``): PASTE_JS, A11Y_JS and
    ADD_LIMIT_JS with the service's MAX_BATCH_MB (``max_batch_bytes``: the same in bytes)."""
    return (
        f"() => {{ ({PASTE_JS})(); ({A11Y_JS})(); ({ADD_LIMIT_JS})({int(max_batch_bytes)}, {float(max_batch_mb):g}); }}"
    )


#: Runs when a result's large view is opened (after its event): the keyboard focus goes into the view, on its
#: details (the file name is read first; Download and "More like this" are the next Tabs); the result it was opened
#: from is remembered for CLOSE_VIEW_JS.
OPEN_VIEW_JS = """() => {
    const items = [...document.querySelectorAll("#results .thumbnail-item")];
    const from = items.indexOf(document.activeElement);
    if (from >= 0) window.__imageSearchOpener = from;
    let tries = 0;
    const go = () => {
        const view = document.getElementById("large-view");
        const details = document.getElementById("view-details");
        if (view && details && view.offsetParent !== null) {
            details.tabIndex = -1;
            details.focus();
        } else if (tries++ < 100) requestAnimationFrame(go);
    };
    go();
}"""

#: Runs when the large view is closed: the focus goes back to the result it was opened from.
CLOSE_VIEW_JS = """() => {
    const items = document.querySelectorAll("#results .thumbnail-item");
    const item = items[window.__imageSearchOpener || 0];
    if (item) item.focus();
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
#title h1 { font-size: var(--text-xxl); margin: 0; }
/* An empty photo box or results box shows nothing (Gradio's placeholder is a div with a name but no role). */
#query-preview:has(> .empty), #results:has(> .empty) { display: none !important; }
/* The large view's id wraps instead of scrolling the details sideways. */
#view-details code { overflow-wrap: anywhere; white-space: normal; }
/* A visible keyboard focus everywhere (WCAG 2.4.7): Gradio draws none on buttons, thumbnails and tabs. */
:focus-visible, #view-details:focus { outline: 3px solid #1d4ed8 !important; outline-offset: 2px; }
@media (max-width: 640px) {
    #title h1 { font-size: 1.2rem; margin: 0; }
    #collection-line { font-size: 0.8rem; }
    #words-note { font-size: 0.8rem; }
}
"""


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts (the default theme loads its fonts from Google Fonts, and nothing
    may be loaded from outside the service) and colours dark enough to read (WCAG 2.2 AA contrast)."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    ).set(
        # WCAG 2.2 AA contrast (4.5:1 for text; axe-core's color-contrast): white on Gradio's orange-500 primary
        # buttons is 2.8:1, on orange-700 5.2:1; white on its red-500 "stop" buttons 3.8:1, on red-700 6.5:1; its
        # subdued text (neutral-400: "- or -", the slider's bounds, the footer) is 2.3:1 on white, neutral-600 7.7:1.
        button_primary_background_fill="*primary_700",
        button_primary_background_fill_hover="*primary_800",
        button_primary_border_color="*primary_700",
        button_primary_border_color_hover="*primary_800",
        button_primary_background_fill_dark="*primary_700",
        button_primary_background_fill_hover_dark="*primary_800",
        button_primary_border_color_dark="*primary_700",
        button_cancel_background_fill="#b91c1c",
        button_cancel_background_fill_hover="#991b1b",
        body_text_color_subdued="*neutral_600",
    )
