"""Corpora, BPE tokenizer and packing on real WikiText-2 text."""

from __future__ import annotations

import math

import pytest
import torch

from bispikclm.data import encode, load_texts, pack, train_tokenizer, unigram_log_probs
from bispikclm.errors import UserError
from distill_setup import make_tokenizer


def test_load_texts_reads_a_split_of_a_local_folder(data_dir):
    lines = load_texts(str(data_dir / "wikitext-2"), "valid", max_documents=50)
    assert len(lines) == 50 and any("=" in line for line in lines)
    assert load_texts(str(data_dir / "wikitext-2" / "test.txt"), max_documents=3)[1].startswith(" = Robert")


@pytest.mark.parametrize("content", [b"", b" \n\n  \n", b"\xff\xfe\x00bad"])
def test_empty_or_unreadable_text_is_a_user_error(tmp_path, content):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_texts(str(path))
    with pytest.raises(UserError, match="cannot read"):
        load_texts(str(tmp_path / "missing.txt"))


def test_tokenizer_is_trained_once_then_loaded_from_cache(data_dir, tmp_path):
    tokenizer = make_tokenizer(data_dir, tmp_path / "tok", vocab_size=600)
    assert len(tokenizer) == 600 and tokenizer.eos_token == "<|endoftext|>"
    text = " The game 's battle system was praised ."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 2
    cached = train_tokenizer(["unrelated text"], 600, tmp_path / "tok")
    assert cached(text)["input_ids"] == ids
    with pytest.raises(UserError, match="cached tokenizer"):
        train_tokenizer(["x"], 700, tmp_path / "tok")


def test_encode_and_pack_keep_the_token_stream(data_dir, tmp_path):
    tokenizer = make_tokenizer(data_dir, tmp_path / "tok")
    lines = load_texts(str(data_dir / "wikitext-2"), "valid", max_documents=200)
    ids = encode(lines, tokenizer, batch_size=64)
    assert tokenizer.decode(ids.tolist()) == "".join(lines)
    seqs = pack(ids, 32)
    assert seqs.shape == (len(ids) // 32, 32) and torch.equal(seqs.flatten(), ids[: seqs.numel()])
    with pytest.raises(UserError, match="fewer than one sequence"):
        pack(ids[:10], 32)


def test_unigram_log_probs_are_add_one_smoothed():
    logp = unigram_log_probs(torch.tensor([0, 0, 1]), 4)
    assert torch.allclose(logp.exp(), torch.tensor([3, 2, 1, 1], dtype=torch.double) / 7)
    assert math.isclose(float(logp.exp().sum()), 1.0)
