"""The Compose ``scale`` profile end to end: two app replicas behind the load balancer, originals in MinIO.

``docker compose --profile scale up -d --wait lb`` (docs/scaling.md) on the app image the
session built once (``conftest.py``; ``test_compose_stack.py`` starts it too), under its own project name, with
``API_KEY`` and non-default MinIO root credentials set, and only ``lb`` published, on a free port. Everything below
goes through that one port, as a client would:

1. every service is healthy and only ``lb`` is published (on 127.0.0.1); ``/health`` through it: database, the
   bucket (``storage``) and Redis ``ok``; both replicas mount ``PHOTOS_DIR`` (here an empty folder) read-only at
   the same path, ``/photos``, and share the one library ``photos`` created from ``LIBRARY_ROOTS``;
2. ``scripts/bulk_index.py`` indexes 20 real images through ``lb``; their originals are objects in the bucket (listed
   with the replicas' own credentials from inside ``app-a``), and neither replica's ``DATA_DIR`` holds a copy;
3. originals (``GET /image/{id}``) and searches answer the same bytes and the same results through ``lb`` whichever
   replica serves them, and both did (each replica's uvicorn access log counts its requests);
4. a delete through ``lb`` is gone for both replicas (asked directly, inside each container) and from the bucket;
5. with ``app-a`` stopped, ``lb`` keeps answering searches and originals (app-b; nginx retries what failed to
   connect); after ``start app-a`` both replicas serve through ``lb`` again;
6. the Gradio UI through ``lb``: ``/ui/``, its config, and a ``/search`` call through ``gradio_client`` (its queue
   and event stream pass the proxy; ``/ui`` sticks to one replica);
7. ``down -v`` removes the project's containers, network and volumes.

Images that cannot be pulled (no container registry) are built as stand-ins under the names the compose file pins
and removed at the end (dockerlib.py): ``minio`` -> moto's S3 server behind MinIO's contract (it checks the requests'
signatures against MINIO_ROOT_USER/PASSWORD), ``lb`` -> Debian's nginx with the official image's config layout,
``redis`` -> Debian's redis-server. The JSON line at the end says which ran. Isolation as in
``test_compose_stack.py``: own project name, free port, empty ``--env-file``, the replicas' ``.env`` env_file reset.
"""

from __future__ import annotations

import json
import os
import re
import secrets
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
    engine_versions,
    say,
    sha256,
)
from tests.helpers import BULK_SUMMARY, DATASETS, INSTANCE, PROJECT_ROOT, free_port, symlink

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600)]

PROJECT = "image-similarity-search-scale-test"  # never the default project name, nor the default-stack test's
REPLICAS = ("app-a", "app-b")
N_IMAGES = 20
QUERY_PHOTOS = sorted((DATASETS / "caltech101_subset" / "images").rglob("*.jpg"))[:2]  # not indexed

# The session's image for both replicas, and no `.env` env_file (a developer's settings change nothing here).
OVERRIDE = f"""\
services:
  app-a:
    image: {IMAGE}
    env_file: !reset []
  app-b:
    image: {IMAGE}
    env_file: !reset []
"""

# Lists the bucket the way the replicas reach it (their own settings and credentials), from inside app-a: MinIO is
# not published. Prints the keys under IMAGE_STORE_URL's prefix as a JSON list.
LIST_BUCKET = """\
import json, os, obstore
from obstore.store import S3Store
bucket, _, prefix = os.environ["IMAGE_STORE_URL"].removeprefix("s3://").partition("/")
store = S3Store(bucket, prefix=prefix or None, endpoint=os.environ["AWS_ENDPOINT_URL"], region=os.environ["AWS_REGION"],
    access_key_id=os.environ["AWS_ACCESS_KEY_ID"], secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    virtual_hosted_style_request=False, client_options={"allow_http": True})
print(json.dumps([meta["path"] for batch in obstore.list(store) for meta in batch]))
"""

# GET a path of the replica's own port from inside its container: status code, and the body's SHA-256.
GET_HERE = """\
import hashlib, os, sys, urllib.error, urllib.request
headers = {"Authorization": "Bearer " + os.environ["API_KEY"]}
request = urllib.request.Request("http://127.0.0.1:8000" + sys.argv[1], headers=headers)
try:
    with urllib.request.urlopen(request, timeout=30) as answer:
        print(answer.status, hashlib.sha256(answer.read()).hexdigest())
except urllib.error.HTTPError as exc:
    print(exc.code, "-")
"""


class Scale(Stack):
    """The scale project: :class:`Stack` plus what only a replica's container can tell."""

    def served(self, service: str, pattern: str) -> int:
        """How many requests the replica's uvicorn access log shows whose request line matches ``pattern``."""
        logs = self.check("logs", "--no-color", "--no-log-prefix", service)
        return len(re.findall(rf'"{pattern} HTTP/1\.1" \d{{3}}', logs))

    def served_by_each(self, pattern: str) -> dict[str, int]:
        return {service: self.served(service, pattern) for service in REPLICAS}

    def bucket_keys(self) -> list[str]:
        return json.loads(self.check("exec", "-T", "app-a", "python", "-c", LIST_BUCKET))

    def get_inside(self, service: str, path: str) -> tuple[int, str]:
        """``GET path`` on the replica's own port, from inside it: (status, SHA-256 of the body or "-")."""
        status, digest = self.check("exec", "-T", service, "python", "-c", GET_HERE, path).split()
        return int(status), digest


@pytest.fixture(scope="module")
def scale(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, app_image: AppImage, standins
) -> Iterator[Scale]:
    """``--profile scale up -d --wait lb`` on the session's image; ``down -v`` at the end, then the JSON line."""
    work = tmp_path_factory.mktemp("scale")
    override = work / "compose.override.yml"
    override.write_text(OVERRIDE, encoding="utf-8")
    env_file = work / "empty.env"
    env_file.write_text("", encoding="utf-8")
    port = free_port()
    api_key = "scale-test-" + secrets.token_hex(16)
    env = compose_env(
        APP_PORT=str(port),
        API_KEY=api_key,
        # Not MinIO's default: the replicas must get the root credentials from the same variables as minio.
        MINIO_ROOT_USER="scale-test",
        MINIO_ROOT_PASSWORD=secrets.token_hex(16),
        TORCH_INDEX_URL=app_image.torch_index_url,
        PHOTOS_DIR=str(work / "photos"),  # an empty photo folder (default: ./photos, created in the checkout)
    )
    (work / "photos").mkdir(mode=0o755)
    s = Scale(PROJECT, f"http://127.0.0.1:{port}", api_key, env, override, env_file, work, profiles=("scale",))
    s.photos_dir = work / "photos"
    s.report.update(benchmark="compose_scale", date=datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"), **engine_versions())
    say(request, f"\n[test-docker] scale profile: project {PROJECT}, lb on port {port}, logs in {work}")
    s.compose("down", "--volumes", "--remove-orphans", timeout=300)  # leftovers of an interrupted run of this project
    try:
        s.report["images"] = {service: standins(service)[0] for service in ("minio", "lb", "redis")}
        builds = app_image.report.get("builds", "once for the session (the compose_stack line)")
        s.report["app_image"] = {"image_gb": app_image.report.get("image_gb"), "builds": builds}
        s.report["loadavg_1m_at_up"] = round(os.getloadavg()[0], 1)
        s.report["healthy_s"] = round(s.up("lb"), 1)
        yield s
    finally:
        # Every service's log, for whoever reads a failure (the project is gone after `down -v`).
        (work / "services.log").write_text(s.compose("logs", "--no-color", timeout=120).stdout, encoding="utf-8")
        s.report["down_v_ok"], down = s.down_volumes()
        say(request, "\n" + json.dumps(s.report))
    assert s.report["down_v_ok"], f"docker compose down -v did not remove everything: {down}"


def test_only_the_load_balancer_is_published_and_the_replicas_are_healthy(scale: Scale) -> None:
    running = set(scale.check("ps", "--services", "--status", "running").split())
    assert running == {"db", "redis", "minio", *REPLICAS, "lb"}, running  # not the default `app`
    for service in ("db", "redis", "minio", *REPLICAS):
        inner = scale.container(service)
        assert not any(inner["NetworkSettings"]["Ports"].values()), (service, inner["NetworkSettings"]["Ports"])
    bindings = scale.container("lb")["NetworkSettings"]["Ports"]["80/tcp"]
    assert {(b["HostIp"], b["HostPort"]) for b in bindings} == {("127.0.0.1", scale.base_url.rsplit(":", 1)[1])}
    for _ in REPLICAS:  # least connections: sequential requests alternate between the two replicas
        health = scale.get("/health")
        assert health.status_code == 200, health.text
        body = health.json()
        assert (body["status"], body["database"], body["storage"], body["cache"]) == ("ok", "ok", "ok", "ok"), body
        assert body["libraries"] == "ok", body
    # The photo folder, read-only at the same path in both replicas: one library (its state in db) for both.
    for service in REPLICAS:
        photos = {m["Destination"]: m for m in scale.container(service)["Mounts"]}["/photos"]
        assert (photos["Type"], photos["Source"], photos["RW"]) == ("bind", str(scale.photos_dir), False), photos
    for service in REPLICAS:
        status, _ = scale.get_inside(service, "/libraries/photos")
        assert status == 200, service
    library = scale.get("/libraries").json()
    assert [(lib["name"], lib["source"], lib["roots"]) for lib in library] == [("photos", "env", ["/photos"])]


def test_bulk_index_through_the_load_balancer_lands_in_the_bucket(scale: Scale, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    chosen: dict[str, Path] = {}
    for src in sorted(INSTANCE.rglob("*.jpg")):
        if len(chosen) < N_IMAGES:
            chosen.setdefault(sha256(src), src)
    for src in chosen.values():
        symlink(src, folder / src.parent.name / src.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_SEARCH_")}
    env["IMAGE_SEARCH_API_KEY"] = scale.api_key
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "bulk_index.py"), str(folder), "--api", scale.base_url]
        + ["--no-progress", "--failures-log", str(tmp_path / "failures.log")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    match = BULK_SUMMARY.search(proc.stdout)
    assert match and tuple(int(n) for n in match.groups()[:4]) == (N_IMAGES, 0, N_IMAGES, 0), proc.stdout
    scale.report["index_s"] = round(time.monotonic() - start, 1)
    scale.report["indexed"] = N_IMAGES
    scale.indexed = chosen

    keys = scale.bucket_keys()
    stored = {key.rsplit("/", 1)[-1].split(".", 1)[0] for key in keys}
    assert stored == set(chosen), (sorted(stored), sorted(chosen))
    scale.report["bucket_objects"] = len(keys)
    for service in REPLICAS:  # nothing of the originals on a replica's own volume
        files = scale.check("exec", "-T", service, "find", "/data", "-type", "f").split()
        copies = [path for path in files if any(image_id in path for image_id in chosen)]
        assert not copies, (service, copies)
    assert scale.get("/stats").json()["count"] == N_IMAGES


def test_either_replica_serves_the_same_originals_and_search_results(scale: Scale) -> None:
    assert scale.indexed, "needs the images indexed by the previous test"
    sample = list(scale.indexed.items())[:4]
    before = scale.served_by_each("GET /image/[0-9a-f]{64}")
    for image_id, src in sample:
        for _ in REPLICAS:
            original = scale.get(f"/image/{image_id}")
            assert original.status_code == 200 and original.content == src.read_bytes(), (src, original.status_code)
    after = scale.served_by_each("GET /image/[0-9a-f]{64}")
    served = {service: after[service] - before[service] for service in REPLICAS}
    assert sum(served.values()) == 2 * len(sample) and all(served.values()), served

    image_id, src = sample[0]
    before = scale.served_by_each("POST /search_image")
    answers = [scale.search_image(src, top_k="5") for _ in range(4)]
    after = scale.served_by_each("POST /search_image")
    searched = {service: after[service] - before[service] for service in REPLICAS}
    assert all(searched.values()), searched
    assert all(answer == answers[0] for answer in answers), answers
    assert answers[0][0]["score"] > 0.999 and image_id in {r["id"] for r in answers[0]}, answers[0]
    scale.report["served"] = {s: {"originals": served[s], "searches": searched[s]} for s in REPLICAS}


def test_a_delete_through_the_load_balancer_is_gone_for_both_replicas(scale: Scale) -> None:
    assert scale.indexed, "needs the images indexed by the earlier test"
    image_id, src = list(scale.indexed.items())[-1]
    digest = sha256(src)
    for service in REPLICAS:  # both have served (and may remember) it before the delete
        assert scale.get_inside(service, f"/image/{image_id}") == (200, digest)
    deleted = httpx.delete(f"{scale.base_url}/image/{image_id}", headers=scale.headers, timeout=60)
    assert deleted.status_code == 200, deleted.text
    for service in REPLICAS:
        assert scale.get_inside(service, f"/image/{image_id}")[0] == 404, service
    for _ in REPLICAS:
        assert scale.get(f"/image/{image_id}").status_code == 404
        assert image_id not in {r["id"] for r in scale.search_image(src, top_k="5")}
    assert not any(image_id in key for key in scale.bucket_keys())
    del scale.indexed[image_id]
    assert scale.get("/stats").json()["count"] == N_IMAGES - 1


def test_the_load_balancer_keeps_serving_with_one_replica_stopped(scale: Scale) -> None:
    assert scale.indexed, "needs the images indexed by the earlier test"
    sample = list(scale.indexed.items())[:3]
    scale.check("stop", "app-a")
    times = []
    try:
        for image_id, src in sample:
            for _ in REPLICAS:
                start = time.monotonic()
                original = scale.get(f"/image/{image_id}")
                assert original.status_code == 200 and original.content == src.read_bytes(), original.status_code
                results = scale.search_image(src, top_k="5")
                assert image_id in {r["id"] for r in results}, results
                times.append(time.monotonic() - start)
        assert scale.get("/health").json()["status"] == "ok"
    finally:
        start = time.monotonic()
        scale.up("app-a")
        scale.report["app_a_start_s"] = round(time.monotonic() - start, 1)
    scale.report["one_replica_down"] = {
        "requests": 2 * len(times),
        "max_pair_s": round(max(times), 2),
        "total_s": round(sum(times), 2),
    }
    # Back in rotation: app-a serves through lb again (after nginx's fail_timeout of 5 s has passed).
    time.sleep(5)
    before = scale.served("app-a", "GET /image/[0-9a-f]{64}")
    image_id, src = sample[0]
    for _ in range(4):
        assert scale.get(f"/image/{image_id}").content == src.read_bytes()
    assert scale.served("app-a", "GET /image/[0-9a-f]{64}") > before, "app-a got no request after its start"


def test_web_ui_through_the_load_balancer(scale: Scale) -> None:
    assert scale.indexed, "needs the images indexed by the earlier test"
    ui = scale.get("/ui/", follow_redirects=True)
    assert ui.status_code == 200 and "gradio" in ui.text.lower(), ui.text[:500]
    config = scale.get("/ui/config")
    assert config.status_code == 200 and config.json()["version"].startswith("6."), config.text[:500]
    from gradio_client import Client, handle_file

    image_id, src = next(iter(scale.indexed.items()))
    client = Client(scale.base_url + "/ui/", verbose=False, headers=scale.headers, download_files=False)
    results, status = client.predict(photo=handle_file(str(src)), results_per_page=5, api_name="/search")
    assert status.startswith("5 results"), status
    rest = scale.search_image(src, top_k="5", exclude_self="true")
    assert [r["id"] for r in results] == [r["id"] for r in rest], (results, rest)
    # One replica served the whole UI session (ip_hash): Gradio keeps the session in that replica's memory.
    ui_requests = scale.served_by_each("(GET|POST) /ui/[^ ]*")
    assert sorted(ui_requests.values())[0] == 0 and max(ui_requests.values()) > 0, ui_requests
