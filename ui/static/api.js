// The service's REST API as the page uses it: every call carries the API key (X-API-Key) once one was entered,
// errors become ApiError with the service's own words ({"detail"}), and images that need the key are loaded with
// fetch + blob URLs, since a plain <img src> cannot send a header. The key is never put in a URL or a cookie.

const KEY_STORAGE = "image-search.api-key";

/** An HTTP error answer: `status` and the service's `detail` message. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** The key entered in this tab (sessionStorage: gone when the tab closes), or null. */
export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** Whether images must be fetched with the key (API_KEY_READS); set from /ui/config.json. */
let readsNeedKey = false;
export function setReadsNeedKey(value) {
  readsNeedKey = value;
}

/** Called with the ApiError of any 401, so the page can ask for the key; set by the page. */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

function headers(extra = {}) {
  const key = getKey();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

async function errorOf(response) {
  let detail = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) {
      // FastAPI's validation errors: [{loc, msg}, ...]
      detail = body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, detail);
}

/**
 * fetch() a path of the service (relative to the site root, e.g. "/stats") with the key.
 * Returns the Response when it is OK; throws ApiError otherwise (and tells the page about 401s).
 */
export async function request(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(url(path), init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "The service cannot be reached. Check your connection and try again.");
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/** The site root of the service: the page lives at <root>/ui/, so "../" of it (works behind a path prefix). */
const ROOT = new URL("../", document.baseURI);

/** An absolute URL for a service path like "/stats" or "/image/ID/thumbnail?size=384". */
export function url(path) {
  return new URL(path.replace(/^\//, ""), ROOT).href;
}

/** A search path with its query string; empty values are left out. */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    q.set(name, String(value));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/**
 * Blob URLs made for images, per owner (a results list, the viewer...), so they can be revoked together when the
 * owner's content is replaced. Without revoking, every page of results would keep its image bytes alive.
 */
export class BlobUrls {
  constructor() {
    this.urls = new Set();
  }
  make(blob) {
    const u = URL.createObjectURL(blob);
    this.urls.add(u);
    return u;
  }
  revokeAll() {
    for (const u of this.urls) URL.revokeObjectURL(u);
    this.urls.clear();
  }
}

/**
 * Show a service image (a thumbnail or an original) in `img`: a plain src when reads need no key (the browser
 * caches it), else fetched with the key into a blob URL owned by `owner`. Resolves when the image is shown;
 * never throws (a failed image gets alt text and the `failed` class).
 */
export async function showImage(img, path, owner) {
  try {
    if (!readsNeedKey) {
      img.src = url(path);
    } else {
      const blob = await (await request(path)).blob();
      img.src = owner.make(blob);
    }
    await img.decode();
  } catch {
    img.classList.add("failed");
  }
}

/** The bytes of a service file as a Blob, with the key. */
export async function getBlob(path) {
  return (await request(path)).blob();
}
