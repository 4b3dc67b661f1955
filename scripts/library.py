#!/usr/bin/env python3
"""Run from a checkout: the same as the installed command (see app/cli/library.py for what it does)."""

import sys

from app.cli.library import main

if __name__ == "__main__":
    sys.exit(main())
