#!/usr/bin/env python3
"""Run from a checkout: regenerate .env.example and docs/configuration/settings.md from app.config.Settings (see
app/cli/gen_settings_docs.py for what it owns; ``--check`` compares instead of writing)."""

import sys
from pathlib import Path

# This checkout's app first: the generator writes the files of the checkout it imports, and a virtualenv shared by
# several worktrees has its editable install pointing at only one of them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cli.gen_settings_docs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
