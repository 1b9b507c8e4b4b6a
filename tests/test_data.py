"""Corpora, BPE tokenizer and packing on real WikiText-2 text."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from bispikclm.data import (TokenFile, default_data_dir, encode, iter_texts, load_texts, pack, tokenize_to_file,
                            train_tokenizer, training_data, unigram_log_probs)
from bispikclm.errors import UserError
from helpers import make_tokenizer


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


def test_token_file_holds_the_same_stream_as_encode_and_pack(data_dir, tmp_path):
    """Tokenizing to disk gives the ids `encode` gives; the memory-mapped sequences equal `pack`'s, at 2 bytes per
    token; a second call with the same metadata reuses the file, other metadata rewrites it."""
    tokenizer = make_tokenizer(data_dir, tmp_path / "tok")
    lines = load_texts(str(data_dir / "wikitext-2"), "valid", max_documents=300)
    ids = encode(lines, tokenizer)
    path = tokenize_to_file(iter_texts(str(data_dir / "wikitext-2"), "valid", max_documents=300), tokenizer,
                            tmp_path / "valid.bin", batch_size=64, meta={"split": "valid"})
    assert path.stat().st_size == 2 * ids.numel()
    seqs, packed = TokenFile(path, 32), pack(ids, 32)
    assert seqs.shape == packed.shape and len(seqs) == len(packed)
    index = torch.tensor([5, 0, len(packed) - 1, 5])
    assert seqs[index].dtype == torch.long and torch.equal(seqs[index], packed[index])
    assert torch.equal(seqs[:3], packed[:3]) and torch.equal(seqs[[1]], packed[[1]])
    stamp = path.stat().st_mtime_ns
    tokenize_to_file(["never read"], tokenizer, path, meta={"split": "valid"})
    assert path.stat().st_mtime_ns == stamp
    tokenize_to_file(["other text"], tokenizer, path, meta={"split": "other"})
    assert TokenFile(path, 1).shape == (len(tokenizer("other text")["input_ids"]), 1)
    assert not list(tmp_path.glob("*.tmp.*"))


def test_token_file_streams_only_the_documents_it_needs(data_dir, tmp_path):
    """`max_tokens` stops reading an endless corpus: the corpus is never held in memory."""
    tokenizer = make_tokenizer(data_dir, tmp_path / "tok")
    endless = (f" line {i} of a corpus larger than memory ." for i in itertools.count())
    path = tokenize_to_file(endless, tokenizer, tmp_path / "big.bin", max_tokens=10_000, batch_size=100)
    assert TokenFile(path, 100).shape == (100, 100)
    assert tokenizer.decode(TokenFile(path, 100)[0].tolist()).startswith(" line 0 of a corpus")
    for blank in ([], ["\n", "  \n"]):
        with pytest.raises(UserError, match="'blank.txt' holds no text"):
            tokenize_to_file(iter(blank), tokenizer, tmp_path / "empty.bin", label="'blank.txt'")
    assert not list(tmp_path.glob("empty.bin*"))
    with pytest.raises(UserError, match="not a token file"):
        TokenFile(tmp_path / "missing.bin", 8)


def test_recipe_sources_name_the_data_folder_and_detokenize_wikitext(data_dir, monkeypatch):
    from bispikclm.data import data_source, detokenized as _detokenized

    monkeypatch.setenv("BISPIKCLM_DATA", str(data_dir))
    assert data_source("data:wikitext-2") == str(data_dir / "wikitext-2")
    assert data_source("HuggingFaceFW/fineweb-edu") == "HuggingFaceFW/fineweb-edu"
    line = " The 1 @,@ 000 @-@ year old city , of course , is \" great \" . \n"
    assert list(_detokenized([line], "wikitext")) == [' The 1,000-year old city, of course, is "great".\n']
    assert list(_detokenized([line], None)) == [line]
    with pytest.raises(UserError, match="detokenize"):
        list(_detokenized([line], "nope"))


def test_one_default_data_folder_for_commands_benchmarks_and_tasks(monkeypatch, tmp_path):
    import argparse

    from bispikclm.commands import quickstart
    from bispikclm.data import default_text_path
    from bispikclm.evaluation.perplexity import wikitext2_text

    monkeypatch.delenv("BISPIKCLM_DATA", raising=False)
    assert default_data_dir() == Path(__file__).resolve().parents[1].parent / "shared" / "data"
    monkeypatch.setenv("BISPIKCLM_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path and default_text_path() == tmp_path / "wikitext-2" / "test.txt"
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    assert parser.parse_args([]).data == str(tmp_path)
    with pytest.raises(UserError, match=str(tmp_path)):
        wikitext2_text("raw")


def separated(tokenizer, lines):
    """The expected stream: each non-blank line between the tokenizer's BOS (if distinct from EOS) and EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None and bos != eos else []
    tail = [eos] if eos is not None else []
    return [i for line in lines if line.strip() for i in head + tokenizer(line, add_special_tokens=False)["input_ids"] + tail]


@pytest.mark.parametrize("specials", ["eos=bos", "bos+eos", "none"])
def test_training_data_puts_documents_between_the_tokenizers_bos_and_eos(data_dir, tmp_path, specials):
    """A recipe's data section -> (memory-mapped train sequences, valid sequences). Documents (here lines of
    WikiText-2) are separated as the tokenizer defines it: the quickstart tokenizer's one <|endoftext|> (BOS = EOS)
    after each document, a Llama-style <s> ... </s> around each, or nothing when the tokenizer has neither."""
    tokenizer = make_tokenizer(data_dir, tmp_path / "tok")
    if specials == "bos+eos":
        tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    elif specials == "none":
        tokenizer.bos_token = tokenizer.eos_token = None
    wikitext = str(data_dir / "wikitext-2")
    data = {"train": {"source": wikitext, "split": "train", "max_documents": 200},
            "valid": {"source": wikitext, "split": "valid", "max_documents": 100, "max_tokens": 2000}}
    train, valid = training_data(data, tokenizer, 32, tmp_path / "run", "tok")
    lines = load_texts(wikitext, "train", max_documents=200)
    expected = torch.tensor(separated(tokenizer, lines))
    assert isinstance(train, TokenFile) and torch.equal(train[:], pack(expected, 32))
    valid_ids = separated(tokenizer, load_texts(wikitext, "valid", max_documents=100))[:2000]
    assert torch.equal(valid, pack(torch.tensor(valid_ids), 32))
    if specials == "eos=bos":
        assert (expected == tokenizer.eos_token_id).sum() == sum(1 for line in lines if line.strip())
    with pytest.raises(UserError, match="data section needs 'train'"):
        training_data({"valid": data["valid"]}, tokenizer, 32, tmp_path / "run", "tok")
    with pytest.raises(UserError, match="takes only"):
        training_data({"train": {"source": wikitext, "splits": "x"}}, tokenizer, 32, tmp_path / "run", "tok")
