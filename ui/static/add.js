// The Add view: thumbnails of the chosen files, then POST /index_images in batches that respect MAX_BATCH_FILES and
// MAX_BATCH_MB, a progress bar across batches, and one ✓/✗ line per file with the service's reason for each failure.
// The chosen list is cleared once sent; the report stays until the next batch.

import { getKey, request } from "./api.js";
import { $, el, photos, say } from "./util.js";

let ctx;
let chosen = []; // [{file, url}]
let busy = false;
const PREVIEW_SIZE = 160; // px, server-made previews of files the browser cannot show

/** Add files to the chosen list (from the picker, a drop or a paste); nothing is filtered by type here. */
export function addFiles(files) {
  if (busy) return;
  say($("#add-message"), null);
  $("#add-report").replaceChildren();
  for (const file of files) {
    const item = { file, url: URL.createObjectURL(file) };
    chosen.push(item);
    $("#add-chosen").append(thumb(item));
  }
  update();
}

function thumb(item) {
  const img = el("img", { alt: item.file.name, src: item.url, decoding: "async" });
  const li = el("li", { title: item.file.name }, img, el("span", { textContent: item.file.name }));
  // Browsers cannot show HEIC, TIFF or JPEG XL: ask the server for a small JPEG when it may be asked.
  img.addEventListener("error", () => serverPreview(item, img), { once: true });
  return li;
}

async function serverPreview(item, img) {
  const data = new FormData();
  data.append("file", item.file, item.file.name);
  try {
    const blob = await (await request(`/preview?size=${PREVIEW_SIZE}`, { method: "POST", form: data })).blob();
    URL.revokeObjectURL(item.url);
    item.url = URL.createObjectURL(blob);
    img.src = item.url;
  } catch {
    img.replaceWith(el("span", { className: "noimg", textContent: "no preview" }));
  }
}

function clearChosen() {
  for (const item of chosen) URL.revokeObjectURL(item.url);
  chosen = [];
  $("#add-chosen").replaceChildren();
  update();
}

function update() {
  const refused = ctx.config.writes_refused;
  $("#add-start").disabled = busy || !chosen.length || !!refused;
  $("#add-clear").disabled = busy || !chosen.length;
  $("#add-start").textContent = chosen.length ? `Add ${photos(chosen.length)}` : "Add to collection";
}

/** Split files into requests within the service's limits (a file over the byte limit goes alone and is refused). */
function batches(files) {
  const maxFiles = ctx.config.max_batch_files;
  // Leave room for the multipart headers of each part.
  const maxBytes = ctx.config.max_batch_mb * 1_000_000 * 0.95;
  const out = [];
  let current = [];
  let bytes = 0;
  for (const file of files) {
    if (current.length && (current.length >= maxFiles || bytes + file.size > maxBytes)) {
      out.push(current);
      current = [];
      bytes = 0;
    }
    current.push(file);
    bytes += file.size;
  }
  if (current.length) out.push(current);
  return out;
}

function reportLine(name, ok, text) {
  return el(
    "li",
    { className: ok ? "ok" : "failed" },
    el("span", { className: "name", textContent: name }),
    " — ",
    el("span", { className: ok ? "status" : "reason", textContent: text }),
  );
}

async function start() {
  if (!chosen.length || busy) return;
  if (ctx.config.writes_need_key && !(await ensureKey())) return;
  busy = true;
  update();
  const files = chosen.map((c) => c.file);
  const groups = batches(files);
  const progress = $("#add-progress");
  const progressText = $("#add-progress-text");
  progress.max = files.length;
  progress.value = 0;
  progress.hidden = groups.length < 2 && files.length < 8; // a bar only where a wait is likely
  progressText.hidden = progress.hidden;
  const report = $("#add-report");
  report.replaceChildren();
  say($("#add-message"), `Adding ${photos(files.length)}…`);
  let done = 0;
  const counts = { indexed: 0, exists: 0, error: 0 };
  let stopped = null;
  for (const group of groups) {
    progressText.textContent = `${done.toLocaleString("en-US")} of ${photos(files.length)} sent`;
    const data = new FormData();
    for (const file of group) data.append("files", file, file.name);
    try {
      const { results } = await (await request("/index_images", { method: "POST", form: data })).json();
      for (const r of results) {
        counts[r.status] += 1;
        if (r.status === "indexed") report.append(reportLine(r.filename, true, "added"));
        else if (r.status === "exists") report.append(reportLine(r.filename, true, "already in the collection"));
        else report.append(reportLine(r.filename, false, r.detail || "could not be added"));
      }
    } catch (err) {
      for (const file of group) {
        counts.error += 1;
        report.append(reportLine(file.name, false, err.message));
      }
      if (err.status === 401 || err.status === 403 || err.status === 0) {
        stopped = err;
        break;
      }
    }
    done += group.length;
    progress.value = done;
  }
  progressText.textContent = `${done.toLocaleString("en-US")} of ${photos(files.length)} sent`;
  busy = false;
  clearChosen();
  const parts = [];
  if (counts.indexed) parts.push(`${photos(counts.indexed)} added`);
  if (counts.exists) parts.push(`${counts.exists.toLocaleString("en-US")} already in the collection`);
  if (counts.error) parts.push(`${counts.error.toLocaleString("en-US")} could not be added`);
  const summary = parts.join(", ") + ".";
  say($("#add-message"), stopped ? `Stopped: ${stopped.message} ${summary}` : summary, counts.error ? "error" : "info");
  progress.hidden = true;
  ctx.refreshCollection();
}

async function ensureKey() {
  if (getKey()) return true;
  await ctx.askKey("Adding photos needs the service's API key.");
  return !!getKey();
}

export function initAdd(context) {
  ctx = context;
  if (ctx.config.writes_refused) {
    $("#add-note").textContent = ctx.config.writes_refused;
    $("#add-note").hidden = false;
  }
  $("#add-files").addEventListener("change", (e) => {
    addFiles([...e.target.files]);
    e.target.value = "";
  });
  $("#add-start").addEventListener("click", start);
  $("#add-clear").addEventListener("click", () => {
    clearChosen();
    say($("#add-message"), null);
  });
  update();
}
