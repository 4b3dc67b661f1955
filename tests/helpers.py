"""Helpers the tests share: paths of the project and the real datasets, settings and servers for a test, images.

Fixtures live in ``conftest.py``; plain functions and constants live here, so test modules import them from one
place (``from tests.helpers import ...``) instead of from each other.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image, ImageOps
from psycopg import sql

from app.config import Settings
from app.errors import ImageNotFoundError
from app.ids import image_id_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
"""``../shared/datasets``: real images with ground truth. The whole suite refuses to run without it (conftest)."""
INSTANCE = DATASETS / "instance_small" / "images"
FORMATS = DATASETS / "formats"

BULK_SUMMARY = re.compile(
    r"scanned (\d+) files: (\d+) already indexed, (\d+) indexed, (\d+) failed \(([\d.]+) img/s\)(?:; (\d+) not done)?"
)
"""The last line ``scripts/bulk_index.py`` prints (group 6: files a stopped run never got to, when there are any)."""


def load_rgb(path: Path) -> Image.Image:
    """A dataset image as the service sees it: EXIF orientation applied, RGB."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def assert_unit_rows(emb: np.ndarray, n: int, d: int) -> None:
    """``emb`` is ``(n, d)`` float32, finite, every row of unit L2 norm."""
    assert emb.shape == (n, d) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two ``(N, D)`` arrays of unit rows."""
    return np.sum(a * b, axis=1)


def symlink(target: Path, link: Path) -> None:
    """``link`` -> ``target``, creating ``link``'s folders: builds test folder trees without copying datasets."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def create_database(pg_server) -> str:
    """Create an empty database on the session server and return its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_server.get_uri(name)


#: Database deadlines for tests of what a search or an index answers, not of how the service meets a slow database:
#: a stall of the shared 2-core CI machine (over a second has been seen) must not turn a pooled-connection wait
#: (DB_REQUEST_TIMEOUT_S, 0.5 s) or a query (DB_STATEMENT_TIMEOUT_S, 1.5 s) into a 503 there. One fresh-clone run
#: of two failed so (issue #25): test_search_features' second /search answered without results and logged nothing,
#: as a one-off 503 from a deadline does (the breaker's probe then succeeds; a 500 would log its traceback).
#: The fault tests (test_hang, test_self_healing, test_shared_state, ...) keep the production defaults.
CI_STALL_DEADLINES = {"db_request_timeout_s": 5.0, "db_statement_timeout_s": 10.0}


def make_settings(data_dir: Path, database_url: str, **overrides) -> Settings:
    """Settings for a test: its own data dir and database, the offline model, no UI unless asked, and TestClient's
    Host (``testserver``) allowed next to the loopback names of live servers (ALLOWED_HOSTS). No MEMORY_LIMIT_MB:
    an app served inside pytest shares its process with everything the session loaded, so its resident memory says
    nothing about the app (tests/test_memory_bound.py tests the limit on a server process of its own)."""
    values = dict(
        data_dir=data_dir,
        database_url=database_url,
        embedder="efficientnet",
        ui_enabled=False,
        allowed_hosts="testserver,localhost,127.0.0.1,[::1]",
        memory_limit_mb=0,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def free_port(ports: range | None = None) -> int:
    """A free loopback port: any the system picks, or one of ``ports`` (a range a test was given to stay in)."""
    if ports is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in random.sample(ports, len(ports)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


@contextmanager
def run_live_server(app, ports: range | None = None, **options) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port (one of ``ports`` if given) in a thread; yields the base
    URL. ``options``: more ``uvicorn.Config`` arguments (e.g. :func:`app.api.connections.server_options`)."""
    import uvicorn

    port = free_port(ports)
    options.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


REDIS_SERVER = os.environ.get("REDIS_SERVER", "/usr/bin/redis-server")
"""Debian's redis-server (``apt-get install redis-server``; ``.ci/run`` installs it)."""

LIVE_REDIS_TIMEOUT_MS = 500.0
"""CACHE_REDIS_TIMEOUT_MS for tests that count a live Redis's hits and errors exactly: a loopback Redis answers in
well under 1 ms, but the default 50 ms would turn a stall of a shared CI machine into a counted error. Tests of a
hung Redis keep a short timeout of their own."""


def system_binary_or_skip(path: str, apt_package: str, variable: str) -> str:
    """``path`` of a program the tests run from Debian's packages (``.ci/run`` installs them); skips the test
    without it, except under ``CI=true`` where that is a failure. ``variable``: the environment variable that
    points at another path."""
    import pytest

    if shutil.which(path) or Path(path).is_file():
        return path
    reason = f"{apt_package} is not installed at {path} (apt-get install {apt_package}; or set {variable} to its path)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def redis_server_or_skip() -> str:
    """The redis-server binary (see :func:`system_binary_or_skip`)."""
    return system_binary_or_skip(REDIS_SERVER, "redis-server", "REDIS_SERVER")


class RedisServer:
    """A real ``redis-server`` process on a free loopback port, owned by one test: started, killed (``kill -9``),
    paused (SIGSTOP) and restarted on the same port, and always stopped by :meth:`stop`.

    No persistence (``--save ""``, no AOF): a restart comes back empty, like a cache that lost its memory.
    ``extra`` are more ``--option value`` arguments (e.g. ``--maxmemory 2mb``).
    """

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.binary = redis_server_or_skip()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--daemonize", "no", *self.extra]
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.RedisError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log_text = (self.workdir / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server did not start: {log_text}") from exc
                time.sleep(0.02)
            finally:
                client.close()
        return self

    def client(self):
        """A plain redis-py client of this server (the test's own view of what is stored)."""
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """``kill -9``: no shutdown, the sockets just die."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop it if it runs (also when paused)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoS3:
    """moto's standalone S3 server (``moto_server``) as its own process on a loopback port: the S3 protocol over
    HTTP for the object-store tests (no patched client). :meth:`stop` and :meth:`start` again on the same port
    stand for an outage (moto keeps its data in memory, so a restart comes back empty)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> MotoS3:
        import subprocess
        import sys

        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto_server did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def create_bucket(self, name: str | None = None) -> str:
        """A new, empty bucket (moto does not check request signatures, so a plain PUT makes it)."""
        import httpx

        name = name or f"b-{uuid.uuid4().hex[:16]}"
        httpx.put(f"{self.endpoint}/{name}", timeout=10).raise_for_status()
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every key in ``bucket`` (first 1000)."""
        import httpx

        text = httpx.get(f"{self.endpoint}/{bucket}?list-type=2", timeout=10).text
        return re.findall(r"<Key>([^<]+)</Key>", text)


class PostgresFreeze:
    """``SIGSTOP`` / ``SIGCONT`` of the embedded PostgreSQL whose data directory is ``pgdata`` (its postmaster and
    every child at the time of :meth:`suspend`): a database that hangs without closing its sockets. :meth:`resume`
    may be called more than once (put it in a ``finally``)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.processes: list = []

    def suspend(self) -> None:
        import psutil

        from app.vectordb.watchdog import postmaster_pid

        pid = postmaster_pid(self.pgdata)
        assert pid is not None, f"no postmaster in {self.pgdata}"
        postmaster = psutil.Process(pid)
        self.processes = [postmaster, *postmaster.children(recursive=True)]
        for p in self.processes:
            p.suspend()

    def resume(self) -> None:
        import psutil

        for p in self.processes:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass


class PostgresProxy:
    """A TCP proxy in front of PostgreSQL that forwards everything, with two delays a loaded database shows:

    - ``connect_delay_s``: every new connection reaches the server that late (its start-up message waits): a new
      backend on a machine whose CPUs are taken;
    - ``marker`` / ``stall_s``: the first client message holding ``marker`` (a query's text) is held ``stall_s``
      seconds before it goes on: a database that answers one query slowly, as one under write load can.

    Real sockets, real server; ``url`` is ``database_url`` through it. :meth:`close` stops taking connections."""

    def __init__(
        self, database_url: str, *, marker: bytes | None = None, stall_s: float = 0.0, connect_delay_s: float = 0.0
    ) -> None:
        from urllib.parse import parse_qs, urlsplit

        self.marker, self.stall_s, self.stalled = marker, stall_s, threading.Event()
        self.connect_delay_s = connect_delay_s
        self.connections = 0  # taken so far
        parts = urlsplit(database_url)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        if socket_dir.startswith("/"):  # the session's embedded server listens on a Unix socket
            self.target = str(next(Path(socket_dir).glob(".s.PGSQL.*")))
        else:
            self.target = (parts.hostname, parts.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        user = parts.netloc.rpartition("@")[0]
        self.url = f"postgresql://{user}@127.0.0.1:{self.listener.getsockname()[1]}{parts.path}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        time.sleep(self.connect_delay_s)
        if isinstance(self.target, str):
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
        else:
            server = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self.marker and self.marker in data and not self.stalled.is_set():
                    self.stalled.set()
                    time.sleep(self.stall_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@contextmanager
def milvus_lite_server(data_dir: Path) -> Iterator[tuple[str, object]]:
    """Milvus Lite's own gRPC server (``python -m milvus_lite server``) as a process of its own on a free loopback
    port: a Milvus server that several service processes reach by ``MILVUS_URI`` (Lite 3 otherwise runs inside one
    process) and that a test can stop (``SIGSTOP``). Yields ``(uri, psutil.Popen)``; terminated (resumed first) at
    the end. Raises ``AssertionError`` if it does not listen within 60 s."""
    import sys

    import psutil

    port = free_port()
    server = psutil.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir)]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # importing milvus_lite takes seconds on a loaded machine
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "milvus-lite server did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", server
    finally:
        try:
            server.resume()  # never leave it stopped
        except psutil.NoSuchProcess:
            pass
        server.terminate()
        try:
            server.wait(timeout=10)
        except psutil.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test-access-key-AKIA", "AWS_SECRET_ACCESS_KEY": "test-secret-do-not-leak"}
"""Credentials the object-store tests configure (moto accepts any), so they can check none of them leaks."""


def s3_settings(data_dir: Path, database_url: str, moto: MotoS3, bucket: str, prefix: str = "originals", **kw):
    """:func:`make_settings` with ``IMAGE_STORE_URL=s3://bucket/prefix`` on the moto server."""
    return make_settings(
        data_dir,
        database_url,
        image_store_url=f"s3://{bucket}/{prefix}",
        aws_endpoint_url=moto.endpoint,
        aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        **kw,
    )


# --- write races: index and delete of the same bytes from threads and from a second process -------------------
WRITER_PROCESS = """
import random, sys, time
from pathlib import Path
from app.config import Settings
from app.errors import ImageNotFoundError
from app.ids import image_id_for
from app.service import SearchService

files = [Path(p).read_bytes() for p in sys.argv[2:]]
stop = Path(sys.argv[1])
service = SearchService.open(Settings())
print("ready", flush=True)
ops = 0
try:
    while not stop.exists():
        data = random.choice(files)
        if random.random() < 0.5:
            service.index_image(data, "other-process")
        else:
            try:
                service.delete_image(image_id_for(data))
            except ImageNotFoundError:
                pass
        ops += 1
finally:
    service.close()
print("ops", ops, flush=True)
"""
"""The second writer of the race tests: the service's own code, with the settings of its environment (the same
database and image store as the test's service, or another replica's ``DATA_DIR``), indexing and deleting the same
files at random until a stop file appears; then it prints how many operations it made."""


class WriterProcess:
    """:data:`WRITER_PROCESS` in a process of its own, started here; a context manager that always stops it.

    Args:
        env: its whole environment (the settings it opens the service with).
        files: the images it indexes and deletes.
        stop: a path that does not exist yet; :meth:`finish` creates it.
    """

    def __init__(self, env: dict[str, str], files: list[Path], stop: Path) -> None:
        self.stop = stop
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER_PROCESS, str(stop), *map(str, files)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self) -> None:
        """Block until its service is open and it writes (fails the test with its stderr if it died first)."""
        assert self.process.stdout.readline().strip() == "ready", self.process.stderr.read()

    def finish(self, timeout_s: float = 120) -> int:
        """Stop it by the stop file; asserts it exited 0 and returns how many index/delete operations it made."""
        self.stop.touch()
        out, err = self.process.communicate(timeout=timeout_s)
        assert self.process.returncode == 0, err
        return int(out.split()[-1])

    def kill(self) -> None:
        """``kill -9``, wherever it is in a write."""
        self.process.kill()
        self.process.wait(timeout=30)

    def __enter__(self) -> WriterProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.touch()
        if self.process.poll() is None:
            self.kill()


def race_index_and_delete(
    service, datas: list[bytes], rounds: int, seed: int, indexers: int = 1, deleter=None
) -> list[str]:
    """``rounds`` races on ``service`` (a :class:`app.service.SearchService`), each of one of ``datas`` drawn at
    random (``seed``): ``indexers`` threads index it while one deletes it after a random 0-0.1 s delay (so the delete
    lands anywhere inside an index's decode-embed-save-upsert), all released at once by a barrier; a thread left
    running after 60 s fails the test. ``deleter``: another service (another replica) that deletes; default
    ``service``.

    After each round, under the id's write lock (no writer that respects the locks, thread or process, on this
    machine or another, is between original and row then), the row and the original must both exist or neither.
    Returns the ids of the rounds where they did not (an empty list when every round left them consistent).
    """
    rng = random.Random(seed)
    broken: list[str] = []
    for _ in range(rounds):
        data = rng.choice(datas)
        image_id = image_id_for(data)
        barrier = threading.Barrier(indexers + 1)

        def index(data=data, barrier=barrier) -> None:
            barrier.wait()
            service.index_image(data, "race")

        delay = rng.uniform(0, 0.1)

        def delete(image_id=image_id, barrier=barrier, delay=delay) -> None:
            barrier.wait()
            time.sleep(delay)
            try:
                (deleter or service).delete_image(image_id)
            except ImageNotFoundError:
                pass

        threads = [threading.Thread(target=f) for f in (index, delete, *[index] * (indexers - 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
        with service.store.locks.hold([image_id]):
            row = bool(service.db.existing_ids([image_id]))
            if row != (service.store.head(image_id) is not None):
                broken.append(image_id)
    return broken


def run_fsck(env: dict[str, str], *args: str, timeout_s: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """``scripts/fsck.py --json *args`` in its own process with ``env`` (its whole environment); returns the process
    and its JSON report (``{}`` when it exits with another code than 0 or 1: then it printed none)."""
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts/fsck.py"), "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return proc, json.loads(proc.stdout.splitlines()[-1]) if proc.returncode in (0, 1) else {}
