import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder: $BISPIKCLM_DATA, default <repo>/../shared/data. Missing data is an error."""
    path = Path(os.environ.get("BISPIKCLM_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not (path / "README.md").is_file():
        raise FileNotFoundError(f"data folder {path} not found; set BISPIKCLM_DATA")
    return path
