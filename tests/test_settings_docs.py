"""The configuration table has one owner: .env.example and docs/configuration/settings.md are what
app/cli/gen_settings_docs.py writes from app.config.Settings and its compose-only declarations, never hand edits.

tests/test_deploy_files.py checks .env.example's content against Settings, docker-compose.yml and the Dockerfile;
these tests check that both files are the generator's output, and the generator's own rules.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field

from app.cli import gen_settings_docs as gen
from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def test_generated_files_are_up_to_date() -> None:
    stale = gen.stale_files(gen.generated_files(ROOT), ROOT)
    names = ", ".join(path.relative_to(ROOT).as_posix() for path in stale)
    assert not stale, (
        f"out of date: {names} (not what app/cli/gen_settings_docs.py writes from app.config.Settings). Change the "
        f"Field descriptions or the compose-only declarations, not the files; regenerate with {gen.REGENERATE}.\n\n"
        + "\n".join(stale.values())
    )


def test_every_settings_field_has_a_description_and_a_group() -> None:
    docs = gen.setting_docs()  # raises on a field without either
    assert sorted(doc.name for doc in docs) == sorted(name.upper() for name in Settings.model_fields)


def test_a_field_without_description_or_group_is_refused() -> None:
    class Undocumented(Settings):
        no_text: int = Field(1, json_schema_extra={"group": "server"})
        no_group: int = Field(2, description="A setting without a group.")

    with pytest.raises(ValueError, match="no_text") as refused:
        gen.setting_docs(Undocumented)
    assert "no_group" in str(refused.value)


def test_compose_only_variables_are_declared_once_with_compose_defaults() -> None:
    names = [v.name for v in gen.COMPOSE_VARIABLES]
    assert len(names) == len(set(names))
    assert not set(names) & {name.upper() for name in Settings.model_fields}, "a Settings field is no compose-only one"
    assert {v.group for v in gen.COMPOSE_VARIABLES} <= gen.COMPOSE_GROUPS.keys()
    compose = "\n".join(
        line for line in COMPOSE_FILE.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")
    )
    fallbacks: dict[str, set[str]] = {}
    for name, default in re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*):-([^${}]*)\}", compose):
        fallbacks.setdefault(name, set()).add(default)
    for variable in gen.COMPOSE_VARIABLES:
        if variable.name == "COMPOSE_PROFILES":
            # Compose reads it itself; the `:-pgvector` after it is VECTOR_DB's fallback, not a profile.
            continue
        assert fallbacks.get(variable.name) == {variable.default}, (
            f"{variable.name}: declared default {variable.default!r}, docker-compose.yml falls back to "
            f"{sorted(fallbacks.get(variable.name, []))}"
        )
    (torch_index,) = (v for v in gen.COMPOSE_VARIABLES if v.name == "TORCH_INDEX_URL")
    assert f"ARG TORCH_INDEX_URL={torch_index.default}" in DOCKERFILE.read_text(encoding="utf-8")


def test_comments_wrap_at_120_columns_without_breaking_commands_or_starting_with_an_assignment() -> None:
    text = (
        "word " * 20
        + "end `docker compose --profile scale up -d --build --wait lb` then "
        + "x" * 25
        + " DBA=true and more words"
    )
    for width in range(60, 121):  # the code span is 58 columns with its "# "
        lines = gen.wrap_comment(text, width)
        assert all(len(line) <= width for line in lines), width
        assert not any(re.match(r"#\s*[A-Z][A-Z0-9_]*=", line) for line in lines), (width, lines)
        assert sum("`docker compose --profile scale up -d --build --wait lb`" in line for line in lines) == 1
        assert " ".join(line.removeprefix("# ") for line in lines) == " ".join(text.split())


def test_markdown_cells_escape_pipes_and_html() -> None:
    class Piped(Settings):
        piped: str = Field(
            "a|b",
            description="Either x | y, as in `x|y`; <tmp> stays text, *not* emphasis.",
            json_schema_extra={"group": "server"},
        )

    page = gen.render_markdown(Piped)
    (row,) = (line for line in page.splitlines() if line.startswith("| `PIPED`"))
    cells = re.split(r"(?<!\\)\|", row.strip())[1:-1]
    assert len(cells) == 4, row
    assert cells[2].strip() == r"`a\|b`"
    assert cells[3].strip() == r"Either x \| y, as in `x\|y`; \<tmp> stays text, \*not\* emphasis."
