// The search view: the query (an image, words, words to avoid, filters), the results grid, "load more", "more like
// this", and the large view of one result. The address bar holds the query (#id=...&text=...&top_k=...), so a link
// runs the same search when opened; an uploaded file cannot travel in a link, but "more like this" on any result can.

import { ApiError, BlobUrls, getBlob, request, showImage, withQuery } from "./api.js";
import { $, baseName, el, formatBytes, formatDate, say, saveBlob, sha256Hex } from "./util.js";

/** Formats Chromium, Firefox and Safari show themselves; anything else is shown as a server-made JPEG. */
const BROWSER_FORMATS = new Set(["JPEG", "MPO", "PNG", "GIF", "WEBP", "AVIF", "BMP"]);
const THUMB_SIZE = 384; // px, the grid's thumbnails (cached by the browser and the server's HTTP headers)
const LARGE_SIZE = 1024; // px, the large view of formats browsers cannot show
const PREVIEW_SIZE = 512; // px, the query image's preview

let ctx; // {config, health} from app.js
const query = { image: null, text: "", not: "" }; // image: {file, name} | {id, name}
let results = [];
let exhausted = false;
let controller = null; // aborts the search in flight when a newer one starts
let searchSeq = 0;
const resultUrls = new BlobUrls();
const previewUrls = new BlobUrls();
const viewerUrls = new BlobUrls();
let viewing = null; // the result in the large view
let pendingPreview = null; // the uploaded query file whose preview is still to be asked for
let lastHash = "";

const form = () => $("#search-form");
const message = () => $("#search-message");

// --- the options and the address bar ------------------------------------------------------------------------------
function options() {
  const formats = [...document.querySelectorAll('#options input[name="format"]:checked')].map((i) => i.value);
  const minScore = $("#opt-min-score").value.trim();
  const topK = parseInt($("#opt-top-k").value, 10);
  return {
    folder: $("#opt-folder").value.trim(),
    formats,
    takenAfter: $("#opt-taken-after").value,
    takenBefore: $("#opt-taken-before").value,
    minScore: minScore === "" ? "" : Number(minScore),
    expand: $("#opt-expand").checked,
    topK: Number.isFinite(topK) && topK > 0 ? Math.min(topK, ctx.config.max_top_k) : ctx.defaultTopK,
  };
}

function setOptions(o) {
  $("#opt-folder").value = o.folder || "";
  for (const box of document.querySelectorAll('#options input[name="format"]')) {
    box.checked = (o.formats || []).includes(box.value);
  }
  $("#opt-taken-after").value = o.takenAfter || "";
  $("#opt-taken-before").value = o.takenBefore || "";
  $("#opt-min-score").value = o.minScore ?? "";
  $("#opt-expand").checked = !!o.expand;
  $("#opt-top-k").value = o.topK || ctx.defaultTopK;
  const filtered = o.folder || (o.formats || []).length || o.takenAfter || o.takenBefore || o.minScore !== "";
  if (filtered) $("#options").open = true;
}

/** The day after a yyyy-mm-dd date: "taken until" a day includes that whole day (the API's end is exclusive). */
function dayAfter(date) {
  const d = new Date(`${date}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + 1);
  return d.toISOString().slice(0, 10);
}

/** The query-string parameters every search endpoint takes: paging, options and filters. */
function searchParams(o, offset) {
  return {
    top_k: o.topK,
    offset: offset || undefined,
    min_score: o.minScore,
    expand: o.expand ? "true" : undefined,
    path_prefix: o.folder,
    formats: o.formats.join(","),
    taken_after: o.takenAfter ? `${o.takenAfter}T00:00:00Z` : undefined,
    taken_before: o.takenBefore ? `${dayAfter(o.takenBefore)}T00:00:00Z` : undefined,
  };
}

/** The address-bar form of the current query, "" when there is nothing to share. */
function hashOf() {
  const o = options();
  const p = new URLSearchParams();
  if (query.image?.id) {
    p.set("id", query.image.id);
    if (query.image.name) p.set("name", query.image.name);
  }
  if (query.text) p.set("text", query.text);
  if (query.not) p.set("not", query.not);
  if (![...p.keys()].length) return "";
  if (o.folder) p.set("folder", o.folder);
  if (o.formats.length) p.set("formats", o.formats.join(","));
  if (o.takenAfter) p.set("taken_after", o.takenAfter);
  if (o.takenBefore) p.set("taken_before", o.takenBefore);
  if (o.minScore !== "") p.set("min_score", String(o.minScore));
  if (o.expand) p.set("expand", "1");
  if (o.topK !== ctx.defaultTopK) p.set("top_k", String(o.topK));
  return `#${p.toString()}`;
}

function writeHash() {
  const hash = hashOf();
  lastHash = hash;
  if (hash !== location.hash && !(hash === "" && location.hash === "")) {
    history.pushState(null, "", hash || location.pathname + location.search);
  }
}

/** Whether `hash` describes a search (as opposed to "#mode=add" or nothing). */
export function isSearchHash(hash) {
  const p = new URLSearchParams(hash.replace(/^#/, ""));
  return p.has("id") || p.has("text") || p.has("not");
}

/** Load the query and options from the address bar and run it (opening a shared link, Back/Forward). */
export function applyHash(hash) {
  if (hash === lastHash && (results.length || !isSearchHash(hash))) return;
  lastHash = hash;
  const p = new URLSearchParams(hash.replace(/^#/, ""));
  const id = p.get("id");
  setQueryImage(id ? { id, name: p.get("name") || "" } : null, { run: false });
  query.text = p.get("text") || "";
  query.not = p.get("not") || "";
  $("#query-text").value = query.text;
  $("#query-not").value = query.not;
  const topK = parseInt(p.get("top_k") || "", 10);
  setOptions({
    folder: p.get("folder") || "",
    formats: (p.get("formats") || "").split(",").filter(Boolean),
    takenAfter: p.get("taken_after") || "",
    takenBefore: p.get("taken_before") || "",
    minScore: p.has("min_score") ? Number(p.get("min_score")) : "",
    expand: p.get("expand") === "1",
    topK: Number.isFinite(topK) ? topK : ctx.defaultTopK,
  });
  runSearch({ push: false });
}

// --- the query image ------------------------------------------------------------------------------------------------
/** Set (or with null remove) the query image: {file, name} from an upload, or {id, name} of a stored image. */
export function setQueryImage(image, { run = true } = {}) {
  previewUrls.revokeAll();
  query.image = image;
  const img = $("#query-preview-img");
  img.removeAttribute("src");
  img.classList.remove("failed");
  $("#query-empty").hidden = !!image;
  $("#query-preview").hidden = !image;
  $("#query-name").textContent = image ? image.name || "A photo of the collection" : "";
  $("#query-name").title = image?.name || "";
  // An upload's preview is asked for once its search has answered (runSearch): both decode the file, and for a
  // 12 MP HEIC on a small server the two decodes at once would delay the results, which matter more.
  pendingPreview = image?.file ? image.file : null;
  if (image?.file && !run) startPreview();
  else if (image?.id) showImage(img, `/image/${image.id}/thumbnail?size=${PREVIEW_SIZE}`, previewUrls);
  if (image) clearResults(); // the old query's results are not results of this one
  if (run) runSearch();
}

/** Resolves when the first result's thumbnail has loaded or failed (at once when there is none). */
function firstThumbnailShown() {
  const img = $("#results li img");
  if (!img) return Promise.resolve();
  if (img.complete && img.src) return Promise.resolve();
  return new Promise((resolve) => {
    img.addEventListener("load", resolve, { once: true });
    img.addEventListener("error", resolve, { once: true });
    setTimeout(resolve, 3000); // a thumbnail fetched with the key may not have a src yet; never wait long
  });
}

function startPreview() {
  if (!pendingPreview) return;
  const file = pendingPreview;
  pendingPreview = null;
  showPreview(file, $("#query-preview-img"));
}

/** The query upload as the server sees it: a JPEG it made, so HEIC, TIFF or JPEG XL show too. */
async function showPreview(file, img) {
  const data = new FormData();
  data.append("file", file, file.name);
  try {
    const blob = await (await request(`/preview?size=${PREVIEW_SIZE}`, { method: "POST", form: data })).blob();
    if (query.image?.file !== file) return; // replaced meanwhile
    img.src = previewUrls.make(blob);
  } catch {
    img.classList.add("failed");
    img.alt = "No preview: the service could not read this file";
  }
}

/** Search by a file the user chose, dropped or pasted; the server decides whether it is an image. */
export function searchByFile(file) {
  setQueryImage({ file, name: file.name || "Pasted image" });
}

/** "More like this": search by a stored image. */
export function searchById(id, name) {
  $("#viewer").close();
  setQueryImage({ id, name });
  window.scrollTo({ top: 0 });
}

// --- searching ----------------------------------------------------------------------------------------------------
function clearResults() {
  resultUrls.revokeAll();
  results = [];
  exhausted = true;
  $("#results").replaceChildren();
  $("#load-more").hidden = true;
}

/** Run the current query (a new search, or with append the next page). */
export async function runSearch({ append = false, push = true } = {}) {
  query.text = $("#query-text").value.trim();
  query.not = $("#query-not").value.trim();
  if (!append && push) writeHash();
  controller?.abort();
  const seq = ++searchSeq;
  if (!query.image && !query.text && !query.not) {
    $("#results").removeAttribute("aria-busy");
    clearResults();
    say(message(), null);
    return;
  }
  if ((query.text || query.not) && !ctx.health.model.supports_text) {
    $("#results").removeAttribute("aria-busy");
    clearResults();
    say(message(), textNote(), "error");
    return;
  }
  controller = new AbortController();
  const o = options();
  const offset = append ? results.length : 0;
  const params = searchParams(o, offset);
  if (!append) say(message(), "Searching…");
  $("#load-more").disabled = true;
  $("#results").setAttribute("aria-busy", "true"); // dims what is shown until the answer replaces it
  try {
    const response = await send(params, controller.signal);
    if (seq !== searchSeq) return;
    const page = (await response.json()).results;
    if (!append) clearResults();
    results.push(...page);
    exhausted = page.length < o.topK;
    render(page);
    if (!results.length) {
      say(message(), emptyMessage(o));
    } else {
      say(message(), null);
      if (!append) revealFirstResult();
    }
  } catch (err) {
    if (err.name === "AbortError" || seq !== searchSeq) return;
    if (!append) clearResults();
    say(message(), describe(err), "error");
  } finally {
    if (seq === searchSeq) {
      // The upload's preview decodes the file again: ask for it once the first thumbnail is on screen.
      if (!append) firstThumbnailShown().then(startPreview);
      $("#results").removeAttribute("aria-busy");
      $("#load-more").hidden = exhausted || !results.length;
      $("#load-more").disabled = false;
    }
  }
}

/** One request for the current query; which endpoint depends on what the query holds. */
async function send(params, signal) {
  const { image, text, not } = query;
  if (image && !text && !not) {
    if (image.file) {
      const data = new FormData();
      data.append("file", image.file, image.file.name || "pasted-image");
      return request(withQuery("/search_image", params), { method: "POST", form: data, signal });
    }
    return request(withQuery(`/image/${encodeURIComponent(image.id)}/similar`, params), { signal });
  }
  if (!image && text && !not) {
    return request(withQuery("/search_text", params), { method: "POST", json: { query: text }, signal });
  }
  // Combined: like this image and/or these words, but not those words (POST /search, by stored image id).
  const positive = [];
  if (image) {
    const id = image.id || (await sha256Hex(image.file));
    if (!id) throw new ApiError(0, "This browser cannot combine an uploaded photo with words here; use “More like this” on a result instead.");
    positive.push({ image_id: id });
  }
  if (text) positive.push({ text });
  if (!positive.length) throw new ApiError(0, "Say what to look for too: a photo or words, not only what to leave out.");
  const negative = not ? [{ text: not }] : [];
  try {
    return await request(withQuery("/search", params), { method: "POST", json: { positive, negative }, signal });
  } catch (err) {
    if (err.status === 404 && image?.file) {
      throw new ApiError(404, "This photo is not in the collection, so it cannot be combined with words: add it first, or use “More like this” on a result.");
    }
    throw err;
  }
}

function describe(err) {
  if (err.status === 401) return "The service needs a valid API key for this.";
  return err.message || "The search failed.";
}

function emptyMessage(o) {
  const filtered = o.folder || o.formats.length || o.takenAfter || o.takenBefore || o.minScore !== "";
  if (ctx.count === 0) return "The collection is empty: add photos under “Add” first.";
  return filtered ? "Nothing matches these filters." : "No results.";
}

export function textNote() {
  return (
    `Search by words needs a model that understands text (a CLIP model). This service runs ` +
    `${ctx.health.model.id}, which compares pictures only: search with a photo instead.`
  );
}

/** On a phone the query sits above the results: make sure the first result is on screen after a search. */
function revealFirstResult() {
  const first = $("#results li");
  if (!first) return;
  const box = first.getBoundingClientRect();
  if (box.top > window.innerHeight - 80 || box.top < 0) first.scrollIntoView({ block: "start", behavior: "instant" });
}

function render(page) {
  const list = $("#results");
  for (const hit of page) list.append(card(hit));
}

function card(hit) {
  // The first row is what the user waits for: fetched first; results far down load when scrolled near.
  const img = el("img", {
    alt: hit.filename,
    decoding: "async",
    fetchPriority: hit.rank <= 6 ? "high" : "auto",
    loading: hit.rank > 24 ? "lazy" : "eager",
  });
  const open = el("button", { type: "button", className: "thumb", title: hit.filename }, img);
  open.addEventListener("click", () => openViewer(hit));
  const similar = el("button", { type: "button", className: "similar", textContent: "More like this" });
  similar.addEventListener("click", () => searchById(hit.id, hit.filename));
  const caption = el(
    "div",
    { className: "caption", title: hit.filename },
    el("span", { className: "rank", textContent: `#${hit.rank}` }),
    el("span", { className: "score", textContent: hit.score.toFixed(3), title: "Similarity score (1 = identical)" }),
    el("span", { className: "name", textContent: hit.filename }),
  );
  showImage(img, `/image/${hit.id}/thumbnail?size=${THUMB_SIZE}`, resultUrls);
  return el("li", { className: "result", dataset: { id: hit.id, rank: String(hit.rank) } }, open, caption, similar);
}

// --- the large view -------------------------------------------------------------------------------------------------
function openViewer(hit) {
  viewerUrls.revokeAll();
  viewing = hit;
  const dialog = $("#viewer");
  const img = $("#viewer-img");
  img.removeAttribute("src");
  img.alt = hit.filename;
  $("#viewer-name").textContent = hit.filename;
  const facts = [
    ["File name", hit.filename],
    ["Format", hit.format],
    ["Size", `${hit.width.toLocaleString("en-US")} × ${hit.height.toLocaleString("en-US")} pixels`],
    ["File size", formatBytes(hit.bytes)],
    ["Taken", formatDate(hit.taken_at)],
    ["Indexed", formatDate(hit.indexed_at)],
    ["Score", `${hit.score.toFixed(3)} (rank ${hit.rank})`],
  ];
  $("#viewer-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
  say($("#viewer-message"), null);
  dialog.showModal();
  // The original when the browser can show it, else a large JPEG the server makes (HEIC, TIFF, JPEG XL...).
  const path = BROWSER_FORMATS.has(hit.format) ? `/image/${hit.id}` : `/image/${hit.id}/thumbnail?size=${LARGE_SIZE}`;
  showImage(img, path, viewerUrls);
}

async function downloadOriginal() {
  const hit = viewing;
  const button = $("#viewer-download");
  button.disabled = true;
  try {
    saveBlob(await getBlob(`/image/${hit.id}`), baseName(hit.filename));
  } catch (err) {
    say($("#viewer-message"), describe(err), "error");
  } finally {
    button.disabled = false;
  }
}

// --- wiring -------------------------------------------------------------------------------------------------------
export function initSearch(context) {
  ctx = context;
  $("#opt-top-k").max = String(ctx.config.max_top_k);
  $("#opt-top-k").value = String(ctx.defaultTopK);
  if (!ctx.health.model.supports_text) {
    for (const input of [$("#query-text"), $("#query-not")]) input.disabled = true;
    $("#text-note").textContent = textNote();
    $("#text-note").hidden = false;
  }
  form().addEventListener("submit", (e) => {
    e.preventDefault();
    runSearch();
  });
  $("#query-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = ""; // choosing the same file again searches again
    if (file) searchByFile(file);
  });
  $("#query-clear").addEventListener("click", () => setQueryImage(null));
  // Any filter or option re-runs the search (number inputs: on change, i.e. when committed, not on every key).
  for (const input of document.querySelectorAll("#options input")) {
    input.addEventListener("change", () => {
      if (query.image || query.text || query.not) runSearch();
      else writeHash();
    });
  }
  // Clearing a word box (its × or emptying it) clears stale results when nothing else is asked.
  for (const input of [$("#query-text"), $("#query-not")]) {
    input.addEventListener("search", () => {
      if (!input.value && (results.length || message().textContent)) runSearch();
    });
  }
  $("#load-more").addEventListener("click", () => runSearch({ append: true }));
  $("#viewer-download").addEventListener("click", downloadOriginal);
  $("#viewer-similar").addEventListener("click", () => searchById(viewing.id, viewing.filename));
  $("#viewer").addEventListener("close", () => {
    viewerUrls.revokeAll();
    $("#viewer-img").removeAttribute("src");
  });
}

/** Forget everything shown (after "Forget key"). */
export function resetSearch() {
  controller?.abort();
  searchSeq += 1;
  $("#results").removeAttribute("aria-busy");
  clearResults();
  setQueryImage(null, { run: false });
  say(message(), null);
}
