# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The import contracts in pyproject.toml ([tool.importlinter]: layers, no cycles); import-linter has no `python -m`.
LINT_IMPORTS := $(VENV)/bin/lint-imports

.PHONY: run test test-fast test-docker lint docs docs-serve docs-settings bench-quality bench-latency clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m app

test: $(STAMP)
	$(PY) -m ruff check app ui scripts bench tests
	$(LINT_IMPORTS)
	$(PY) -m pytest

# The tests that need no model, database or server (unmarked `slow`): under a minute, for quick iterations.
test-fast: $(STAMP)
	$(PY) -m ruff check app ui scripts bench tests
	$(LINT_IMPORTS)
	$(PY) -m pytest -m "not slow"

# The Compose stack end to end (tests/docker): builds the image once, runs app + db + redis, checks the Gradio UI and
# the cache, indexes, searches, restarts, scales the app to two replicas, then runs the `scale` profile (two replicas
# behind nginx, originals in MinIO) on the same image, and prints one JSON line of timings per stack. Not
# part of `make test` / .ci/run: it downloads several GB and takes many minutes. Where ../shared/tools/docker exists
# (machines with no container registry), its scripts first install and start a Docker engine and build local
# stand-ins for the base images, and afterwards the build cache of that engine is pruned (each --no-cache build adds
# over 10 GB; the disk is shared); elsewhere a running engine is used and its build cache is left alone. The test
# itself builds stand-ins for the redis, minio and nginx images when they can be neither found nor pulled
# (tests/docker/*-standin), and removes them afterwards.
# PYTEST_ARGS adds pytest options, e.g. PYTEST_ARGS=--basetemp=/tmp/pt-docker where other pytest runs share /tmp.
DOCKER_TOOLS ?= ../shared/tools/docker
PYTEST_ARGS ?=

test-docker: $(STAMP)
	if [ -x $(DOCKER_TOOLS)/setup-engine.sh ]; then $(DOCKER_TOOLS)/setup-engine.sh && $(DOCKER_TOOLS)/build-standins.sh; fi
	status=0; $(PY) -m pytest -m docker tests/docker $(PYTEST_ARGS) || status=$$?; \
	if [ -x $(DOCKER_TOOLS)/setup-engine.sh ]; then docker builder prune --all --force > /dev/null; fi; \
	exit $$status

lint: $(STAMP)
	$(PY) -m ruff check app ui scripts bench tests
	$(PY) -m ruff format --check app ui scripts bench tests
	$(LINT_IMPORTS)
	$(MAKE) docs

# The documentation site (mkdocs.yml, docs/) into build/site/, strict: a broken link or anchor, or a page missing from
# the navigation, fails it. It needs no network to build or to view. NO_MKDOCS_2_WARNING hides Material's notice
# about its end of life (May 2027) and its successor, which would otherwise print at every build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The same site with live reload at http://127.0.0.1:8001/ while you edit docs/.
docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --strict --dev-addr 127.0.0.1:8001

# .env.example and docs/configuration/settings.md are generated from app.config.Settings (and the compose-only
# variables of app/cli/gen_settings_docs.py): regenerate them after changing a setting. tests/test_settings_docs.py
# fails while either is stale; `$(PY) scripts/gen_settings_docs.py --check` shows the difference.
docs-settings: $(STAMP)
	$(PY) scripts/gen_settings_docs.py

bench-quality: $(STAMP)
	$(PY) bench/quality.py --api http://localhost:$${PORT:-8000} --dataset ../shared/datasets/instance_small

bench-latency: $(STAMP)
	$(PY) bench/latency.py --api http://localhost:$${PORT:-8000}

clean:
	rm -rf $(VENV) .pytest_cache .import_linter_cache
