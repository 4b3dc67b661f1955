"""The Compose stack end to end: build the image, start app + db, index real images, search, restart, tear down.

Run it with ``make test-docker``, which first sets up a Docker engine and local stand-in base images where the
project's shared tools provide them, then runs ``pytest -m docker tests/docker``. ``make test`` (and so ``.ci/run``)
deselects it through ``-m "not docker"`` in pyproject's addopts: it builds a multi-GB image and takes many minutes.
Every test here is skipped, with the reason, when no Docker engine answers.

What it proves, in order, on the default stack (``docker-compose.yml`` with no profile: app + PostgreSQL/pgvector):

1. the image builds with no container registry reachable: once with ``--no-cache`` (every layer rebuilt; the
   report counts the files pip downloaded and those it took from its cache mount) and once more, unchanged, with
   the layer cache;
2. ``docker compose up --wait`` with ``API_KEY`` set turns healthy; ``/health``, ``/docs`` and ``/ui`` answer;
3. the app runs as uid/gid 10001, the database port is not published, and the app port only on 127.0.0.1
   (``APP_BIND``'s default);
4. ``scripts/bulk_index.py`` indexes 50 real images from ``../shared/datasets`` through the published port, and
   searching finds them;
5. after ``docker compose down`` and ``up`` the count and an original survive (named volumes);
6. ``docker compose down -v`` removes everything the project made (containers, network, volumes); then the test
   removes its image too.

At the end it prints one JSON line: image size, build times (cold and cached), time to healthy and restart time,
with the load average when the builds and the first start began (the machine may be shared).

Isolation: a dedicated Compose project name, its own image tag, a free port, an empty ``--env-file`` and no
``env_file`` (a developer's ``.env`` changes nothing here), no profile. The only other things it adds are a
temporary override file (``build: network: host``, for engines whose bridge networks have no outside access, as on
this project's machines) and a build log, both under pytest's temporary directory.

Every HTTP request carries ``Authorization: Bearer <API_KEY>`` and ``bulk_index.py`` gets ``IMAGE_SEARCH_API_KEY``,
so the test stays right once the service enforces API keys (the server ignores them until then).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers import BULK_SUMMARY, INSTANCE, PROJECT_ROOT, free_port, symlink

# `slow` too, so that `make test-fast` (-m "not slow", which replaces addopts' -m "not docker") leaves it out.
# Building a multi-GB image on a shared 2-core machine takes well over pytest-timeout's default of 600 s; the
# module fixture's set-up (both builds, first start) is charged to the first test.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(5400)]

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
SCRIPTS = PROJECT_ROOT / "scripts"
PROJECT = "image-similarity-search-compose-test"  # never the default project name: it must touch nothing else
IMAGE = "image-similarity-search:compose-test"  # nor overwrite the image a developer built as :latest
TORCH_INDEX_CPU = "https://download.pytorch.org/whl/cpu"  # the Dockerfile's default
N_IMAGES = 50
APP_UID = "10001"

BUILD_TIMEOUT_S = 3600
UP_TIMEOUT_S = 900  # first start: database initialisation, model load, ONNX export, on a busy machine

# Points the build at the host network (this machine's dockerd runs without NAT, so a bridge network cannot
# reach PyPI; harmless elsewhere), tags the image for this test only, and drops the app's `.env` env_file
# (`!reset`, Compose 2.24+) so a developer's settings cannot change what is tested.
OVERRIDE = f"""\
services:
  app:
    image: {IMAGE}
    build:
      network: host
    env_file: !reset []
"""


def _docker_unavailable() -> str | None:
    """Why the stack cannot run here, or None when a Docker engine and Compose v2 answer."""
    if shutil.which("docker") is None:
        return "no `docker` command on PATH (make test-docker sets up an engine where ../shared/tools/docker exists)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers: {(info.stderr or info.stdout).strip()[:300]}"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    if compose.returncode != 0:
        return f"Docker Compose v2 (`docker compose`) is missing: {compose.stderr.strip()[:300]}"
    return None


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _torch_index() -> tuple[str, str]:
    """(index URL for the TORCH_INDEX_URL build arg, a label for the report).

    TORCH_INDEX_URL from the environment wins; otherwise the Dockerfile's CPU-only PyTorch index when it answers;
    otherwise the index pip itself uses (PIP_INDEX_URL, else PyPI), whose torch is the CUDA build: it runs on the
    CPU, but brings the nvidia-* wheels, several GB. PyPI has no CPU-only torch wheel for Linux.
    """
    if os.environ.get("TORCH_INDEX_URL"):
        return os.environ["TORCH_INDEX_URL"], "TORCH_INDEX_URL from the environment"
    if _reachable(TORCH_INDEX_CPU + "/torch/"):
        return TORCH_INDEX_CPU, "PyTorch CPU index (the Dockerfile's default)"
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"], "PIP_INDEX_URL (CUDA torch build; the PyTorch index is unreachable)"
    from pip._internal.models.index import PyPI  # pip's own default index, so no host is written down here

    return PyPI.simple_url, "PyPI (CUDA torch build; the PyTorch index is unreachable)"


def _remove_image() -> None:
    """Remove this test's image. Each build re-tags it, so a kept one would turn into a dangling 6-7 GB image on the
    next run; the layer cache that the cached build needs lives in the build cache, not in the image."""
    subprocess.run(["docker", "image", "rm", "--force", IMAGE], capture_output=True, text=True, timeout=300)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pip_fetches(build_log: str) -> dict[str, int]:
    """How many files pip downloaded and took from its cache mount in a build log: a `--no-cache` build is only
    cold when nothing came from the cache (engines differ in whether they keep cache mounts between builds)."""
    return {
        "pip_downloaded": len(re.findall(r"^#\d+ [\d.]+\s+Downloading ", build_log, re.M)),
        "pip_from_cache": len(re.findall(r"^#\d+ [\d.]+\s+Using cached ", build_log, re.M)),
    }


@dataclass
class Stack:
    """The running project: how to reach it and drive it, and what was measured."""

    base_url: str
    api_key: str
    env: dict[str, str]
    override: Path
    env_file: Path
    log_dir: Path
    report: dict = field(default_factory=dict)
    indexed: dict[str, Path] = field(default_factory=dict)  # image id -> dataset file

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def compose(self, *args: str, timeout: float = 300, log: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``docker compose`` on this project; with ``log``, its output goes to that file in log_dir."""
        command = [
            "docker",
            "compose",
            "--project-name",
            PROJECT,
            "--env-file",
            str(self.env_file),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(self.override),
            *args,
        ]
        if log is None:
            return subprocess.run(
                command, cwd=PROJECT_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        path = self.log_dir / log
        with path.open("a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            proc = subprocess.run(
                command,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        text = path.read_text(encoding="utf-8", errors="replace")
        return subprocess.CompletedProcess(command, proc.returncode, text[-6000:], "")

    def check(self, *args: str, timeout: float = 300, log: str | None = None) -> str:
        proc = self.compose(*args, timeout=timeout, log=log)
        assert proc.returncode == 0, (
            f"docker compose {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout

    def container(self, service: str) -> dict:
        """`docker inspect` of the service's (single) container."""
        ids = self.check("ps", "-q", service).split()
        assert len(ids) == 1, f"{service}: expected one container, got {ids}"
        out = subprocess.run(["docker", "inspect", ids[0]], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)[0]

    def up(self) -> float:
        """``up -d --wait`` (no build: the image is built by the fixture); seconds until every service is healthy."""
        start = time.monotonic()
        proc = self.compose("up", "-d", "--wait", "--no-build", timeout=UP_TIMEOUT_S, log="up.log")
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            logs = self.compose("logs", "--no-color", "--tail", "80")
            pytest.fail(f"docker compose up --wait failed:\n{proc.stdout}\n--- logs ---\n{logs.stdout}{logs.stderr}")
        return elapsed

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers, timeout=60, **kwargs)


def _say(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's capture, so progress and the JSON line show without ``-s`` too."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(line, flush=True)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Build the image (cold, then cached), start the default stack with API_KEY set, and tear it all down."""
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)

    work = tmp_path_factory.mktemp("compose")
    override = work / "compose.override.yml"
    override.write_text(OVERRIDE, encoding="utf-8")
    env_file = work / "empty.env"
    env_file.write_text("", encoding="utf-8")
    torch_index, torch_label = _torch_index()
    port = free_port()
    api_key = "compose-test-" + secrets.token_hex(16)

    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for name in ("VECTOR_DB", "APP_BIND", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        env.pop(name, None)  # the defaults are what is tested; APP_BIND's is 127.0.0.1
    env.update(APP_PORT=str(port), API_KEY=api_key, TORCH_INDEX_URL=torch_index, DOCKER_BUILDKIT="1")

    s = Stack(f"http://127.0.0.1:{port}", api_key, env, override, env_file, work)
    versions = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    compose_version = subprocess.run(
        ["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    s.report.update(
        benchmark="compose_stack",
        date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        docker_engine=versions,
        compose=compose_version,
        torch_index=torch_label,
    )
    _say(request, f"\n[test-docker] project {PROJECT}, port {port}, logs in {work}")

    # Leftovers of an interrupted earlier run of this same project (never anything else).
    s.compose("down", "--volumes", "--remove-orphans", timeout=300)
    _remove_image()
    try:
        s.report["loadavg_1m_at_build"] = round(os.getloadavg()[0], 1)  # the machine may be shared: say how busy
        _say(request, f"[test-docker] building {IMAGE} with --no-cache (torch from: {torch_label}) ...")
        start = time.monotonic()
        s.check("--progress", "plain", "build", "--no-cache", "app", timeout=BUILD_TIMEOUT_S, log="cold-build.log")
        s.report["build_cold_s"] = round(time.monotonic() - start, 1)
        s.report.update(_pip_fetches((work / "cold-build.log").read_text(encoding="utf-8", errors="replace")))
        start = time.monotonic()
        s.check("--progress", "plain", "build", "app", timeout=BUILD_TIMEOUT_S, log="cached-build.log")
        s.report["build_cached_s"] = round(time.monotonic() - start, 1)
        size = subprocess.run(
            ["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        s.report["image_gb"] = round(int(size) / 1e9, 2)
        _say(request, f"[test-docker] built: {json.dumps(s.report)}; starting the stack ...")
        s.report["loadavg_1m_at_up"] = round(os.getloadavg()[0], 1)
        s.report["healthy_s"] = round(s.up(), 1)
        yield s
    finally:
        down = s.compose("down", "--volumes", "--remove-orphans", timeout=300)
        left = subprocess.run(
            ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        s.report["down_v_ok"] = down.returncode == 0 and not left
        _remove_image()
        _say(request, "\n" + json.dumps(s.report))
    assert s.report["down_v_ok"], f"docker compose down -v left volumes {left}: {down.stdout}{down.stderr}"


def test_stack_is_healthy_and_serves_api_docs_and_ui(stack: Stack) -> None:
    health = stack.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["backend"] == "pgvector", body
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


def test_app_runs_as_uid_10001_and_only_the_app_port_is_published(stack: Stack) -> None:
    # PID 1 of the app container is `python -m app` itself (exec-form CMD): its ids are the service's.
    status = stack.check("exec", "-T", "app", "cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {APP_UID} and set(gids) == {APP_UID}, (uids, gids)
    assert "python" in stack.check("exec", "-T", "app", "cat", "/proc/1/cmdline")

    db = stack.container("db")
    assert not db["HostConfig"].get("PortBindings"), db["HostConfig"].get("PortBindings")
    assert not any(db["NetworkSettings"]["Ports"].values()), db["NetworkSettings"]["Ports"]

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
            chosen.setdefault(_sha256(src), src)
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
    assert stats["count"] == N_IMAGES, stats
    for image_id, src in list(chosen.items())[:: N_IMAGES // 5]:
        with src.open("rb") as fh:
            answer = httpx.post(
                stack.base_url + "/search_image",
                headers=stack.headers,
                files={"file": (src.name, fh)},
                data={"top_k": "5", "exclude_self": "false"},  # the query is indexed: keep it in its results
                timeout=120,
            )
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        # Some files embed identically (e.g. one photo in several formats), so the query need not be first.
        assert results[0]["score"] > 0.999, results
        assert image_id in {r["id"] for r in results}, (src, results)
        mine = next(r for r in results if r["id"] == image_id)
        assert mine["filename"] == f"{src.parent.name}/{src.name}" and mine["score"] > 0.999, mine
    stack.indexed = chosen


def test_count_and_originals_survive_down_and_up(stack: Stack) -> None:
    assert stack.indexed, "needs the images indexed by the previous test"
    stack.check("down", timeout=300)
    assert not stack.check("ps", "-q", "--all").split(), "down must remove the containers"
    stack.report["restart_s"] = round(stack.up(), 1)

    assert stack.get("/stats").json()["count"] == N_IMAGES
    for image_id, src in list(stack.indexed.items())[:3]:
        original = stack.get(f"/image/{image_id}")
        assert original.status_code == 200 and original.content == src.read_bytes(), (src, original.status_code)
    image_id, src = next(iter(stack.indexed.items()))
    with src.open("rb") as fh:
        answer = httpx.post(
            stack.base_url + "/search_image",
            headers=stack.headers,
            files={"file": (src.name, fh)},
            data={"exclude_self": "false"},
            timeout=120,
        )
    assert answer.status_code == 200 and image_id in {r["id"] for r in answer.json()["results"]}, answer.text
