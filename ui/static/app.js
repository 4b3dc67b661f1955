// The web UI's entry point: asks for the API key first when the service needs one, then fills in the collection
// line and the About panel, wires the modes (Search, Add, Duplicates, About), drop-anywhere and paste-anywhere, and
// runs the search a shared link holds.

import { getJSON, getKey, setKey, setReadsNeedKey, setUnauthorizedHandler } from "./api.js";
import { addFiles, initAdd } from "./add.js";
import { initDuplicates, showDuplicates } from "./duplicates.js";
import { applyHash, initSearch, isSearchHash, resetSearch, searchByFile } from "./search.js";
import { $, el, photos, say } from "./util.js";

const ctx = {
  config: null, // GET /ui/config.json
  health: null, // GET /health
  stats: null, // GET /stats
  count: null,
  defaultTopK: 20,
  mode: "search",
  askKey,
  refreshCollection,
};

// --- the API key ----------------------------------------------------------------------------------------------------
let keyPrompt = null; // the pending prompt, so several 401s at once ask once
const SKIPPED = "image-search.key-skipped"; // sessionStorage: the user chose to search without a key

/**
 * Ask for the API key (a modal dialog) and resolve with it once entered; when reads need the key, the key is
 * checked with GET /stats first and the dialog stays until a valid one is given. Unless reads need the key, the
 * dialog also has a button labelled `skip` (and Escape) that resolves with null; `remember` keeps that choice for
 * the tab (the start-up prompt's "Search without a key").
 */
function askKey(why, { skip = "Cancel", remember = false } = {}) {
  const optional = !ctx.config.reads_need_key;
  if (keyPrompt) return keyPrompt;
  const dialog = $("#key-dialog");
  $("#key-why").textContent = why;
  say($("#key-error"), null);
  $("#key-input").value = "";
  $("#key-skip").hidden = !optional;
  $("#key-skip").textContent = skip;
  $("#key-input").required = !optional;
  keyPrompt = new Promise((resolve) => {
    const finish = (key) => {
      dialog.removeEventListener("submit", onSubmit);
      $("#key-skip").removeEventListener("click", onSkip);
      dialog.removeEventListener("cancel", onSkip);
      dialog.close();
      keyPrompt = null;
      $("#forget-key").hidden = !key;
      resolve(key);
    };
    const onSkip = (e) => {
      e.preventDefault(); // Escape would close the dialog without an answer
      if (!optional) return; // nothing works without the key
      if (remember) sessionStorage.setItem(SKIPPED, "1");
      finish(null);
    };
    const onSubmit = async (e) => {
      e.preventDefault();
      const key = $("#key-input").value.trim();
      if (!key) return;
      setKey(key);
      if (ctx.config.reads_need_key) {
        try {
          await getJSON("/stats");
        } catch (err) {
          setKey(null);
          say($("#key-error"), err.status === 401 ? "This key is not valid." : err.message, "error");
          return;
        }
      }
      finish(key);
    };
    dialog.addEventListener("submit", onSubmit);
    $("#key-skip").addEventListener("click", onSkip);
    dialog.addEventListener("cancel", onSkip);
  });
  dialog.showModal();
  return keyPrompt;
}

async function onUnauthorized(err) {
  setKey(null);
  $("#forget-key").hidden = true;
  await askKey(`${err.message} Enter the service's API key.`);
  refreshCollection();
}

function forgetKey() {
  setKey(null);
  sessionStorage.removeItem(SKIPPED);
  $("#forget-key").hidden = true;
  if (ctx.config.reads_need_key) {
    resetSearch();
    $("#collection").textContent = "";
    askKey("Key forgotten. Enter the service's API key to go on.").then(() => refreshCollection());
  }
}

// --- the collection line and About ----------------------------------------------------------------------------------
async function refreshCollection() {
  try {
    ctx.stats = await getJSON("/stats");
    ctx.count = ctx.stats.count;
    $("#collection").textContent = photos(ctx.stats.count);
    $("#collection").title = "";
  } catch (err) {
    if (err.status === 401) return;
    $("#collection").textContent = "Collection unavailable";
    $("#collection").title = err.message;
  }
  renderAbout();
}

function renderAbout() {
  const h = ctx.health;
  const s = ctx.stats;
  const rows = [
    ["Photos", s ? s.count.toLocaleString("en-US") : "unknown"],
    ["Model", h.model.id],
    ["Dimensions", String(h.model.dimension)],
    ["Search by words", h.model.supports_text ? "yes" : "no (image-only model)"],
    ["Runs on", h.model.device],
    ["Database", h.backend],
    ["Status", h.status === "ok" ? "ok" : `${h.status}: ${h.problems.join("; ")}`],
    ["API key", ctx.config.reads_need_key ? "needed for everything" : ctx.config.writes_need_key ? "needed to add or delete" : "not needed"],
  ];
  $("#about").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
}

// --- modes ----------------------------------------------------------------------------------------------------------
function setMode(mode) {
  ctx.mode = mode;
  for (const button of document.querySelectorAll(".mode")) {
    if (button.dataset.mode === mode) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.dataset.mode !== mode;
  if (mode === "duplicates") showDuplicates();
  if (mode === "about") refreshCollection();
}

// --- drop anywhere, paste anywhere ----------------------------------------------------------------------------------
// No check of MIME type or extension here: Chromium gives .HEIC/.HEIF files an empty type, and the server decides.
function filesOf(dataTransfer) {
  return dataTransfer ? [...dataTransfer.files] : [];
}

function takeFiles(files) {
  if (!files.length) return;
  if (ctx.mode === "add") {
    addFiles(files);
  } else {
    setMode("search");
    searchByFile(files[0]);
  }
}

function wireDropAndPaste() {
  const overlay = $("#drop-overlay");
  let depth = 0;
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    overlay.querySelector("p").textContent = ctx.mode === "add" ? "Drop to add" : "Drop to search";
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (hasFiles(e)) e.preventDefault(); // allows the drop
  });
  document.addEventListener("drop", (e) => {
    depth = 0;
    overlay.hidden = true;
    const files = filesOf(e.dataTransfer);
    if (!files.length) return;
    e.preventDefault(); // or the browser opens the file
    takeFiles(files);
  });
  document.addEventListener("paste", (e) => {
    const files = filesOf(e.clipboardData);
    if (!files.length) return; // pasting words into a box stays a normal paste
    e.preventDefault();
    takeFiles(files);
  });
}

// --- start ----------------------------------------------------------------------------------------------------------
async function start() {
  setUnauthorizedHandler(onUnauthorized);
  try {
    ctx.config = await getJSON("/ui/config.json");
  } catch (err) {
    say($("#search-message"), `The service does not answer: ${err.message}`, "error");
    return;
  }
  setReadsNeedKey(ctx.config.reads_need_key);
  // The page's own number of results per page: a grid wants more than the API's default of 5.
  ctx.defaultTopK = Math.min(Math.max(ctx.config.default_top_k, 20), ctx.config.max_top_k);
  if (ctx.config.reads_need_key) {
    if (getKey()) {
      try {
        await getJSON("/stats");
      } catch {
        // A 401 made onUnauthorized ask for the key (awaited below); any other failure shows in the collection line.
      }
    } else {
      await askKey("This service needs its API key before it shows anything.");
    }
    if (keyPrompt) await keyPrompt;
  } else if (ctx.config.writes_need_key && !getKey() && !sessionStorage.getItem(SKIPPED)) {
    await askKey("Adding and deleting photos needs the service's API key. Searching works without it.", {
      skip: "Search without a key",
      remember: true,
    });
  }
  $("#forget-key").hidden = !getKey();
  ctx.health = await getJSON("/health").catch((err) => ({
    status: "unavailable",
    problems: [err.message],
    backend: "unknown",
    model: { id: "unknown", dimension: 0, device: "unknown", supports_text: false },
  }));
  await refreshCollection();

  initSearch(ctx);
  initAdd(ctx);
  initDuplicates(ctx);
  for (const button of document.querySelectorAll(".mode")) {
    button.addEventListener("click", () => setMode(button.dataset.mode));
  }
  $("#home-link").addEventListener("click", (e) => {
    e.preventDefault();
    setMode("search");
    resetSearch();
    history.pushState(null, "", location.pathname + location.search);
  });
  $("#forget-key").addEventListener("click", forgetKey);
  wireDropAndPaste();
  window.addEventListener("popstate", () => {
    if (isSearchHash(location.hash)) setMode("search");
    applyHash(location.hash);
  });
  if (isSearchHash(location.hash)) applyHash(location.hash);
  document.body.dataset.ready = "true"; // for tests and scripts: the page is wired
}

start();
