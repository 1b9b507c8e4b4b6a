"""Corpora and tokenization: text from local files or the Hugging Face hub, a byte-level BPE tokenizer trained
with ``tokenizers``, and token streams packed into fixed-length training sequences.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import UserError

SPECIAL_TOKENS = ("<|endoftext|>",)


def load_texts(source: str, split: str = "train", *, name: str | None = None, text_field: str = "text",
               max_documents: int | None = None) -> list[str]:
    """Lines or documents of a corpus, as strings.

    ``source`` is a local text file, a folder holding ``<split>.txt`` (e.g. WikiText-2), or a Hugging Face hub
    dataset name (e.g. ``HuggingFaceFW/fineweb-edu`` with ``name="sample-10BT"``), which is streamed so that only
    ``max_documents`` documents are downloaded."""
    import datasets

    path = Path(source)
    if path.is_dir():
        path = path / f"{split}.txt"
    if path.suffix == ".txt" or path.exists():
        try:
            with path.open(encoding="utf-8") as f:
                texts = list(islice(f, max_documents))
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read text file {path}: {err}") from None
    else:
        try:
            stream = datasets.load_dataset(source, name, split=split, streaming=True)
            texts = [row[text_field] for row in islice(stream, max_documents)]
        except Exception as err:  # hub, network and schema errors all mean: this source cannot be used
            raise UserError(f"cannot load dataset {source!r} (split {split!r}): {str(err).splitlines()[0]}") from None
    if not any(t.strip() for t in texts):
        raise UserError(f"dataset {source!r} (split {split!r}) holds no text")
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, cache_dir: str | Path | None = None
                    ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab_size`` tokens (``<|endoftext|>`` included), trained on ``texts``.

    With ``cache_dir``, a tokenizer saved there is loaded instead of trained, and a trained one is saved there."""
    from tokenizers import ByteLevelBPETokenizer

    if cache_dir is not None and (Path(cache_dir) / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(cache_dir))
        if len(tokenizer) != vocab_size:
            raise UserError(f"cached tokenizer in {cache_dir} has {len(tokenizer)} tokens, not {vocab_size}; "
                            f"delete it or use another folder")
        return tokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    eos = SPECIAL_TOKENS[0]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eos, eos_token=eos,
                                        unk_token=eos, pad_token=eos)
    if cache_dir is not None:
        tokenizer.save_pretrained(str(cache_dir))
    return tokenizer


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, batch_size: int = 1000) -> torch.Tensor:
    """All ``texts`` tokenized and concatenated into one stream of token ids ``[num_tokens]``."""
    ids: list[int] = []
    for start in range(0, len(texts), batch_size):
        for row in tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A token stream ``[num_tokens]`` cut into non-overlapping sequences ``[num_tokens // seq_len, seq_len]``."""
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the data has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def unigram_log_probs(train_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities ``[vocab_size]`` from training token counts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    return (counts / counts.sum()).log()
