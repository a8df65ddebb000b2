"""``python -m LumbarBMDLib`` is the same as the ``lumbarbmd`` command."""

from __future__ import annotations

import sys

from LumbarBMDLib.cli import main

if __name__ == "__main__":
    sys.exit(main())
