"""The import graph of app/ and ui/ beside the contracts in pyproject.toml ([tool.importlinter], run by `lint-imports`).

Two things those contracts cannot say: ``acyclic_siblings`` compares the modules inside a package with each other,
so a package's ``__init__`` and one of its own modules importing each other slip through; and a layers contract
checks only the modules it names, so a new top-level module left out of it would be checked by nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("app", "ui", cache_dir=None)


def test_no_module_imports_itself_back(graph):
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert cycles == []


def test_every_top_level_module_is_in_a_layer(graph):
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    assert sorted(graph.find_children("app") - named) == []
    assert "ui" in named
