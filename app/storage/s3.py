"""Originals in S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, Backblaze B2...), through ``obstore``.

Keys are the file store's paths under the URL's prefix: ``s3://bucket/prefix/ab/cd/<sha256>.<ext>``, so a move
between the two is a plain copy. Why ``obstore`` (the Rust ``object_store`` crate) and not boto3 or s3fs:
``bench/s3_clients.py`` measured it faster against the same server (PUT and GET), it imports in milliseconds
instead of about 90 ms, it does its I/O outside the GIL (the API serves from a thread pool), and it has
conditional writes (``If-None-Match: *``), byte ranges, streamed reads, timeouts and bounded retries built in
(docs/benchmarks.md, "Object storage").

- :meth:`S3ImageStore.put` is one ``PUT If-None-Match: *``: two writers of the same bytes store them once, and an
  object is never visible half-written (S3 PUTs are atomic), so there are no temporary objects to sweep.
- Finding an id's key needs its extension: one ``LIST`` of its ``ab/cd/`` prefix (about 15 objects at a million
  originals); positive answers are cached in memory (a key never changes: it is the content's hash).
- Failures: a full store (HTTP 507, ``XMinioStorageFull``, quota errors) raises
  :class:`app.errors.StorageFullError`; a store that cannot be reached, times out (``S3_CONNECT_TIMEOUT_S``,
  ``S3_READ_TIMEOUT_S``, ``S3_MAX_RETRIES``) or refuses raises :class:`app.errors.StorageUnavailableError` (503)
  and marks the store down: from then on every call (reads and writes) is refused at once, with no wait on a dead
  or hung endpoint, and a background probe (one ``LIST``, 1 s at most, every :data:`DOWN_PROBE_EVERY_S`) marks it
  up again as soon as it answers; :meth:`S3ImageStore.health` reports the state.
- Request deadlines (``S3_REQUEST_TIMEOUT_S``): a store that hangs (a stopped server, a network that drops
  packets) answers nothing, and the client's own timeout (``S3_READ_TIMEOUT_S``) is meant for a whole large
  transfer. So each call runs on an I/O thread and the request waits for it at most ``S3_REQUEST_TIMEOUT_S``
  (one deadline for a read's ``LIST`` + ``GET`` up to the body's first chunk; a fresh one for each further chunk of
  a stream, so a large original still downloads; a ``PUT`` gets one more second per
  :data:`UPLOAD_BYTES_PER_S` of its body), then answers 503 and marks the store down. The abandoned call ends on
  its own within ``S3_READ_TIMEOUT_S``. A ``PUT`` given up on may still complete once a stopped store resumes
  (through that call, if within ``S3_READ_TIMEOUT_S``, which logs a WARNING; or later, by a store that had received
  it whole): the periodic orphan sweep (``ORPHAN_SWEEP_INTERVAL_S``, app/indexing/fsck.py) removes what it leaves.
  Messages are written here (store URL, endpoint, HTTP status); the client's own text, and so any credential, is
  never passed on.

The per-id write locks are ``flock`` files under ``DATA_DIR/.locks`` (app/locks.py), which exclude the
writers of one machine, unless :func:`app.storage.from_settings` replaces them with PostgreSQL advisory locks
(whenever a ``DATABASE_URL`` is set, with every backend), which exclude the writers of every machine sharing the
bucket.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from pathlib import Path

from app.config import Settings
from app.errors import ImageNotFoundError, StorageFullError, StorageUnavailableError
from app.ids import is_valid_image_id
from app.locks import IdLocks
from app.storage.base import (
    CHUNK_BYTES,
    ORIGINAL_NAME,
    ImageStore,
    ObjectInfo,
    ObjectStream,
    StoreEntry,
    StoreHealth,
    check_extension,
    check_id,
    key_for,
    shard_dir,
)

log = logging.getLogger(__name__)

__all__ = ["DOWN_PROBE_EVERY_S", "S3ImageStore", "UPLOAD_BYTES_PER_S"]

#: seconds between the background probes while the store is down
DOWN_PROBE_EVERY_S = 0.5
#: a PUT's deadline is ``S3_REQUEST_TIMEOUT_S`` plus one second per this many bytes of its body (a floor for the
#: upload rate: 50 MB get 12.5 s more)
UPLOAD_BYTES_PER_S = 4_000_000
_PROBE_EVERY_S = 1.0
_KEY_CACHE = 65536  # ids whose key is remembered (about 200 bytes each)
_STATUS = re.compile(r"status code: (\d{3})")
_FULL_WORDS = ("StorageFull", "QuotaExceeded", "InsufficientStorage", "XMinioStorageFull")


def _mtime(meta: dict) -> float:
    modified = meta.get("last_modified")
    return modified.timestamp() if modified is not None else 0.0


class S3ImageStore(ImageStore):
    """The originals in ``bucket`` under ``prefix`` (may be empty), through an ``obstore`` ``S3Store``.

    Args:
        bucket, prefix: from ``IMAGE_STORE_URL=s3://bucket/prefix``.
        endpoint: ``AWS_ENDPOINT_URL`` (``None``: AWS). access_key_id, secret_access_key: credentials or ``None``.
        region, path_style, connect_timeout_s, read_timeout_s, max_retries: see :class:`app.config.Settings`.
        lock_dir: folder of the per-id write lock files.
        request_timeout_s: ``S3_REQUEST_TIMEOUT_S``, the most a request waits for the store (see above).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        region: str,
        path_style: bool,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_retries: int,
        lock_dir: Path,
        request_timeout_s: float = 1.5,
    ) -> None:
        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/") + (f" at {endpoint}" if endpoint else "")
        self.locks = IdLocks(lock_dir)
        options = dict(
            endpoint=endpoint,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            region=region,
            path_style=path_style,
        )
        self._store = self._client(**options, connect_s=connect_timeout_s, total_s=read_timeout_s, retries=max_retries)
        # /health's probe: one try, short timeouts, so a dead endpoint answers within about a second.
        self._probe_store = self._client(**options, connect_s=min(connect_timeout_s, 1.0), total_s=1.0, retries=0)
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._down_reason: str | None = None
        self._probed_at = 0.0
        self._watching = False  # the background probe runs (while the store is down)
        self._closed = threading.Event()
        self.request_timeout_s = float(request_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="s3-batch")
        # Where every call to the store runs, so that a request can stop waiting for it (see the module's docstring).
        # Sized for the 16 of a batch plus the requests of the API's threads; calls a hung store holds end within
        # S3_READ_TIMEOUT_S, and new ones are refused at once meanwhile (the store is down).
        self._io = ThreadPoolExecutor(64, thread_name_prefix="s3-io")

    @classmethod
    def from_settings(cls, settings: Settings, *, bucket: str, prefix: str) -> S3ImageStore:
        """The store of ``IMAGE_STORE_URL=s3://bucket/prefix`` with the ``AWS_*`` / ``S3_*`` settings; locks under
        ``DATA_DIR/.locks``. Contacts nothing."""

        def secret(value) -> str | None:  # noqa: ANN001 - SecretStr | None
            return None if value is None else value.get_secret_value()

        return cls(
            bucket,
            prefix,
            endpoint=settings.aws_endpoint_url,
            access_key_id=secret(settings.aws_access_key_id),
            secret_access_key=secret(settings.aws_secret_access_key),
            region=settings.aws_region,
            path_style=settings.s3_path_style,
            connect_timeout_s=settings.s3_connect_timeout_s,
            read_timeout_s=settings.s3_read_timeout_s,
            max_retries=settings.s3_max_retries,
            lock_dir=settings.data_dir.resolve(),
            request_timeout_s=settings.s3_request_timeout_s,
        )

    def _client(self, *, endpoint, access_key_id, secret_access_key, region, path_style, connect_s, total_s, retries):  # noqa: ANN001
        from obstore.store import S3Store

        config: dict[str, object] = {"region": region, "virtual_hosted_style_request": not path_style}
        if endpoint:
            config["endpoint"] = endpoint
        if access_key_id:
            config["access_key_id"] = access_key_id
        if secret_access_key:
            config["secret_access_key"] = secret_access_key
        return S3Store(
            self.bucket,
            prefix=self.prefix or None,
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "connect_timeout": f"{int(connect_s * 1000)}ms",
                "timeout": f"{int(total_s * 1000)}ms",
            },
            retry_config={
                "max_retries": retries,
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=1),
                    "base": 2,
                },
                "retry_timeout": timedelta(seconds=total_s),
            },
            **config,
        )

    # --- failures -------------------------------------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> Exception:
        """The domain error for a client error; marks the store down unless the store only said it is full."""
        if isinstance(exc, (StorageUnavailableError, StorageFullError)):
            return exc  # already translated (a deadline, a store known down)
        text = str(exc)
        status = _STATUS.search(text)
        code = int(status.group(1)) if status else None
        if code == 507 or any(word in text for word in _FULL_WORDS):
            return StorageFullError(f"The object store {self.url} is full ({what}); nothing was stored.")
        if code in (401, 403):
            reason = f"refused to {what} (HTTP {code}: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket)"
        elif code == 404:
            reason = f"has no bucket '{self.bucket}' (HTTP 404 on {what}): create it first"
        elif code is not None:
            reason = f"failed to {what} (HTTP {code})"
        elif "kind: Timeout" in text or "timed out" in text.lower():
            reason = f"did not answer in time ({what})"
        else:
            reason = f"cannot be reached ({what}: connection failed)"
        return self._down(f"The object store {self.url} {reason}; retry later.")

    def _down(self, message: str) -> StorageUnavailableError:
        """Mark the store down (every call refused at once) and start the background probe that marks it up."""
        with self._lock:
            if self._down_reason is None:
                log.error("%s Requests needing it answer 503 until it answers a probe again.", message)
            self._down_reason = message
            start = not self._watching and not self._closed.is_set()
            self._watching = self._watching or start
        if start:
            threading.Thread(target=self._watch, name="s3-probe", daemon=True).start()
        return StorageUnavailableError(message)

    def _up(self) -> None:
        if self._down_reason is not None:
            with self._lock:
                if self._down_reason is not None:
                    log.warning("The object store %s answers again", self.url)
                self._down_reason = None

    def _watch(self) -> None:
        """Probe the store every :data:`DOWN_PROBE_EVERY_S` while it is down (each probe gives up after 1 s)."""
        try:
            while self._down_reason is not None and not self._closed.wait(DOWN_PROBE_EVERY_S):
                self._probe()
        finally:
            with self._lock:
                self._watching = False
            if self._down_reason is not None and not self._closed.is_set():
                self._down(self._down_reason)  # marked down again between the loop's end and the flag

    def _probe(self) -> bool:
        import obstore

        self._probed_at = time.monotonic()
        try:  # a LIST of a prefix that holds nothing: answers for the bucket too (HEAD would not)
            for _ in obstore.list(self._probe_store, prefix=".health-probe", chunk_size=1):
                break
        except Exception as exc:  # noqa: BLE001 - every failure is a degraded store
            self._failed("answer a probe", exc)
            return False
        self._up()
        return True

    def _raise_if_down(self) -> None:
        reason = self._down_reason
        if reason is not None:
            raise StorageUnavailableError(reason)

    def _call(  # noqa: ANN202
        self,
        what: str,
        fn: Callable,
        *args,  # noqa: ANN002
        until: float | None = None,
        gate: bool = True,
        mark_down: bool = True,
        **kwargs,  # noqa: ANN003
    ):
        """``fn(*args, **kwargs)`` on an I/O thread, waited for until ``until`` (monotonic; default
        ``S3_REQUEST_TIMEOUT_S`` from now). Refused at once while the store is down (unless ``gate`` is false: the
        next chunk of a stream that flows); past the deadline, marks it down (unless ``mark_down`` is false: a
        maintenance call with a long deadline, whose slowness says nothing about requests) and raises
        :class:`app.errors.StorageUnavailableError` (the call itself is left to end on its own). The call's own
        exceptions are raised as they are."""
        if gate:
            self._raise_if_down()
        started = time.monotonic()
        if until is None:
            until = started + self.request_timeout_s
        future = self._io.submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=max(0.0, until - time.monotonic()))
        except FutureTimeout:
            future.add_done_callback(functools.partial(_late, self.url, what))
            waited = round(max(0.0, until - started), 1)
            message = f"The object store {self.url} did not answer within {waited:g} s ({what}); retry later."
            raise (self._down(message) if mark_down else StorageUnavailableError(message)) from None

    def ensure_space(self) -> None:
        """Refuse a write at once (:class:`app.errors.StorageUnavailableError`) while the store is down; object
        stores report no free space, so there is no ``MIN_FREE_MB`` check."""
        self._raise_if_down()

    def health(self) -> StoreHealth:
        """``degraded`` with the reason while the store fails (the background probe watches it then); while it
        answers, probes it (one ``LIST``, about 1 s at most) at most once a second, so it notices a store that went
        down by itself."""
        now = time.monotonic()
        if self._down_reason is None and now - self._probed_at >= _PROBE_EVERY_S:
            self._probed_at = now  # before the probe: /health callers meanwhile answer from the state
            self._probe()
        reason = self._down_reason
        if reason is None:
            return StoreHealth("ok")
        return StoreHealth("degraded", f"{reason} Reads and writes answer 503.")

    # --- keys -----------------------------------------------------------------------------------------------
    def _location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{key}"

    def _list(self, prefix: str | None, until: float | None = None, *, maintenance: bool = False) -> Iterator[dict]:
        """The listing under ``prefix``, a page (1000 keys) a request; every page by ``until`` if given, else each
        within ``S3_REQUEST_TIMEOUT_S``. ``maintenance`` (the whole-bucket walk of fsck and the orphan sweep): each
        page within ``S3_READ_TIMEOUT_S``, and a slow page fails the walk without marking the store down (a page of
        1,000 keys took over 1.5 s on a loaded machine, and the sweep then made every request answer 503)."""
        import obstore

        def deadline() -> float | None:
            return time.monotonic() + self.read_timeout_s if maintenance else until

        slow_is_down = not maintenance
        try:
            pages = self._call(
                "list objects",
                obstore.list,
                self._store,
                prefix=prefix,
                chunk_size=1000,
                until=deadline(),
                mark_down=slow_is_down,
            )
            while (
                batch := self._call("list objects", next, pages, None, until=deadline(), mark_down=slow_is_down)
            ) is not None:
                yield from batch
        except Exception as exc:  # noqa: BLE001 - translated
            raise self._failed("list objects", exc) from None
        self._up()

    def _find(
        self, image_id: str, *, cached: bool = True, until: float | None = None
    ) -> tuple[str, dict | None] | None:
        """``(key, meta or None)`` of the id's object, or ``None``; the cache answers without ``meta`` (its key may
        have been deleted since, by another replica: callers that read it handle a missing object)."""
        if cached:
            with self._lock:
                key = self._keys.get(image_id)
                if key is not None:
                    self._keys.move_to_end(image_id)
                    return key, None
        for meta in self._listed(image_id, until):
            self._remember(image_id, meta["path"])
            return meta["path"], meta
        return None

    def _listed(self, image_id: str, until: float | None = None) -> Iterator[dict]:
        """The listing entries of the id's originals (normally one key; see :meth:`put`): one ``LIST`` of its
        shard."""
        for meta in self._list(shard_dir(image_id), until):
            name = meta["path"].rsplit("/", 1)[-1]
            if name.startswith(image_id + ".") and ORIGINAL_NAME.fullmatch(name):
                yield meta

    def _remember(self, image_id: str, key: str) -> None:
        with self._lock:
            self._keys[image_id] = key
            while len(self._keys) > _KEY_CACHE:
                self._keys.popitem(last=False)

    def _forget(self, image_id: str) -> None:
        with self._lock:
            self._keys.pop(image_id, None)

    # --- originals ------------------------------------------------------------------------------------------
    def put(self, image_id: str, data: bytes, extension: str) -> bool:
        """One ``PUT If-None-Match: *`` of ``ab/cd/<id>.<ext>``; ``False`` if that key exists (nothing is written).
        Raises ``ValueError``, :class:`app.errors.StorageFullError` and :class:`app.errors.StorageUnavailableError`
        (nothing is stored then).

        No ``LIST`` for the id under another extension first: the extension is a function of the bytes
        (:func:`app.imaging.decode.decode_image`), so an id always comes with the same one, and that ``LIST`` was
        half of every ingest's requests (``bench/ingest.py``: 0.78 -> 0.88 of the file store's rate on this
        machine's moto). Should the mapping ever change between versions, a second key of the same bytes may
        appear; reads serve either, and :meth:`delete` removes both."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        check_id(image_id)
        check_extension(extension)
        key = key_for(image_id, extension)
        until = time.monotonic() + self.request_timeout_s + len(data) / UPLOAD_BYTES_PER_S
        try:
            self._call(
                "store an original",
                obstore.put,
                self._store,
                key,
                data,
                mode="create",
                attributes={"Content-Type": _content_type(extension)},
                until=until,
            )
        except (AlreadyExistsError, PreconditionError):
            self._remember(image_id, key)
            return False  # another writer stored the same bytes first
        except Exception as exc:  # noqa: BLE001 - translated
            raise self._failed("store an original", exc) from None
        self._up()
        self._remember(image_id, key)
        return True

    def head(self, image_id: str) -> ObjectInfo | None:
        """Name, size (bytes) and modification time of the stored original, or ``None``; one ``LIST`` (or, for a
        cached key, one ``HEAD``)."""
        import obstore

        if not is_valid_image_id(image_id):
            return None
        until = time.monotonic() + self.request_timeout_s
        found = self._find(image_id, until=until)
        if found is None:
            return None
        key, meta = found
        if meta is None:
            try:
                meta = self._call("read an original's size", obstore.head, self._store, key, until=until)
            except FileNotFoundError:
                self._forget(image_id)  # deleted meanwhile (maybe by another replica)
                return self.head(image_id)
            except Exception as exc:  # noqa: BLE001 - translated
                raise self._failed("read an original's size", exc) from None
        return ObjectInfo(image_id, key.rsplit("/", 1)[-1], int(meta["size"]), _mtime(meta))

    def existing(self, image_ids: Iterable[str]) -> set[str]:
        """Which ids are stored: their ``head``s, 16 at a time."""
        ids = [i for i in image_ids if is_valid_image_id(i)]
        found = self._pool.map(lambda i: self.head(i) is not None, ids)
        return {i for i, ok in zip(ids, found, strict=True) if ok}

    def put_many(self, items: Sequence[tuple[str, bytes, str]]) -> list[bool]:
        """:meth:`put` of every item at once (16 requests in flight): a batch's latency is about one request's, not
        the sum. All or nothing, as :meth:`app.storage.base.ImageStore.put_many`."""
        futures = [self._pool.submit(self.put, *item) for item in items]
        results: list[bool] = []
        error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - the first is raised below, after the undo
                results.append(False)
                error = error or exc
        if error is not None:
            self._undo([item[0] for item, created in zip(items, results, strict=True) if created])
            raise error
        return results

    def get(self, image_id: str, start: int = 0, end: int | None = None) -> ObjectStream:
        """One ``GET`` (with ``Range`` when a part is asked for), streamed in chunks of about
        :data:`app.storage.base.CHUNK_BYTES`. Raises :class:`app.errors.ImageNotFoundError` and
        :class:`app.errors.StorageUnavailableError`."""
        import obstore

        check_id(image_id)
        until = time.monotonic() + self.request_timeout_s  # one deadline up to the body's first chunk
        for _ in range(2):
            found = self._find(image_id, until=until)
            if found is None:
                break
            key = found[0]
            options = {}
            if end is not None:
                options["range"] = (start, end)
            elif start:
                options["range"] = {"offset": start}
            try:
                result = self._call("read an original", obstore.get, self._store, key, options=options, until=until)
                # The first chunk within the same deadline: a store that hangs after its headers still answers 503
                # here, before the response has started (a small original is one chunk).
                stream = result.stream(min_chunk_size=64 * 1024)
                first = self._call("read an original", next, stream, None, until=until)
            except FileNotFoundError:
                self._forget(image_id)  # deleted meanwhile: look again once
                continue
            except Exception as exc:  # noqa: BLE001 - translated
                raise self._failed("read an original", exc) from None
            self._up()
            meta = result.meta
            info = ObjectInfo(image_id, key.rsplit("/", 1)[-1], int(meta["size"]), _mtime(meta))
            lo, hi = result.range
            return ObjectStream(info, lo, hi, self._chunks(stream, first))
        raise ImageNotFoundError(f"No image with id '{image_id[:80]}'.")

    def _chunks(self, stream, chunk) -> Iterator[bytes]:  # noqa: ANN001 - obstore BytesStream, Bytes | None
        """The body from its first ``chunk`` on, each further chunk within ``S3_REQUEST_TIMEOUT_S`` of asking (not
        the whole transfer: a large original downloads as long as the store keeps sending; a stream that flows is
        not cut when the store is marked down meanwhile by another request)."""
        try:
            while chunk is not None:
                view = memoryview(chunk)
                for at in range(0, len(view), CHUNK_BYTES):  # the client may hand over more at once
                    yield bytes(view[at : at + CHUNK_BYTES])
                chunk = self._call("read an original", next, stream, None, gate=False)
        except Exception as exc:  # noqa: BLE001 - translated
            raise self._failed("read an original", exc) from None

    def delete(self, image_id: str) -> bool:
        """Remove the original (every key of the id: see :meth:`put`); ``True`` if one was there. One ``LIST`` of
        the id's shard, then a ``DELETE`` per key."""
        import obstore

        if not is_valid_image_id(image_id):
            return False
        self._forget(image_id)
        keys = [meta["path"] for meta in self._listed(image_id)]
        if not keys:
            return False
        try:
            for key in keys:  # one key but for the rare case in put(); no bulk DeleteObjects (not every store has it)
                self._call("delete an original", obstore.delete, self._store, key)
        except Exception as exc:  # noqa: BLE001 - translated
            raise self._failed("delete an original", exc) from None
        self._forget(image_id)
        return True

    # --- fsck -----------------------------------------------------------------------------------------------
    def walk(self) -> Iterator[StoreEntry]:
        """Every original under the prefix (``LIST``, 1000 keys a request); S3 writes leave no temporary objects."""
        for meta in self._list(None, maintenance=True):
            parts = meta["path"].split("/")
            if len(parts) != 3:
                continue
            d1, d2, name = parts
            m = ORIGINAL_NAME.fullmatch(name)
            if m and m.group(1).startswith(d1 + d2):
                yield StoreEntry(self._location(meta["path"]), m.group(1), _mtime(meta))

    def discard(self, entry: StoreEntry) -> None:
        """Delete the object :meth:`walk` found."""
        import obstore

        base = self._location("")
        if not entry.location.startswith(base):
            raise ValueError(f"{entry.location} is not in the store")
        if entry.image_id is not None:
            self._forget(entry.image_id)
        try:
            self._call("delete an original", obstore.delete, self._store, entry.location[len(base) :])
        except Exception as exc:  # noqa: BLE001 - translated
            raise self._failed("delete an original", exc) from None

    def close(self) -> None:
        """Stop the request pools and the background probe, and close the locks."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
        super().close()


def _late(url: str, what: str, future) -> None:  # noqa: ANN001 - Future
    """An abandoned call's outcome: an upload that completed after the request gave up is logged (its original has
    no row; the periodic sweep removes it after ORPHAN_GRACE_S); anything else is dropped."""
    if future.exception() is None and what == "store an original":
        log.warning(
            "An upload to %s given up on (503) completed late; the sweep removes its original once older than "
            "ORPHAN_GRACE_S unless it gets a row",
            url,
        )


def _content_type(extension: str) -> str:
    import mimetypes

    return mimetypes.guess_type(f"x.{extension}")[0] or "application/octet-stream"
