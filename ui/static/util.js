// Small helpers the views share: building elements, showing messages, wording numbers, sizes and dates.

/** document.createElement with properties (className, textContent, title, ...) and children. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** Show `text` in a message element (kind "error" styles it as one); no text hides it. */
export function say(node, text, kind = "info") {
  node.textContent = text || "";
  node.classList.toggle("error", kind === "error");
  node.hidden = !text;
}

/** "1 photo", "9,146 photos". */
export function photos(n) {
  return `${n.toLocaleString("en-US")} ${n === 1 ? "photo" : "photos"}`;
}

/** Bytes in words: "2.8 MB", "512 KB" (powers of 1000, as file managers show them). */
export function formatBytes(n) {
  if (n < 1000) return `${n} bytes`;
  const units = ["KB", "MB", "GB", "TB"];
  let value = n;
  let unit = -1;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** An ISO 8601 time as the reader's local date and time; "unknown" for none. */
export function formatDate(iso) {
  if (!iso) return "unknown";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** The last part of a stored name ("trips/2024/IMG_1.HEIC" -> "IMG_1.HEIC"): what a download is saved as. */
export function baseName(name) {
  const parts = String(name).split(/[\\/]/);
  return parts[parts.length - 1] || "image";
}

/** Save a Blob under `filename` through an <a download> with a blob URL (revoked once the download started). */
export function saveBlob(blob, filename) {
  const href = URL.createObjectURL(blob);
  const a = el("a", { href, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

/** Hex SHA-256 of a File, or null where the browser offers no WebCrypto (plain-HTTP pages on other hosts). */
export async function sha256Hex(file) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Ask a yes/no question in the page's confirmation dialog; resolves true for yes. */
export function confirmAction(text, okLabel = "Delete") {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}
