"""Session fixtures of the Compose tests: the app image, built once for every module here, and the stand-in images.

The image is several GB and takes minutes to build, so ``app_image`` builds it once per pytest session (once with
``--no-cache``, once more unchanged with the layer cache: both timings go into the reports) and removes it when the
session ends; ``standins`` makes third-party images available (tests/docker/dockerlib.py) and removes the stand-ins
it built. ``TEST_DOCKER_REUSE_IMAGE=1`` (for working on these tests) starts the image already tagged
``image-similarity-search:compose-test``, if there is one, builds nothing and keeps it; the reports say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.docker.dockerlib import (
    BUILD_TIMEOUT_S,
    IMAGE,
    REUSE_IMAGE,
    AppImage,
    Stack,
    compose_env,
    docker_unavailable,
    ensure_image,
    image_id,
    image_labels,
    pip_fetches,
    remove_image,
    say,
    service_image,
    torch_index,
)

BUILD_PROJECT = "image-similarity-search-compose-test"  # the default-stack test's project name; a build starts nothing

# Points the build at the host network (this machine's dockerd runs without NAT, so a bridge network cannot reach
# PyPI; harmless elsewhere) and tags the image for these tests only.
BUILD_OVERRIDE = f"""\
services:
  app:
    image: {IMAGE}
    build:
      network: host
"""


@pytest.fixture(scope="session")
def app_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppImage]:
    """Build the app image (cold, then cached) once for the session; removed at the end unless reused."""
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("build")
    override = work / "compose.build.yml"
    override.write_text(BUILD_OVERRIDE, encoding="utf-8")
    env_file = work / "empty.env"
    env_file.write_text("", encoding="utf-8")
    index_url, index_label = torch_index()
    builder = Stack(BUILD_PROJECT, "", "", compose_env(TORCH_INDEX_URL=index_url), override, env_file, work)
    report: dict = {"torch_index": index_label}

    # TEST_DOCKER_REUSE_IMAGE=1 (to work on these tests): start the image already tagged IMAGE, build nothing, keep it.
    reuse = os.environ.get(REUSE_IMAGE) == "1" and image_labels(IMAGE) is not None
    cold_id = None
    try:
        if reuse:
            report["builds"] = f"skipped ({REUSE_IMAGE}=1): not a full run"
        else:
            remove_image()
            report["loadavg_1m_at_build"] = round(os.getloadavg()[0], 1)  # the machine may be shared: how busy
            say(request, f"\n[test-docker] building {IMAGE} with --no-cache (torch from: {index_label}) ...")
            start = time.monotonic()
            builder.check("--progress", "plain", "build", "--no-cache", "app", timeout=BUILD_TIMEOUT_S, log="cold.log")
            report["build_cold_s"] = round(time.monotonic() - start, 1)
            report.update(pip_fetches((work / "cold.log").read_text(encoding="utf-8", errors="replace")))
            # The cold build's image id: if the cached build makes another one (the build context changed between
            # the two), the cold one is left untagged, 6-7 GB, and is removed at the end too.
            cold_id = image_id(IMAGE)
            start = time.monotonic()
            builder.check("--progress", "plain", "build", "app", timeout=BUILD_TIMEOUT_S, log="cached.log")
            report["build_cached_s"] = round(time.monotonic() - start, 1)
        size = subprocess.run(
            ["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        report["image_gb"] = round(int(size) / 1e9, 2)
        say(request, f"[test-docker] built: {json.dumps(report)}")
        yield AppImage(IMAGE, report, index_url)
    finally:
        if not reuse:
            remove_image()
            if cold_id:
                remove_image(cold_id)  # only still there when the cached build made another image


@pytest.fixture(scope="session")
def standins(request: pytest.FixtureRequest) -> Iterator[Callable[[str], tuple[str, float]]]:
    """``ensure(service)`` -> (its image as the report names it, seconds it took): the image of a compose service
    with a stand-in folder, found, pulled or built (dockerlib.ensure_image); the stand-ins are removed at the end."""
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    seen: dict[str, tuple[str, float]] = {}
    ours: list[str] = []

    def ensure(service: str) -> tuple[str, float]:
        if service not in seen:
            start = time.monotonic()
            label, built = ensure_image(service, lambda line: say(request, line))
            seen[service] = (label, round(time.monotonic() - start, 1))
            if built:
                ours.append(service_image(service))
        return seen[service]

    yield ensure
    for name in ours:
        subprocess.run(["docker", "image", "rm", name], capture_output=True, text=True, timeout=300)
