"""Where the project's data lives by default. Standard library only, so that command-line defaults are read
without loading torch."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """The data folder (WikiText-2, zero-shot tasks): ``$BISPIKCLM_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("BISPIKCLM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
