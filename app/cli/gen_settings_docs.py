"""Write ``.env.example`` and ``docs/configuration/settings.md`` from :class:`app.config.Settings`.

Usage: ``make docs-settings`` (or ``python scripts/gen_settings_docs.py``) rewrites both files;
``python scripts/gen_settings_docs.py --check`` writes nothing and exits 1 with a diff when either differs from what
this module produces (``tests/test_settings_docs.py`` does the same in memory, so a stale file fails the tests).

Why generated: both files list every variable with its default and description, and hand-kept copies of that
table drifted from the code and from each other (issue #25). Each piece of text now has one owner:

- the service's settings: the fields of :class:`app.config.Settings`, each with its type and bounds, its default,
  ``Field(description=...)``, ``json_schema_extra={"group": ...}`` and, where the default is ``None``,
  ``examples=[...]`` (the value ``.env.example`` shows instead of an empty one);
- the compose-only variables, read by ``docker-compose.yml`` and the Dockerfile but never by the service:
  :data:`COMPOSE_VARIABLES` below;
- the group headings and intros (:data:`GROUPS`, :data:`COMPOSE_GROUPS`) and the prose around the tables (the
  constants below), including ``.env.example``'s preamble on the values Docker fixes.

Not an installed command (no ``[project.scripts]`` entry): it writes files of a checkout, the one this package was
imported from.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = Path(".env.example")
SETTINGS_PAGE = Path("docs/configuration/settings.md")
REGENERATE = "`make docs-settings` (or `python scripts/gen_settings_docs.py`)"

#: .env.example wraps its comments here: the project's line length (pyproject.toml, ruff).
COMMENT_WIDTH = 120


@dataclass(frozen=True)
class Group:
    """A group of variables: a ``# --- title ---`` block of ``.env.example`` and a section of the settings page."""

    title: str
    see: str = ""  # the docs page (under docs/) that explains the feature at length, e.g. "security.md"
    intro: str = ""  # prose on the whole group, written before its variables


#: Group key (a field's ``json_schema_extra["group"]``) -> heading, in the order both files list them.
GROUPS: dict[str, Group] = {
    "server": Group("server"),
    "access": Group("access", "security.md"),
    "storage": Group("storage"),
    "object storage": Group("object storage of the originals", "object-storage.md"),
    "vector database": Group("vector database"),
    "model": Group("model"),
    "embedding cache": Group("embedding cache: memory (L1) -> Redis (L2) -> stored vector (L3) -> model", "caching.md"),
    "limits": Group("limits"),
    "search features": Group("search features"),
    "libraries": Group("photo libraries indexed in place", "libraries.md"),
}


@dataclass(frozen=True)
class ComposeVariable:
    """A variable that docker-compose.yml substitutes (``${NAME:-default}``) or passes on as a Dockerfile build
    argument, and that the service itself never reads: no Settings field, so it is declared here."""

    name: str
    group: str  # a key of COMPOSE_GROUPS
    default: str  # Compose's fallback in docker-compose.yml, shown in .env.example
    description: str


#: The groups of the compose-only variables, in the order both files list them.
COMPOSE_GROUPS: dict[str, Group] = {
    "profiles": Group(
        "picking the vector database",
        intro="`docker compose up` starts the app, PostgreSQL + pgvector and Redis. The profiles `milvus` (Milvus "
        "standalone with its etcd and MinIO) and `manticore` (Manticore Search) add a backend, and the app's "
        "VECTOR_DB defaults to the profile named in COMPOSE_PROFILES, so one line in .env switches both: "
        "COMPOSE_PROFILES=milvus or COMPOSE_PROFILES=manticore. The same works from the shell, as in "
        "`COMPOSE_PROFILES=milvus docker compose up`. With the command-line flag instead, set VECTOR_DB as well: "
        "`VECTOR_DB=milvus docker compose --profile milvus up`. An explicit VECTOR_DB always wins; with both "
        "profiles active it is required. Stop a profile's services with `docker compose --profile milvus down`.",
    ),
    "services": Group("the db, app and redis services"),
    "scale": Group(
        "profile scale",
        "scaling.md",
        intro="Two app replicas behind nginx, originals in MinIO; started with "
        "`docker compose --profile scale up -d --build --wait lb` (name lb; --profile, not COMPOSE_PROFILES=scale). "
        "The load balancer takes APP_BIND:APP_PORT.",
    ),
    "build": Group("image build"),
}

COMPOSE_VARIABLES: tuple[ComposeVariable, ...] = (
    ComposeVariable(
        "COMPOSE_PROFILES",
        "profiles",
        "",
        "Compose profiles to enable besides app, db and redis: empty (pgvector only), milvus or manticore.",
    ),
    ComposeVariable(
        "POSTGRES_USER",
        "services",
        "imagesearch",
        "Database superuser created on the first start of the db container (changing it later needs a new volume).",
    ),
    ComposeVariable(
        "POSTGRES_PASSWORD",
        "services",
        "imagesearch",
        "Password of POSTGRES_USER; set a real secret before exposing anything. Keep it URL-safe: it is embedded in "
        "DATABASE_URL.",
    ),
    ComposeVariable(
        "POSTGRES_DB", "services", "imagesearch", "Database created on the first start and used by the service."
    ),
    ComposeVariable(
        "APP_PORT",
        "services",
        "8000",
        "Host port the service is published on (http://localhost:APP_PORT); a range (8000-8001) for "
        '`docker compose up --scale app=2`, one port per app container (docker-compose.yml, "scaling the app").',
    ),
    ComposeVariable(
        "APP_BIND",
        "services",
        "127.0.0.1",
        "Host address the port is published on. 127.0.0.1: this host only (the safe default). 0.0.0.0: every "
        "interface, so other machines can reach the service; or one interface's address. Set API_KEY before you "
        "open it up.",
    ),
    ComposeVariable(
        "REDIS_MAXMEMORY",
        "services",
        "256mb",
        "Memory limit of the redis service (the embedding cache's shared layer); allkeys-lfu evicts beyond it.",
    ),
    ComposeVariable(
        "PHOTOS_DIR",
        "services",
        "./photos",
        "Host folder of photos indexed in place (docs/docker.md): mounted read-only at /photos in the app containers "
        "(the scale profile's replicas too), the library `photos` of LIBRARY_ROOTS' Compose default, scanned at the "
        "first start; nothing is copied. A relative path is relative to docker-compose.yml. Docker creates a missing "
        "folder, owned by root; the service (uid 10001) must be able to read the photos.",
    ),
    ComposeVariable(
        "MINIO_ROOT_USER",
        "scale",
        "minioadmin",
        "MinIO's root user, which the replicas use as their S3 credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); "
        "minioadmin is MinIO's development default: MinIO is not published, but set your own (the password at least "
        "8 characters) before you keep data there. Changing them later needs a new scale-minio volume.",
    ),
    ComposeVariable(
        "MINIO_ROOT_PASSWORD",
        "scale",
        "minioadmin",
        "MinIO's root password (the replicas' AWS_SECRET_ACCESS_KEY); minioadmin is the development default.",
    ),
    ComposeVariable(
        "SCALE_BUCKET",
        "scale",
        "originals",
        "Bucket of the originals in MinIO (IMAGE_STORE_URL=s3://SCALE_BUCKET/originals); created at the replicas' "
        "start.",
    ),
    ComposeVariable(
        "TORCH_INDEX_URL",
        "build",
        "https://download.pytorch.org/whl/cpu",
        "Build argument: PyTorch wheel index for torch/torchvision (e.g. https://download.pytorch.org/whl/cu130 for "
        "CUDA).",
    ),
)

# The prose both files share: where the values come from, and which ones Docker fixes.
SOURCES = (
    "`python -m app` reads .env from the working directory, and `docker compose` reads it both for ${...} "
    "substitution in docker-compose.yml and as the app's env_file. Real environment variables take precedence over "
    ".env."
)
DOCKER_FIXED = (
    "In Docker, the image and docker-compose.yml fix the values of HOST (0.0.0.0), PORT (8000), DATA_DIR (/data), "
    "IMAGE_DIR (/data/images), MODEL_CACHE_DIR (/models), DATABASE_URL (the `db` service), MILVUS_URI "
    "(http://milvus:19530) and MANTICORE_HOST/MANTICORE_PORT (manticore, 9306); change the published port with "
    "APP_PORT below instead, and pick the vector database with COMPOSE_PROFILES (see {compose_only})."
)
COMPOSE_ONLY = "Read only by docker-compose.yml (not by the service itself)"

_RULE = "# " + "=" * 102
# `NAME=...` at the start of a comment line reads as a variable to whoever parses .env.example (people, and
# tests/test_deploy_files.py): a wrapped description must never start a line with one.
_ASSIGNMENT_START = re.compile(r"^[A-Z][A-Z0-9_]*=")
# A word, or the words of a `code span` with what sticks to them: a command is not broken across lines.
_WORD = re.compile(r"(?:[^\s`]*`[^`]*`)+[^\s`]*|\S+")


@dataclass(frozen=True)
class SettingDoc:
    """One Settings field as both files show it."""

    name: str  # the environment variable: the field name in upper case
    group: str
    type: str  # for the settings page, with the field's bounds
    default: object  # the field's default (None: unset)
    shown: str  # the value .env.example shows: the default, or the field's example where the default is None
    description: str


def setting_docs(settings_cls: type[Settings] = Settings) -> list[SettingDoc]:
    """The fields of ``settings_cls``, in :data:`GROUPS` order and, within a group, in declaration order.

    Raises:
        ValueError: a field lacks a one-paragraph description or a known group; both files need them.
    """
    docs: list[SettingDoc] = []
    problems: list[str] = []
    for name, field in settings_cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        group = extra.get("group")
        if not field.description or "\n" in field.description:
            problems.append(f"{name}: needs Field(description=...), one paragraph")
        elif group not in GROUPS:
            problems.append(f"{name}: json_schema_extra={{'group': ...}} must be one of {list(GROUPS)}, not {group!r}")
        else:
            docs.append(
                SettingDoc(
                    name=name.upper(),
                    group=str(group),
                    type=_type_name(field),
                    default=field.default,
                    shown=_shown_value(field),
                    description=field.description,
                )
            )
    if problems:
        raise ValueError(
            "Settings fields lack what .env.example and the settings page need:\n  " + "\n  ".join(problems)
        )
    order = list(GROUPS)
    return sorted(docs, key=lambda doc: order.index(doc.group))  # a stable sort: declaration order within a group


def _shown_value(field: FieldInfo) -> str:
    """The value .env.example shows, as the environment variable spells it (it parses back to the default)."""
    value = field.default
    if value is None:
        return str(field.examples[0]) if field.examples else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        # Path("./data") prints as "data": keep the "./" so that the value reads as a relative path.
        text = value.as_posix()
        return text if value.is_absolute() or text.startswith(".") else f"./{text}"
    return str(value)


_TYPE_NAMES: dict[object, str] = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    Path: "path",
    SecretStr: "secret string",
}


def _type_name(field: FieldInfo) -> str:
    """The field's type in words, with its bounds: ``int, ≥ 1, ≤ 65535``, ``one of `lru`, `lfu```."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # X | None: that it may be unset is the default column's business
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        name = "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    elif annotation in _TYPE_NAMES:
        name = _TYPE_NAMES[annotation]
    else:
        raise ValueError(f"no documentation name for the type {annotation!r}: add one to _TYPE_NAMES")
    bounds: list[str] = []
    for item in field.metadata:
        if isinstance(item, Ge):
            bounds.append(f"≥ {item.ge}")
        elif isinstance(item, Gt):
            bounds.append(f"> {item.gt}")
        elif isinstance(item, Le):
            bounds.append(f"≤ {item.le}")
        elif isinstance(item, Lt):
            bounds.append(f"< {item.lt}")
        elif isinstance(item, MinLen):
            bounds.append(f"at least {item.min_length} characters")
        elif isinstance(item, MaxLen):
            bounds.append(f"at most {item.max_length} characters")
        elif getattr(item, "pattern", None):
            bounds.append(f"matching `{item.pattern}`")
    return ", ".join([name, *bounds])


# ------------------------------------------------------------------------------------------------------------
# .env.example
# ------------------------------------------------------------------------------------------------------------


def wrap_comment(text: str, width: int = COMMENT_WIDTH) -> list[str]:
    """``text`` as ``# ``-prefixed comment lines of at most ``width`` characters (a longer word or code span keeps
    a line of its own), none of which starts with ``NAME=``: such a word takes the word before it along."""
    lines: list[list[str]] = []
    for word in _WORD.findall(text):
        current = lines[-1] if lines else None
        if current is not None and len("# " + " ".join([*current, word])) <= width:
            current.append(word)
            continue
        carried = [current.pop()] if current and len(current) > 1 and _ASSIGNMENT_START.match(word) else []
        lines.append([*carried, word])
    return ["# " + " ".join(words) for words in lines]


def _env_heading(group: Group) -> list[str]:
    see = f" (docs/{group.see})" if group.see else ""
    return ["", f"# --- {group.title}{see} ---", *(wrap_comment(group.intro) if group.intro else [])]


def render_env_example(
    settings_cls: type[Settings] = Settings, compose: Sequence[ComposeVariable] = COMPOSE_VARIABLES
) -> str:
    """The text of ``.env.example``: every setting and compose-only variable, commented out at its default."""
    out = [
        "# Configuration of the image similarity search service.",
        "#",
        *wrap_comment(
            "Generated from app/config.py (the settings) and app/cli/gen_settings_docs.py (the compose-only "
            f"variables) by {REGENERATE}: change a description or a default there, not here."
        ),
        "#",
        *wrap_comment(f"Copy to .env and uncomment what you change. {SOURCES} Every line below shows the default."),
        "#",
        *wrap_comment(DOCKER_FIXED.format(compose_only="[compose-only]")),
        "",
        _RULE,
        "# [settings] Application settings: one per field of app.config.Settings (upper-case field name)",
        _RULE,
    ]
    group = None
    for doc in setting_docs(settings_cls):
        if doc.group != group:
            group = doc.group
            out += _env_heading(GROUPS[group])
        out += [*wrap_comment(doc.description), f"# {doc.name}={doc.shown}"]
    out += ["", _RULE, f"# [compose-only] {COMPOSE_ONLY}", _RULE]
    for key, group in COMPOSE_GROUPS.items():
        out += _env_heading(group)
        for variable in compose:
            if variable.group == key:
                out += [*wrap_comment(variable.description), f"# {variable.name}={variable.default}"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------
# docs/configuration/settings.md
# ------------------------------------------------------------------------------------------------------------


def _markdown(text: str, *, in_table: bool = False) -> str:
    """Plain text as Markdown: outside `code spans`, the characters that would start HTML, emphasis or
    strike-through are escaped; in a table cell ``|`` is escaped everywhere (GFM reads it as a cell border even in
    a code span)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts lie outside code spans
        parts[i] = re.sub(r"([\\*<~])", r"\\\1", parts[i])
    text = "`".join(parts)
    return text.replace("|", r"\|") if in_table else text


def _default_cell(doc: SettingDoc) -> str:
    if doc.default is None:
        return f"unset (e.g. `{doc.shown}`)" if doc.shown else "unset"
    return f"`{doc.shown}`" if doc.shown else "empty"


def _row(name: str, *cells: str) -> tuple[str, ...]:
    """A table row: the variable's name as code, then the other cells as Markdown."""
    return (f"`{name}`", *(_markdown(text, in_table=True) for text in cells))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A GFM table; the cells are Markdown already."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown_heading(level: str, group: Group) -> list[str]:
    lines = ["", f"{level} {group.title[0].upper()}{group.title[1:]}", ""]
    if group.see:
        # The page sits in docs/configuration/, the explaining pages one folder up.
        lines += [f"Explained at length in [{group.see}](../{group.see}).", ""]
    if group.intro:
        lines += [_markdown(group.intro), ""]
    return lines


def render_markdown(
    settings_cls: type[Settings] = Settings, compose: Sequence[ComposeVariable] = COMPOSE_VARIABLES
) -> str:
    """The text of the settings reference page: an introduction, a table per group, then the compose-only ones."""
    out = [
        "# Settings reference",
        "",
        f"<!-- Generated from app/config.py and app/cli/gen_settings_docs.py by {REGENERATE}; do not edit. -->",
        "",
        "The service is configured by environment variables, one per field of `app.config.Settings` (the field name "
        f"in upper case). {_markdown(SOURCES)} Values are checked when the service starts (type, bounds, allowed "
        "values); a wrong one stops it with a message that names the setting. `.env.example` in the repository "
        "lists the same variables, commented out at their defaults, ready to copy to `.env`.",
        "",
        _markdown(DOCKER_FIXED.format(compose_only="[the compose-only variables](#compose-only-variables)")),
    ]
    docs = setting_docs(settings_cls)
    for key, group in GROUPS.items():
        rows = [_row(doc.name, doc.type, _default_cell(doc), doc.description) for doc in docs if doc.group == key]
        if not rows:
            continue
        out += [*_markdown_heading("##", group), *_table(("Variable", "Type", "Default", "Description"), rows)]
    out += [
        "",
        "## Compose-only variables",
        "",
        "Variables that docker-compose.yml substitutes (`${NAME:-default}`) or passes to the Dockerfile as a build "
        "argument; the service itself never reads them. Set them in `.env` or in the shell that runs "
        "`docker compose`.",
    ]
    for key, group in COMPOSE_GROUPS.items():
        rows = [
            _row(v.name, f"`{v.default}`" if v.default else "empty", v.description) for v in compose if v.group == key
        ]
        out += [*_markdown_heading("###", group), *_table(("Variable", "Default", "Description"), rows)]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------


def generated_files(root: Path = ROOT) -> dict[Path, str]:
    """Each generated file under ``root`` -> the text it must have."""
    return {root / ENV_EXAMPLE: render_env_example(), root / SETTINGS_PAGE: render_markdown()}


def stale_files(files: dict[Path, str], root: Path = ROOT) -> dict[Path, str]:
    """Those of ``files`` (path -> generated text) whose text on disk differs -> a unified diff from disk to
    generated; empty when every file is up to date."""
    stale: dict[Path, str] = {}
    for path, text in files.items():
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            name = path.relative_to(root).as_posix()
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                f"{name} (on disk)",
                f"{name} (generated)",
            )
            stale[path] = "".join(diff)
    return stale


def main(argv: list[str] | None = None) -> int:
    """Write the generated files, or with ``--check`` compare them; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 with a diff when a file is out of date"
    )
    args = parser.parse_args(argv)
    files = generated_files()
    stale = stale_files(files)
    if args.check:
        for diff in stale.values():
            sys.stdout.write(diff)
        if stale:
            names = ", ".join(path.relative_to(ROOT).as_posix() for path in stale)
            print(f"out of date: {names}; regenerate with {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    for path, text in files.items():
        name = path.relative_to(ROOT).as_posix()
        if path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {name}")
        else:
            print(f"{name} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
