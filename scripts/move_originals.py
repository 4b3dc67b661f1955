#!/usr/bin/env python3
"""Run from a checkout: the same as the installed command (see app/cli/move_originals.py for what it does)."""

import sys

from app.cli.move_originals import main

if __name__ == "__main__":
    sys.exit(main())
