"""Shared fixtures: the real data folder (``BISPIKCLM_DATA``, default ``<repo>/../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("BISPIKCLM_DATA", REPO.parent / "shared" / "data"))
    if not (path / "wikitext-2" / "train.txt").is_file():
        raise FileNotFoundError(f"data folder {path} lacks wikitext-2/train.txt; set BISPIKCLM_DATA")
    return path
