// The Duplicates view: groups of near-identical photos from GET /duplicates (the neighbour graph the service builds
// with POST /jobs/neighbours), a similarity threshold slider, a button that (re)builds the graph with progress, and,
// where writes are allowed, deleting chosen photos of a group after a confirmation.

import { BlobUrls, getJSON, getKey, request, showImage, withQuery } from "./api.js";
import { $, confirmAction, el, formatDate, photos, say } from "./util.js";

const PAGE = 20; // groups per request
const THUMB_SIZE = 256;
const POLL_MS = 1000;
const RUNNING = new Set(["queued", "running"]); // the job's other states: completed, failed, interrupted

let ctx;
let groups = [];
let offset = 0;
let loading = 0; // sequence number of the latest load
let polling = null;
let thresholdSet = false; // the slider starts at the service's DUPLICATE_THRESHOLD, from the first answer
const urls = new BlobUrls();

const message = () => $("#dup-message");
const threshold = () => Number($("#dup-threshold").value);

/** Show the view: load the groups for the current threshold (called when the mode is opened). */
export function showDuplicates() {
  load();
}

async function load({ append = false } = {}) {
  const seq = ++loading;
  if (!append) {
    offset = 0;
    groups = [];
  }
  say(message(), append ? null : "Looking for duplicates…");
  let page;
  try {
    const t = thresholdSet ? threshold().toFixed(2) : undefined;
    page = await getJSON(withQuery("/duplicates", { threshold: t, offset, limit: PAGE }));
  } catch (err) {
    if (seq !== loading) return;
    if (!append) render([]);
    if (err.status === 409) {
      say(message(), `${err.message} Choose “Find duplicates” to look for them now.`);
      $("#dup-build").textContent = "Find duplicates";
    } else if (err.status === 404 || err.status === 405) {
      say(message(), "This service cannot find duplicates (its API has no GET /duplicates).", "error");
    } else {
      say(message(), err.message, "error");
    }
    return;
  }
  if (seq !== loading) return;
  if (!thresholdSet) {
    thresholdSet = true;
    $("#dup-threshold").value = String(page.threshold);
    $("#dup-threshold-value").textContent = threshold().toFixed(2);
  }
  groups = append ? groups.concat(page.groups) : page.groups;
  offset = groups.length;
  $("#dup-build").textContent = "Find duplicates again";
  const built = page.graph_built_at ? ` Last looked for on ${formatDate(page.graph_built_at)}.` : "";
  say(
    message(),
    groups.length
      ? `${total(page)} at similarity ${threshold().toFixed(2)} or more.${built}`
      : `No duplicates at similarity ${threshold().toFixed(2)} or more.${built}`,
  );
  if (append) page.groups.forEach((g) => $("#dup-groups").append(group(g)));
  else render(groups);
  $("#dup-more").hidden = page.total !== undefined ? groups.length >= page.total : page.groups.length < PAGE;
}

function total(page) {
  const n = page.total ?? groups.length;
  return `${n.toLocaleString("en-US")} ${n === 1 ? "group" : "groups"}`;
}

function render(list) {
  urls.revokeAll();
  $("#dup-groups").replaceChildren(...list.map(group));
  $("#dup-more").hidden = true;
}

function canDelete() {
  return !ctx.config.writes_refused;
}

function group(g) {
  const box = el("section", { className: "dup-group" });
  const range = g.min_score === g.max_score ? g.min_score.toFixed(3) : `${g.min_score.toFixed(3)}–${g.max_score.toFixed(3)}`;
  box.append(el("h3", { textContent: `${photos(g.ids.length)}, similarity ${range}` }));
  const grid = el("ol", { className: "grid" });
  g.ids.forEach((id, i) => {
    const name = g.filenames[i];
    const img = el("img", { alt: name, decoding: "async" });
    showImage(img, `/image/${id}/thumbnail?size=${THUMB_SIZE}`, urls);
    const item = el(
      "li",
      { className: "result", dataset: { id } },
      el("div", { className: "thumb", title: name }, img),
      el("div", { className: "caption", title: name }, el("span", { className: "name", textContent: name })),
    );
    if (canDelete()) {
      item.append(el("label", { className: "pick" }, el("input", { type: "checkbox", value: id }), "Choose"));
    }
    grid.append(item);
  });
  box.append(grid);
  if (canDelete()) {
    const button = el("button", { type: "button", className: "danger delete", textContent: "Delete chosen", disabled: true });
    grid.addEventListener("change", () => {
      button.disabled = !grid.querySelector("input:checked");
    });
    button.addEventListener("click", () => deleteChosen(box, grid, button));
    box.append(el("p", {}, button));
  }
  return box;
}

async function deleteChosen(box, grid, button) {
  const ids = [...grid.querySelectorAll("input:checked")].map((i) => i.value);
  if (!ids.length) return;
  const names = ids.map((id) => grid.querySelector(`li[data-id="${id}"] .name`).textContent);
  const ok = await confirmAction(
    `Delete ${photos(ids.length)} (${names.join(", ")}) from the collection? The originals are removed too; this cannot be undone.`,
  );
  if (!ok) return;
  if (ctx.config.writes_need_key && !getKey()) {
    await ctx.askKey("Deleting photos needs the service's API key.");
    if (!getKey()) return;
  }
  button.disabled = true;
  const failed = [];
  for (const id of ids) {
    try {
      await request(`/image/${id}`, { method: "DELETE" });
      grid.querySelector(`li[data-id="${id}"]`).remove();
    } catch (err) {
      failed.push(`${grid.querySelector(`li[data-id="${id}"] .name`).textContent}: ${err.message}`);
    }
  }
  if (grid.children.length < 2) box.remove();
  say(
    message(),
    failed.length ? `Not deleted: ${failed.join("; ")}` : `Deleted ${photos(ids.length)}.`,
    failed.length ? "error" : "info",
  );
  ctx.refreshCollection();
}

/** Start POST /jobs/neighbours and follow it with GET /jobs/{id} until it ends, then show the new groups. */
async function build() {
  if (polling) return;
  if (ctx.config.writes_need_key && !getKey()) {
    await ctx.askKey("Finding duplicates needs the service's API key.");
    if (!getKey()) return;
  }
  const button = $("#dup-build");
  const progress = $("#dup-progress");
  const text = $("#dup-progress-text");
  button.disabled = true;
  let job;
  try {
    job = await (await request("/jobs/neighbours", { method: "POST" })).json();
  } catch (err) {
    say(message(), err.message, "error");
    button.disabled = false;
    return;
  }
  progress.hidden = false;
  say(message(), "Comparing every photo with its nearest neighbours…");
  polling = true;
  try {
    while (RUNNING.has(job.state)) {
      showProgress(job, progress, text);
      await new Promise((r) => setTimeout(r, POLL_MS));
      job = await getJSON(`/jobs/${encodeURIComponent(job.id)}`);
    }
    showProgress(job, progress, text);
    if (job.state === "completed") {
      await load();
    } else {
      // failed (with its error), or interrupted by a restart of the service (it resumes by itself)
      say(message(), `Finding duplicates stopped (${job.state}): ${job.error || "the service restarted; it resumes."}`, "error");
    }
  } catch (err) {
    say(message(), err.message, "error");
  } finally {
    polling = null;
    button.disabled = false;
    progress.hidden = true;
    text.textContent = "";
  }
}

function showProgress(job, progress, text) {
  if (job.total) {
    progress.max = job.total;
    progress.value = job.done || 0;
    const verb = job.phase === "dba" ? "refined" : "compared";
    text.textContent = `${(job.done || 0).toLocaleString("en-US")} of ${photos(job.total)} ${verb}`;
  } else {
    progress.removeAttribute("value"); // indeterminate
    text.textContent = job.state;
  }
}

export function initDuplicates(context) {
  ctx = context;
  const slider = $("#dup-threshold");
  const show = () => {
    $("#dup-threshold-value").textContent = threshold().toFixed(2);
  };
  show();
  slider.addEventListener("input", show);
  slider.addEventListener("change", () => load());
  $("#dup-build").addEventListener("click", build);
  $("#dup-more").addEventListener("click", () => load({ append: true }));
  if (ctx.config.writes_refused) $("#dup-build").disabled = true;
}
