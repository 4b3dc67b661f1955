"""The Compose stack end to end: build the image, start app + db + redis, index, search, restart, scale, tear down.

Run it with ``make test-docker``, which first sets up a Docker engine and local stand-in base images where the
project's shared tools provide them, then runs ``pytest -m docker tests/docker``. ``make test`` (and so ``.ci/run``)
deselects it through ``-m "not docker"`` in pyproject's addopts: it builds a multi-GB image and takes many minutes.
Every test here is skipped, with the reason, when no Docker engine answers.

What it proves, in order, on the default stack (``docker-compose.yml`` with no profile: app + PostgreSQL/pgvector
+ Redis):

1. the image builds with no container registry reachable: once with ``--no-cache`` (every layer rebuilt; the
   report counts the files pip downloaded and those it took from its cache mount) and once more, unchanged, with
   the layer cache (``conftest.py``'s session fixture builds it once for every module here;
   ``test_scale_profile.py`` starts the same image);
2. ``docker compose up --wait`` with ``API_KEY`` set turns healthy; ``/health`` (database and ``cache: ok``),
   ``/docs`` and the Gradio UI answer: ``/ui/``, its ``/ui/config`` (Gradio 6) and API info (``/search``), an
   upload into Gradio's temp folder and a ``/search`` call through ``gradio_client``; the app container writes
   nothing outside ``/tmp`` and its volumes (``docker diff``: the image's files stay as built, Gradio's uploads
   go to ``/tmp/gradio``) and reaches nothing outside the Compose network, so the UI needs no internet;
3. ``PHOTOS_DIR`` (20 real photos copied into a temporary folder) is mounted read-only at ``/photos`` and is the
   library ``photos`` (``LIBRARY_ROOTS``' Compose default), whose first scan started before the app first
   answered: ``GET /libraries/photos`` shows the 20 indexed, searches find them as ``photos/<path>``,
   ``GET /image/{id}`` answers the file's bytes, and the images volume holds no file (nothing was copied); a
   photo added to the folder is indexed by ``POST /libraries/photos/scan``;
4. the app runs as uid/gid 10001, the database and Redis ports are not published, and the app port only on
   127.0.0.1 (``APP_BIND``'s default);
5. ``scripts/bulk_index.py`` indexes 50 real images from ``../shared/datasets`` through the published port, and
   searching finds them; a photo that is not indexed, searched twice, is computed once and then a cache hit
   (``/stats`` ``cache``), and its embedding is in Redis;
6. after ``docker compose down`` and ``up`` the count and an original survive (named volumes), and that photo is
   a Redis hit in the new app container (the ``redis-data`` volume kept the cache); the library is not scanned
   again (its state is in the database) and still serves its files;
7. with ``read_only: true`` and a tmpfs on ``/tmp`` (an extra override file) the app starts, takes a Gradio upload
   and searches: it needs nothing writable outside its volumes and ``/tmp``;
8. ``APP_PORT=<a range> docker compose up --scale app=2`` (docs/docker.md): two app containers on one
   database, images volume, photo folder and Redis; a photo embedded by one is a Redis hit in the other, and each
   serves the other's counts and originals, and the library's files;
9. ``docker compose down -v`` removes everything the project made (containers, network, volumes); at the end of
   the session the image is removed too (and the Redis stand-in, when the session built one).

The ``redis`` image docker-compose.yml names is used when the local store has it or it can be pulled; otherwise
(no container registry) the session builds a stand-in under that name from ``debian:trixie-slim`` and Debian's
redis-server (``tests/docker/redis-standin``, with ``--network host``) and removes it at the end (dockerlib.py).

``TEST_DOCKER_REUSE_IMAGE=1`` is for working on these tests: it starts the image already tagged
``image-similarity-search:compose-test`` (if there is one), builds nothing and keeps it; its report says so.

At the end it prints one JSON line: image size, build times (cold and cached), time to healthy, the library's
first scan (when it started after the app container, how long it took) and the rescan, restart time and the
two-replica start, which Redis ran, with the load average when the builds and the first start began (the machine
may be shared).

Isolation: a dedicated Compose project name, its own image tag, free ports, an empty ``--env-file`` and no
``env_file`` (a developer's ``.env`` changes nothing here), no profile. The only other things it adds are a
temporary override file (``build: network: host``, for engines whose bridge networks have no outside access, as on
this project's machines), the build logs and the photo folder (``PHOTOS_DIR``; never the default ``./photos`` in
the checkout), all under pytest's temporary directory.

Every HTTP request carries ``Authorization: Bearer <API_KEY>`` and ``bulk_index.py`` gets ``IMAGE_SEARCH_API_KEY``,
so the test stays right once the service enforces API keys (the server ignores them until then).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.docker.dockerlib import (
    IMAGE,
    AppImage,
    Stack,
    compose_env,
    docker_inspect,
    engine_versions,
    say,
    service_image,
    sha256,
)
from tests.helpers import BULK_SUMMARY, DATASETS, INSTANCE, PROJECT_ROOT, free_port, symlink

# `slow` too, so that `make test-fast` (-m "not slow", which replaces addopts' -m "not docker") leaves it out.
# Building a multi-GB image on a shared 2-core machine takes well over pytest-timeout's default of 600 s; the
# session fixture's set-up (both builds) and the module fixture's first start are charged to the first test.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(5400)]

SCRIPTS = PROJECT_ROOT / "scripts"
PROJECT = "image-similarity-search-compose-test"  # never the default project name: it must touch nothing else
N_IMAGES = 50
APP_UID = "10001"
# Query photos that are not among the indexed ones (another dataset), so the model embeds them: the cache's cases.
QUERY_PHOTOS = sorted((DATASETS / "caltech101_subset" / "images").rglob("*.jpg"))
# PHOTOS_DIR: the first photo of N_LIBRARY categories of the same dataset, after the Faces ones the queries come
# from; one more category's photo is added to the folder during the test.
N_LIBRARY = 20
LIBRARY_CATEGORIES = sorted(p for p in (DATASETS / "caltech101_subset" / "images").iterdir() if p.is_dir())[4:]
LIBRARY_SCAN_TIMEOUT_S = 300

# The session's image (conftest.py builds it), and no `.env` env_file (`!reset`, Compose 2.24+), so a developer's
# settings cannot change what is tested.
OVERRIDE = f"""\
services:
  app:
    image: {IMAGE}
    env_file: !reset []
"""


def _cache_delta(before: dict, after: dict) -> dict[str, int]:
    """What happened between two ``/stats`` ``cache`` blocks of one process: lookups, model calls, hits by layer."""
    assert after["redis"] is not None and before["redis"] is not None, after
    return {
        "lookups": after["lookups"] - before["lookups"],
        "computed": after["computed"] - before["computed"],
        "memory_hits": after["memory"]["hits"] - before["memory"]["hits"],
        "redis_hits": after["redis"]["hits"] - before["redis"]["hits"],
        "redis_misses": after["redis"]["misses"] - before["redis"]["misses"],
        "redis_writes": after["redis"]["writes"] - before["redis"]["writes"],
        "redis_errors": after["redis"]["errors"] - before["redis"]["errors"],
    }


def _place(src: Path, folder: Path) -> Path:
    """Copy a photo into the photo folder, as ``<category>/<name>``, readable by everyone as in a user's folder (the
    service runs as uid 10001). Copied, not linked: a link out of the folder is not followed inside the container."""
    dest = folder / src.parent.name / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.parent.chmod(0o755)
    shutil.copy2(src, dest)  # keeps the mtime: an old photo, not one still being copied
    dest.chmod(0o644)
    return dest


def _photo_folder(folder: Path) -> dict[str, Path]:
    """PHOTOS_DIR with N_LIBRARY real photos: image id -> file."""
    folder.mkdir()
    folder.chmod(0o755)
    placed = {}
    for category in LIBRARY_CATEGORIES[:N_LIBRARY]:
        src = sorted(category.glob("*.jpg"))[0]
        placed[sha256(src)] = _place(src, folder)
    assert len(placed) == N_LIBRARY, "the library's photos must be distinct images"
    assert not placed.keys() & {sha256(p) for p in QUERY_PHOTOS[:3]}, "the cache tests' queries must not be indexed"
    return placed


def _library(stack: Stack, base_url: str | None = None) -> dict:
    answer = stack.get("/libraries/photos", base_url)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _wait_until_scanned(stack: Stack) -> dict:
    """``GET /libraries/photos`` until its scan (running or not yet started) has ended; the library then."""
    deadline = time.monotonic() + LIBRARY_SCAN_TIMEOUT_S
    while True:
        library = _library(stack)
        if library["state"] == "idle" and library["scan_finished_at"]:
            return library
        assert library["state"] in ("idle", "scanning"), library  # failed, waiting, interrupted: at once
        assert time.monotonic() < deadline, f"the scan of photos did not end in {LIBRARY_SCAN_TIMEOUT_S} s: {library}"
        time.sleep(0.5)


def _epoch(iso: str) -> float:
    """Epoch seconds of an ISO 8601 UTC time; Docker's nanoseconds are cut to whole seconds (the API's precision)."""
    return datetime.fromisoformat(iso[:19]).replace(tzinfo=UTC).timestamp()


def _store_files(stack: Stack, service: str = "app") -> list[str]:
    """Every file under the images volume (IMAGE_DIR, /data/images) of the service's container, less the write
    locks' shard files (``.locks/``, unused with DATABASE_URL: the locks are PostgreSQL's then)."""
    found = stack.check("exec", "-T", service, "find", "/data/images", "-type", "f", "-not", "-path", "*/.locks/*")
    return found.split()


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too: the range ``APP_PORT=p-(p+1)`` for two replicas."""
    for _ in range(100):
        port = free_port()
        if port < 65535:
            try:
                return free_port(range(port + 1, port + 2)) - 1
            except RuntimeError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _redis_version(image: str) -> str:
    """The Redis version in an image (``redis-server --version``)."""
    version = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "redis-server", image, "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    match = re.search(r"v=(\S+)", version)
    return match.group(1) if match else "?"


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, app_image: AppImage, standins
) -> Iterator[Stack]:
    """Start the default stack with API_KEY set on the session's image, and tear it all down."""
    work = tmp_path_factory.mktemp("compose")
    override = work / "compose.override.yml"
    override.write_text(OVERRIDE, encoding="utf-8")
    env_file = work / "empty.env"
    env_file.write_text("", encoding="utf-8")
    port = free_port()
    api_key = "compose-test-" + secrets.token_hex(16)
    photos = work / "photos"
    in_folder = _photo_folder(photos)
    env = compose_env(
        APP_PORT=str(port), API_KEY=api_key, TORCH_INDEX_URL=app_image.torch_index_url, PHOTOS_DIR=str(photos)
    )

    s = Stack(PROJECT, f"http://127.0.0.1:{port}", api_key, env, override, env_file, work, photos_dir=photos)
    s.library = in_folder
    s.report.update(benchmark="compose_stack", date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"), **engine_versions())
    say(request, f"\n[test-docker] project {PROJECT}, port {port}, logs in {work}")

    # Leftovers of an interrupted earlier run of this same project (never anything else).
    s.compose("down", "--volumes", "--remove-orphans", timeout=300)
    try:
        redis, seconds = standins("redis")
        s.report["redis"] = f"{redis[:-1]}; Redis {_redis_version(service_image('redis'))})"
        s.report["redis_image_s"] = seconds
        s.report.update(app_image.report)
        s.report["loadavg_1m_at_up"] = round(os.getloadavg()[0], 1)
        say(request, "[test-docker] starting the default stack ...")
        s.report["healthy_s"] = round(s.up(), 1)
        s.healthy_at = time.time()
        yield s
    finally:
        s.report["down_v_ok"], down = s.down_volumes()
        say(request, "\n" + json.dumps(s.report))
    assert s.report["down_v_ok"], f"docker compose down -v did not remove everything: {down}"


def test_stack_is_healthy_and_serves_api_docs_and_ui(stack: Stack) -> None:
    health = stack.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["backend"] == "pgvector", body
    # The app reaches the compose `redis` service through CACHE_REDIS_URL.
    assert body["cache"] == "ok" and not body["problems"], body
    assert body["libraries"] == "ok", body  # the library `photos` from LIBRARY_ROOTS, created at start
    stack.report["model"] = body["model"]["id"]

    docs = stack.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text.lower(), docs.text[:500]
    openapi = stack.get("/openapi.json")
    assert openapi.status_code == 200 and "/index_images" in openapi.json()["paths"]
    ui = stack.get("/ui/", follow_redirects=True)
    assert ui.status_code == 200 and "gradio" in ui.text.lower(), ui.text[:500]
    # Gradio's own app config: the UI is the Gradio app, with its search handler named for gradio_client.
    config = stack.get("/ui/config")
    assert config.status_code == 200 and config.json()["version"].startswith("6."), config.text[:500]
    assert "/search" in stack.get("/ui/gradio_api/info").json()["named_endpoints"]
    stack.report["gradio"] = config.json()["version"]
    # Nothing the page loads comes from outside the service (no CDN, no web fonts).
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", ui.text), ui.text[:2000]

    # An upload lands in Gradio's temp folder, <tmp>/gradio, written by the service's uid 10001: the image's own
    # files (root-owned, read-only to the service) are never written. `docker diff` lists what the container
    # changed outside its volumes: only /tmp (Gradio's folder, torch's) and the service user's home (onnxruntime
    # keeps a device id under ~/.cache).
    photo = QUERY_PHOTOS[0]
    with photo.open("rb") as fh:
        upload = httpx.post(
            stack.base_url + "/ui/gradio_api/upload",
            headers=stack.headers,
            files={"files": (photo.name, fh, "image/jpeg")},
            timeout=60,
        )
    assert upload.status_code == 200, upload.text
    (uploaded,) = upload.json()
    assert uploaded.startswith("/tmp/gradio/") and uploaded.endswith(photo.name), uploaded
    owner = stack.check("exec", "-T", "app", "stat", "-c", "%u:%g %s", uploaded).split()
    assert owner == [f"{APP_UID}:{APP_UID}", str(photo.stat().st_size)], owner
    app_id = stack.check("ps", "-q", "app").strip()
    changed = subprocess.run(["docker", "diff", app_id], capture_output=True, text=True, timeout=60, check=True)
    paths = [line.split(" ", 1)[1] for line in changed.stdout.splitlines()]
    writable = ("/tmp", "/home", "/home/app")
    assert "/tmp/gradio" in paths, changed.stdout
    assert all(p in writable or p.startswith(("/tmp/", "/home/app/")) for p in paths), changed.stdout
    # Whether the app container reaches anything outside the Compose network (here it does not: no NAT, so the
    # checks above prove that the UI needs no internet; elsewhere it may, and this only says so).
    probe = stack.compose(
        "exec", "-T", "app", "python", "-c", "import socket; socket.create_connection(('pypi.org', 443), timeout=5)"
    )
    stack.report["app_reaches_internet"] = probe.returncode == 0


def test_photos_dir_is_a_library_indexed_in_place_from_the_first_start(stack: Stack) -> None:
    """docs/docker.md, "Indexing a photo folder in place": PHOTOS_DIR read-only at /photos, the library `photos`
    created from LIBRARY_ROOTS and scanned at the first start; its photos are searched and served from the folder,
    never copied into the images volume; a photo added to the folder comes in with a scan."""
    assert stack.photos_dir is not None
    mounts = {m["Destination"]: m for m in stack.container("app")["Mounts"]}
    photos = mounts["/photos"]
    assert (photos["Type"], photos["Source"], photos["RW"]) == ("bind", str(stack.photos_dir), False), photos
    assert "Read-only file system" in stack.compose("exec", "-T", "app", "touch", "/photos/x").stderr

    # The first scan started with the service, before it first answered (not at the scheduler's first tick, 30 s
    # on); here it runs on, or has ended.
    first = _library(stack)
    assert (first["source"], first["roots"]) == ("env", ["/photos"]), first
    assert first["scan_started_at"] is not None, first
    started = _epoch(first["scan_started_at"])
    assert started <= stack.healthy_at + 1, (first, stack.healthy_at)
    container_started = _epoch(stack.container("app")["State"]["StartedAt"])
    stack.report["library_scan_started_s"] = round(started - container_started, 1)  # after the container's start
    waited = time.monotonic()
    library = _wait_until_scanned(stack)
    stack.report["library_waited_s"] = round(time.monotonic() - waited, 1)  # after `up --wait` and the checks above
    n = len(stack.library)
    assert library["counts"] == {"files": n, "online": n, "offline": 0, "failed": 0, "images": n}, library
    scan = library["last_scan"]
    assert (scan["files"], scan["new"], scan["indexed"], scan["failed"]) == (n, n, n, 0), scan
    assert library["error"] is None and library["warning"] is None, library
    stack.report["library_scan_s"] = scan["seconds"]
    assert stack.get("/stats").json()["count"] == n

    def check_served(image_id: str, src: Path) -> None:
        """The photo finds itself as photos/<path>, and GET /image/{id} answers the file's bytes."""
        name = "photos/" + src.relative_to(stack.photos_dir).as_posix()
        results = stack.search_image(src, top_k="5", path_prefix="photos/")
        assert all(r["filename"].startswith("photos/") for r in results), results
        mine = next((r for r in results if r["id"] == image_id), None)
        assert mine and mine["filename"] == name and mine["score"] > 0.999, (name, results)
        original = stack.get(f"/image/{image_id}")
        assert original.status_code == 200 and original.content == src.read_bytes(), (src, original.status_code)

    for image_id, src in list(stack.library.items())[:: n // 4]:
        check_served(image_id, src)
    # Not copied: the images volume (IMAGE_DIR) holds no file at all (this test runs before any upload), so every
    # byte served above came from the folder.
    assert _store_files(stack) == [], "the library's originals must stay in PHOTOS_DIR, not be copied"

    # A photo added to the folder: a scan indexes it (and only it: the others are unchanged, not read again).
    src = sorted(LIBRARY_CATEGORIES[N_LIBRARY].glob("*.jpg"))[0]
    image_id = sha256(src)
    added = _place(src, stack.photos_dir)
    answer = httpx.post(stack.base_url + "/libraries/photos/scan", headers=stack.headers, timeout=60)
    assert answer.status_code == 202 and answer.json()["state"] == "scanning", answer.text
    start = time.monotonic()
    library = _wait_until_scanned(stack)
    stack.report["library_rescan_s"] = round(time.monotonic() - start, 1)
    scan = library["last_scan"]
    assert (scan["files"], scan["unchanged"], scan["new"], scan["indexed"]) == (n + 1, n, 1, 1), scan
    assert library["counts"]["online"] == library["counts"]["images"] == n + 1, library
    check_served(image_id, added)
    assert _store_files(stack) == []
    stack.library[image_id] = added


def test_app_runs_as_uid_10001_and_only_the_app_port_is_published(stack: Stack) -> None:
    # PID 1 of the app container is `python -m app` itself (exec-form CMD): its ids are the service's.
    status = stack.check("exec", "-T", "app", "cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {APP_UID} and set(gids) == {APP_UID}, (uids, gids)
    assert "python" in stack.check("exec", "-T", "app", "cat", "/proc/1/cmdline")

    for service in ("db", "redis"):
        inner = stack.container(service)
        assert not inner["HostConfig"].get("PortBindings"), (service, inner["HostConfig"].get("PortBindings"))
        assert not any(inner["NetworkSettings"]["Ports"].values()), (service, inner["NetworkSettings"]["Ports"])
    # Redis as docker-compose.yml configures it (LFU eviction within maxmemory, snapshots to the volume).
    for name, value in (("maxmemory-policy", "allkeys-lfu"), ("maxmemory", str(256 * 2**20)), ("dir", "/data")):
        assert stack.check("exec", "-T", "redis", "redis-cli", "config", "get", name).split() == [name, value]

    app = stack.container("app")
    bindings = [b for b in app["NetworkSettings"]["Ports"].get("8000/tcp") or []]
    assert bindings and {b["HostIp"] for b in bindings} == {"127.0.0.1"}, bindings
    assert {b["HostPort"] for b in bindings} == {stack.base_url.rsplit(":", 1)[1]}
    published = {name for name, values in app["NetworkSettings"]["Ports"].items() if values}
    assert published == {"8000/tcp"}, published
    env = dict(item.split("=", 1) for item in app["Config"]["Env"])
    assert env.get("API_KEY") == stack.api_key, "API_KEY from the shell must reach the app container"


def test_bulk_index_50_real_images_through_the_published_port_and_search(stack: Stack, tmp_path: Path) -> None:
    # The first 50 distinct files of instance_small, in name order: EXIF-rotated JPEGs, the Grace Hopper photo in
    # AVIF/HEIF/WebP/PNG/TIFF/GIF and more, linked (not copied) into a folder of their own.
    folder = tmp_path / "photos"
    chosen: dict[str, Path] = {}
    for src in sorted(INSTANCE.rglob("*")):
        if src.is_file() and len(chosen) < N_IMAGES:
            chosen.setdefault(sha256(src), src)
    assert len(chosen) == N_IMAGES
    for src in chosen.values():
        symlink(src, folder / src.parent.name / src.name)

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_SEARCH_")}
    env["IMAGE_SEARCH_API_KEY"] = stack.api_key  # bulk_index.py's --api-key default, once it has one

    def bulk_index() -> tuple[int, ...]:
        proc = subprocess.run(
            [
                sys.executable,
                str(SCRIPTS / "bulk_index.py"),
                str(folder),
                "--api",
                stack.base_url,
                "--no-progress",
                "--failures-log",
                str(tmp_path / "failures.log"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        match = BULK_SUMMARY.search(proc.stdout)
        assert match, proc.stdout
        return tuple(int(n) for n in match.groups()[:4])

    start = time.monotonic()
    assert bulk_index() == (N_IMAGES, 0, N_IMAGES, 0)
    stack.report["index_50_s"] = round(time.monotonic() - start, 1)
    assert bulk_index() == (N_IMAGES, N_IMAGES, 0, 0), "a second run must find every image already indexed"

    stats = stack.get("/stats").json()
    assert stats["count"] == N_IMAGES + len(stack.library), stats  # the uploads and the library's photos
    assert len(_store_files(stack)) == N_IMAGES, "one original per upload in the images volume, none per library file"
    for image_id, src in list(chosen.items())[:: N_IMAGES // 5]:
        results = stack.search_image(src, top_k="5")
        # Some files embed identically (e.g. one photo in several formats), so the query need not be first.
        assert results[0]["score"] > 0.999, results
        assert image_id in {r["id"] for r in results}, (src, results)
        mine = next(r for r in results if r["id"] == image_id)
        assert mine["filename"] == f"{src.parent.name}/{src.name}" and mine["score"] > 0.999, mine
    stack.indexed = chosen

    # The same search through the Gradio UI's handler, as a script would call it (gradio_client uploads the photo
    # into the container's /tmp/gradio first): the same images in the same order as the REST API's default search
    # (which, like the UI, leaves an indexed query photo out of its results).
    from gradio_client import Client, handle_file

    image_id, src = next(iter(chosen.items()))
    ui = Client(stack.base_url + "/ui/", verbose=False, headers=stack.headers, download_files=False)
    results, status = ui.predict(photo=handle_file(str(src)), results_per_page=5, api_name="/search")
    assert status.startswith("5 results"), status
    rest = stack.search_image(src, top_k="5", exclude_self="true")
    assert [r["id"] for r in results] == [r["id"] for r in rest], (results, rest)


def test_repeated_search_is_a_cache_hit_and_the_embedding_is_in_redis(stack: Stack) -> None:
    # A photo that is not indexed: the first search embeds it with the model (and stores it in Redis), the same
    # search again is answered by the memory layer; its key (by the SHA-256 of the bytes) is in Redis.
    photo = QUERY_PHOTOS[0]
    before = stack.cache()
    first = stack.search_image(photo)
    middle = stack.cache()
    second = stack.search_image(photo)
    after = stack.cache()
    assert [r["id"] for r in second] == [r["id"] for r in first]
    assert _cache_delta(before, middle) == {
        "lookups": 1,
        "computed": 1,
        "memory_hits": 0,
        "redis_hits": 0,
        "redis_misses": 1,
        "redis_writes": 1,
        "redis_errors": 0,
    }, (before, middle)
    repeat = _cache_delta(middle, after)
    assert repeat["lookups"] == 1 and repeat["computed"] == 0, (middle, after)
    assert repeat["memory_hits"] + repeat["redis_hits"] == 1, (middle, after)
    assert after["redis_state"] == "ok", after
    assert any(key.endswith(":" + sha256(photo)) for key in stack.redis_keys())
    stack.report["cache_after_repeat"] = {"hit_rate": after["hit_rate"], "redis_writes": after["redis"]["writes"]}


def test_count_and_originals_survive_down_and_up(stack: Stack) -> None:
    assert stack.indexed, "needs the images indexed by the previous test"
    library = _library(stack)
    stack.check("down", timeout=300)
    assert not stack.check("ps", "-q", "--all").split(), "down must remove the containers"
    stack.report["restart_s"] = round(stack.up(), 1)

    assert stack.get("/stats").json()["count"] == N_IMAGES + len(stack.library)
    # The library's state is in the database: the new container knows it as scanned, so its start scans nothing
    # (LIBRARY_SCAN_INTERVAL is 1d), and it serves the folder's files.
    again = _library(stack)
    assert again["scan_started_at"] == library["scan_started_at"] and again["counts"] == library["counts"], again
    for image_id, src in list(stack.library.items())[:2]:
        assert stack.get(f"/image/{image_id}").content == src.read_bytes(), src
    for image_id, src in list(stack.indexed.items())[:3]:
        original = stack.get(f"/image/{image_id}")
        assert original.status_code == 200 and original.content == src.read_bytes(), (src, original.status_code)
    image_id, src = next(iter(stack.indexed.items()))
    assert image_id in {r["id"] for r in stack.search_image(src)}

    # The new app container's memory is empty; the photo embedded before the restart is a Redis hit (the
    # redis-data volume kept the snapshot Redis wrote when it stopped), not a model call.
    assert stack.get("/health").json()["cache"] == "ok"
    before = stack.cache()
    stack.search_image(QUERY_PHOTOS[0])
    delta = _cache_delta(before, stack.cache())
    assert delta["redis_hits"] == 1 and delta["computed"] == 0, delta


def test_app_runs_with_a_read_only_root_filesystem(stack: Stack) -> None:
    """The app needs no writable file outside its volumes and /tmp: with ``read_only: true`` and a tmpfs on /tmp
    (a hardened deployment's override) it starts, Gradio takes uploads into /tmp/gradio, and searches work."""
    assert stack.indexed, "needs the images indexed by the earlier test"
    read_only = stack.log_dir / "compose.read-only.yml"
    read_only.write_text("services:\n  app:\n    read_only: true\n    tmpfs:\n      - /tmp\n", encoding="utf-8")
    stack.report["read_only_up_s"] = round(stack.up(overrides=(read_only,)), 1)
    assert stack.container("app")["HostConfig"]["ReadonlyRootfs"] is True
    assert "Read-only file system" in stack.compose("exec", "-T", "app", "touch", "/app/x").stderr
    assert stack.get("/health").json()["status"] == "ok"
    ui = stack.get("/ui/config")
    assert ui.status_code == 200 and ui.json()["version"].startswith("6."), ui.text[:500]
    photo = QUERY_PHOTOS[0]
    with photo.open("rb") as fh:
        upload = httpx.post(
            stack.base_url + "/ui/gradio_api/upload",
            headers=stack.headers,
            files={"files": (photo.name, fh)},
            timeout=60,
        )
    assert upload.status_code == 200 and upload.json()[0].startswith("/tmp/gradio/"), upload.text
    image_id, src = next(iter(stack.indexed.items()))
    assert image_id in {r["id"] for r in stack.search_image(src)}
    library_id, library_src = next(iter(stack.library.items()))  # the read-only bind mount reads the same
    assert stack.get(f"/image/{library_id}").content == library_src.read_bytes()


def test_two_app_replicas_share_the_database_images_and_redis(stack: Stack) -> None:
    """docs/docker.md: ``APP_PORT=8000-8001 docker compose up -d --scale app=2``."""
    assert stack.indexed, "needs the images indexed by the earlier test"
    port = _free_port_pair()
    stack.report["scale2_up_s"] = round(stack.up("--scale", "app=2", env={"APP_PORT": f"{port}-{port + 1}"}), 1)
    ids = stack.check("ps", "-q", "app").split()
    assert len(ids) == 2, ids
    urls = []
    for container in ids:
        bindings = docker_inspect(container)["NetworkSettings"]["Ports"].get("8000/tcp") or []
        assert len(bindings) == 1 and bindings[0]["HostIp"] == "127.0.0.1", bindings
        urls.append(f"http://127.0.0.1:{bindings[0]['HostPort']}")
    assert sorted(int(u.rsplit(":", 1)[1]) for u in urls) == [port, port + 1], urls

    image_id, src = next(iter(stack.indexed.items()))
    for url in urls:  # one database and one images volume behind both
        health = stack.get("/health", url).json()
        assert health["status"] == "ok" and health["cache"] == "ok", (url, health)
        assert stack.get("/stats", url).json()["count"] == N_IMAGES + len(stack.library)
        assert stack.get(f"/image/{image_id}", url).content == src.read_bytes()
        # Each replica mounts the photo folder at /photos and reads the library's files itself.
        library_id, library_src = next(iter(stack.library.items()))
        assert stack.get(f"/image/{library_id}", url).content == library_src.read_bytes(), url
        assert _library(stack, url)["counts"]["online"] == len(stack.library), url

    # A photo embedded by one replica is a Redis hit in the other, both ways.
    for photo, (one, other) in zip(QUERY_PHOTOS[1:3], (urls, urls[::-1]), strict=True):
        before_one, before_other = stack.cache(one), stack.cache(other)
        first = stack.search_image(photo, one)
        computed = _cache_delta(before_one, stack.cache(one))
        assert computed["computed"] == 1 and computed["redis_writes"] == 1, computed
        again = stack.search_image(photo, other)
        hit = _cache_delta(before_other, stack.cache(other))
        assert hit["redis_hits"] == 1 and hit["computed"] == 0, hit
        assert [r["id"] for r in again] == [r["id"] for r in first]
