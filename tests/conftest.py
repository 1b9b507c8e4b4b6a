"""Shared fixtures: the real data folder (``BISPIKCLM_DATA``, default ``<repo>/../shared/data``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bispikclm.data import default_data_dir



@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = default_data_dir()
    if not (path / "wikitext-2" / "train.txt").is_file():
        raise FileNotFoundError(f"data folder {path} lacks wikitext-2/train.txt; set BISPIKCLM_DATA")
    return path


@pytest.fixture(scope="session")
def wikitext_word_ids(data_dir):
    """WikiText-2 as word ids: ``(train, valid, vocab_size)``, vocabulary = the 4,095 most frequent train words
    plus one id for every other word (a tokenizer-free, real-text stream for model tests)."""
    from collections import Counter

    import torch

    words = {split: (data_dir / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8").split()
             for split in ("train", "valid")}
    vocab = {w: i for i, (w, _) in enumerate(Counter(words["train"]).most_common(4095))}
    ids = {s: torch.tensor([vocab.get(w, 4095) for w in ws]) for s, ws in words.items()}
    return ids["train"], ids["valid"], 4096


def pytest_terminal_summary(terminalreporter) -> None:
    """How many bad-input cases ran, by kind (tests/test_bad_input.py), when that suite ran."""
    module = sys.modules.get("test_bad_input")
    cases = getattr(module, "CASES", None)
    if cases:
        terminalreporter.write_sep("-", f"bad-input cases: {sum(cases.values())} in {len(cases)} kinds")
        for kind, count in sorted(cases.items()):
            terminalreporter.write_line(f"{count:5d}  {kind}")
