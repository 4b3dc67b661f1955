"""What the Compose tests in this folder share: the engine check, the app image (built once per pytest session by
``conftest.py``), local stand-ins for third-party images, and :class:`Stack`, one Compose project driven over HTTP.

Stand-ins: an image docker-compose.yml names (``redis``, ``minio``, ``lb``'s nginx) is used when the local store
has it or it can be pulled; otherwise (no container registry) it is built under that very name from the folder
beside this file (``redis-standin``, ``minio-standin``, ``nginx-standin``: ``debian:trixie-slim`` + Debian packages,
each Dockerfile says what it stands in for and how it differs), with ``--network host`` for engines whose bridge
networks reach nothing outside, and removed at the end of the session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
IMAGE = "image-similarity-search:compose-test"  # never the :latest a developer built
TORCH_INDEX_CPU = "https://download.pytorch.org/whl/cpu"  # the Dockerfile's default
HERE = Path(__file__).resolve().parent
STANDINS = {"redis": HERE / "redis-standin", "minio": HERE / "minio-standin", "lb": HERE / "nginx-standin"}
"""Compose service -> folder of the stand-in for its image."""
STANDIN_BY = "image-similarity-search tests/docker"  # the stand-ins' label local.standin.by
REUSE_IMAGE = "TEST_DOCKER_REUSE_IMAGE"
BUILD_TIMEOUT_S = 3600
UP_TIMEOUT_S = 900  # first start: database initialisation, model load, ONNX export, on a busy machine


def docker_unavailable() -> str | None:
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


def engine_versions() -> dict[str, str]:
    """The engine's and Compose's versions, for the reports."""
    engine = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30
    )
    compose = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=30)
    return {"docker_engine": engine.stdout.strip(), "compose": compose.stdout.strip()}


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def torch_index() -> tuple[str, str]:
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


def remove_image(name: str = IMAGE) -> None:
    """Remove an image. Each build re-tags the test's image, so a kept one would turn into a dangling 6-7 GB image on
    the next run; the layer cache that the cached build needs lives in the build cache, not in the image."""
    subprocess.run(["docker", "image", "rm", "--force", name], capture_output=True, text=True, timeout=300)


def image_id(name: str) -> str | None:
    """The id of a local image, or None when the local store does not have it."""
    proc = subprocess.run(
        ["docker", "image", "inspect", name, "--format", "{{.Id}}"], capture_output=True, text=True, timeout=60
    )
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def image_labels(name: str) -> dict[str, str] | None:
    """The labels of a local image, or None when the local store does not have it."""
    proc = subprocess.run(
        ["docker", "image", "inspect", name, "--format", "{{json .Config.Labels}}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (json.loads(proc.stdout) or {}) if proc.returncode == 0 else None


def service_image(service: str) -> str:
    """The image docker-compose.yml names for ``service``."""
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"][service]["image"]


def ensure_image(service: str, say) -> tuple[str, bool]:
    """Make the image of ``service`` (one of :data:`STANDINS`) available: (what it is, for the report; whether it is
    this test's stand-in, which the caller removes afterwards).

    Used as found when the local store has it, pulled when a registry answers, and otherwise built as a stand-in
    from its folder (``--network host``). The stand-in is tagged with the official name, so the compose file runs
    unchanged. A stand-in left by an interrupted run is used, and removed at the end like a new one.
    """
    name = service_image(service)
    labels, kind = image_labels(name), "local image"
    pull = None
    if labels is None:
        pull = subprocess.run(["docker", "pull", name], capture_output=True, text=True, timeout=600)
    if pull is not None and pull.returncode == 0:
        kind = "pulled"
    elif pull is not None:
        say(f"[test-docker] {name} cannot be pulled ({pull.stderr.strip()[-200:]}); building a local stand-in ...")
        build = subprocess.run(
            ["docker", "build", "--network", "host", "--tag", name, str(STANDINS[service])],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
        )
        assert build.returncode == 0, f"building the stand-in failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}"
    labels = image_labels(name) or {}
    ours = labels.get("local.standin.by") == STANDIN_BY
    if "local.standin.of" in labels:
        kind = f"stand-in: {labels.get('local.standin.built-from', '?')}"
    return f"{name} ({kind})", ours


def docker_inspect(container: str) -> dict:
    out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_fetches(build_log: str) -> dict[str, int]:
    """How many files pip downloaded and took from its cache mount in a build log: a `--no-cache` build is only
    cold when nothing came from the cache (engines differ in whether they keep cache mounts between builds)."""
    return {
        "pip_downloaded": len(re.findall(r"^#\d+ [\d.]+\s+Downloading ", build_log, re.M)),
        "pip_from_cache": len(re.findall(r"^#\d+ [\d.]+\s+Using cached ", build_log, re.M)),
    }


def say(request: pytest.FixtureRequest, line: str) -> None:
    """Print past pytest's capture, so progress and the JSON line show without ``-s`` too."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(line, flush=True)


@dataclass
class Stack:
    """One running Compose project: how to reach it and drive it, and what was measured."""

    project: str
    base_url: str
    api_key: str
    env: dict[str, str]
    override: Path
    env_file: Path
    log_dir: Path
    profiles: tuple[str, ...] = ()
    report: dict = field(default_factory=dict)
    indexed: dict[str, Path] = field(default_factory=dict)  # image id -> dataset file
    photos_dir: Path | None = None  # PHOTOS_DIR: the folder mounted read-only at /photos (the library `photos`)
    library: dict[str, Path] = field(default_factory=dict)  # image id -> its file in photos_dir, once scanned
    healthy_at: float = 0.0  # time.time() when the first `up --wait` returned

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def compose(
        self,
        *args: str,
        timeout: float = 300,
        log: str | None = None,
        env: dict[str, str] | None = None,
        overrides: tuple[Path, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker compose`` on this project; with ``log``, its output goes to that file in log_dir; ``env``
        adds to (or replaces) the stack's environment for this command, ``overrides`` are more compose files."""
        env = {**self.env, **(env or {})}
        command = [
            "docker",
            "compose",
            "--project-name",
            self.project,
            "--env-file",
            str(self.env_file),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(self.override),
            *(arg for path in overrides for arg in ("-f", str(path))),
            *(arg for profile in self.profiles for arg in ("--profile", profile)),
            *args,
        ]
        if log is None:
            return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        path = self.log_dir / log
        with path.open("a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            proc = subprocess.run(
                command,
                cwd=PROJECT_ROOT,
                env=env,
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
        return docker_inspect(ids[0])

    def up(self, *args: str, env: dict[str, str] | None = None, overrides: tuple[Path, ...] = ()) -> float:
        """``up -d --wait`` (no build: the image is built by the session fixture); seconds until every service it
        starts is healthy."""
        start = time.monotonic()
        proc = self.compose(
            "up", "-d", "--wait", "--no-build", *args, timeout=UP_TIMEOUT_S, log="up.log", env=env, overrides=overrides
        )
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            logs = self.compose("logs", "--no-color", "--tail", "80")
            pytest.fail(f"docker compose up --wait failed:\n{proc.stdout}\n--- logs ---\n{logs.stdout}{logs.stderr}")
        return elapsed

    def down_volumes(self) -> tuple[bool, str]:
        """``down --volumes --remove-orphans``: (whether it left no container, network or volume; what it said)."""
        down = self.compose("down", "--volumes", "--remove-orphans", timeout=300)
        left = subprocess.run(
            ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        return down.returncode == 0 and not left, f"volumes left: {left}; {down.stdout}{down.stderr}"

    def get(self, path: str, base_url: str | None = None, **kwargs) -> httpx.Response:
        return httpx.get((base_url or self.base_url) + path, headers=self.headers, timeout=60, **kwargs)

    def search_image(self, path: Path, base_url: str | None = None, **data: str) -> list[dict]:
        """``POST /search_image`` with the file at ``path``; its results."""
        with path.open("rb") as fh:
            answer = httpx.post(
                (base_url or self.base_url) + "/search_image",
                headers=self.headers,
                files={"file": (path.name, fh)},
                data={"exclude_self": "false", **data},  # an indexed query stays in its own results
                timeout=120,
            )
        assert answer.status_code == 200, answer.text
        return answer.json()["results"]

    def cache(self, base_url: str | None = None) -> dict:
        """``/stats``' ``cache`` block of one app container."""
        stats = self.get("/stats", base_url)
        assert stats.status_code == 200, stats.text
        return stats.json()["cache"]

    def redis_keys(self) -> list[str]:
        """The embedding-cache keys in the stack's Redis (``redis-cli --scan`` in the redis container)."""
        return self.check("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "*:emb:v1:*").split()


@dataclass
class AppImage:
    """The app image the Compose tests start: its tag, how it was made (report fields), the build's torch index."""

    name: str
    report: dict
    torch_index_url: str


def compose_env(**extra: str) -> dict[str, str]:
    """The environment for ``docker compose``: the shell's, less what would change the tested defaults; plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for name in ("VECTOR_DB", "APP_BIND", "APP_PORT", "API_KEY", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        env.pop(name, None)  # the defaults are what is tested; APP_BIND's is 127.0.0.1
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "SCALE_BUCKET"):
        env.pop(name, None)
    # Each test sets PHOTOS_DIR to a folder of its own: unset, Compose would create ./photos in the checkout.
    for name in ("PHOTOS_DIR", "LIBRARY_ROOTS"):
        env.pop(name, None)
    env["DOCKER_BUILDKIT"] = "1"
    env.update(extra)
    return env
