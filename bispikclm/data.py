"""Corpora and tokenization: text from local files or the Hugging Face hub, a byte-level BPE tokenizer trained
with ``tokenizers``, and token streams packed into fixed-length training sequences, in memory (:func:`pack`) or
on disk for corpora larger than memory (:func:`tokenize_to_file`, :class:`TokenFile`). :func:`training_data`
turns a recipe's ``data`` section into training and validation sequences; :func:`default_data_dir` is the data
folder every command and benchmark defaults to, and :func:`text_token_ids` the first tokens of a text file (what
``energy``, ``audit`` and ``report`` run on).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import UserError
from .paths import default_data_dir  # noqa: F401  (re-exported: callers read it from here)
from .recipes.schema import SOURCE_TYPES
from .validation import check_text_file

SPECIAL_TOKENS = ("<|endoftext|>",)
#: Keys of one data source of a recipe (``data.train``, ``data.valid``)
SOURCE_FIELDS = tuple(SOURCE_TYPES)


def default_text_path() -> Path:
    """WikiText-2 test text in the data folder (:func:`default_data_dir`)."""
    return default_data_dir() / "wikitext-2" / "test.txt"


def text_token_ids(tokenizer, path: str | Path | None = None, seq_len: int = 512, num_sequences: int = 1,
                   max_length: int | None = None) -> torch.LongTensor:
    """The first ``num_sequences x seq_len`` tokens of a text file (default: WikiText-2 test) as ``[S, seq_len]``;
    ``max_length``: the model's number of positions, which ``seq_len`` may not exceed."""
    if seq_len < 1 or num_sequences < 1:
        raise UserError(f"the number of tokens and of sequences must be >= 1, got {seq_len} and {num_sequences}")
    if max_length is not None and seq_len > max_length:
        raise UserError(f"sequence length {seq_len} is beyond the model's {max_length} positions")
    path = check_text_file(Path(path) if path is not None else default_text_path(),
                           "text file" if path is not None else "text file (set BISPIKCLM_DATA or pass --text)")
    needed, ids = seq_len * num_sequences, []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
                if len(ids) >= needed:
                    break
    except OSError as err:
        raise UserError(f"cannot read text {path}: {err} (set BISPIKCLM_DATA or pass --text)") from None
    if len(ids) < needed:
        raise UserError(f"{path} holds {len(ids)} tokens, fewer than {num_sequences} x {seq_len}")
    return torch.tensor(ids[:needed]).view(num_sequences, seq_len)


def iter_texts(source: str, split: str = "train", *, name: str | None = None, text_field: str = "text",
               max_documents: int | None = None) -> Iterator[str]:
    """Lines or documents of a corpus, one at a time (nothing is held in memory).

    ``source`` is a local text file, a folder holding ``<split>.txt`` (e.g. WikiText-2), or a Hugging Face hub
    dataset name (e.g. ``HuggingFaceFW/fineweb-edu`` with ``name="sample-10BT"``), which is streamed so that only
    the documents read are downloaded. Unreadable sources raise :class:`UserError` when iteration starts."""
    import datasets

    path = Path(source)
    if path.is_dir():
        path = path / f"{split}.txt"
    if path.suffix == ".txt" or path.exists():
        try:
            with path.open(encoding="utf-8") as f:
                yield from islice(f, max_documents)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read text file {path}: {err}") from None
        return
    try:
        stream = iter(datasets.load_dataset(source, name, split=split, streaming=True))
        first = next(stream, None)
    except Exception as err:  # hub, network and schema errors all mean: this source cannot be used
        raise UserError(f"cannot load dataset {source!r} (split {split!r}): {str(err).splitlines()[0]}") from None
    if first is None:
        return
    for row in islice(chain([first], stream), max_documents):
        if text_field not in row:
            raise UserError(f"dataset {source!r} has no field {text_field!r} (fields: {sorted(row)})")
        yield row[text_field]


def load_texts(source: str, split: str = "train", *, name: str | None = None, text_field: str = "text",
               max_documents: int | None = None) -> list[str]:
    """All lines or documents of a corpus (see :func:`iter_texts`) as a list; an empty corpus is an error."""
    texts = list(iter_texts(source, split, name=name, text_field=text_field, max_documents=max_documents))
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


def _tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase, separators: bool) -> list[list[int]]:
    """Token ids of each text; with ``separators``, each text is a document: blank ones are dropped and the others
    get the tokenizer's BOS before (when it has one distinct from EOS) and its EOS after (when it has one)."""
    if not separators:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    texts = [t for t in texts if t.strip()]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None and bos != eos else []
    tail = [eos] if eos is not None else []
    return [head + row + tail for row in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, batch_size: int = 1000,
           separators: bool = False) -> torch.Tensor:
    """All ``texts`` tokenized and concatenated into one stream of token ids ``[num_tokens]``; with
    ``separators``, every text is a document between the tokenizer's BOS/EOS (see :func:`_tokenize`)."""
    ids: list[int] = []
    for start in range(0, len(texts), batch_size):
        for row in _tokenize(texts[start:start + batch_size], tokenizer, separators):
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A token stream ``[num_tokens]`` cut into non-overlapping sequences ``[num_tokens // seq_len, seq_len]``."""
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the data has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def tokenize_to_file(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, path: str | Path,
                     max_tokens: int | None = None, batch_size: int = 1000, meta: dict | None = None,
                     label: str | None = None, separators: bool = False) -> Path:
    """Tokenize ``texts`` as :func:`encode` does (same ids, concatenated) straight into the binary file ``path``
    (``uint16`` when the vocabulary fits, else ``uint32``), reading documents only until ``max_tokens`` are
    written. Memory stays at one batch of documents, so the corpus may be far larger than memory.

    The file is written under a temporary name and renamed when complete, with ``path.json`` beside it
    (dtype, token count and ``meta``); a file whose ``path.json`` already records the same ``meta`` is reused.
    Texts that are all blank raise :class:`UserError` naming ``label`` (the source they came from)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        if info.get("meta") == (meta or {}) and info.get("bytes") == path.stat().st_size:
            return path
    dtype = np.uint16 if len(tokenizer) <= 2 ** 16 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")   # one per process: several may write the same file
    written, batch = 0, []
    with tmp.open("wb") as out:
        def flush() -> bool:
            nonlocal written
            for row in _tokenize(batch, tokenizer, separators):
                row = row[: max_tokens - written] if max_tokens is not None else row
                out.write(np.asarray(row, dtype=dtype).tobytes())
                written += len(row)
                if max_tokens is not None and written >= max_tokens:
                    return True
            batch.clear()
            return False

        done, any_text = False, False
        for text in texts:
            any_text = any_text or bool(text.strip())
            batch.append(text)
            if len(batch) == batch_size and (done := flush()):
                break
        if batch and not done:
            flush()
    if written == 0 or not any_text:
        tmp.unlink()
        raise UserError(f"{label or 'the data'} holds no text")
    info = {"dtype": np.dtype(dtype).name, "tokens": written, "bytes": written * np.dtype(dtype).itemsize,
            "meta": meta or {}}
    os.replace(tmp, path)
    tmp_sidecar = sidecar.with_name(f"{sidecar.name}.tmp.{os.getpid()}")
    tmp_sidecar.write_text(json.dumps(info, indent=1))
    os.replace(tmp_sidecar, sidecar)
    return path


class TokenFile:
    """Packed sequences ``[len(self), seq_len]`` read from a file written by :func:`tokenize_to_file`.

    The file is memory-mapped: indexing (a list or tensor of sequence indices, an int or a slice) reads only the
    sequences asked for and returns them as a ``long`` tensor, so :class:`~bispikclm.distill.Trainer` can train
    on it exactly as on the tensor :func:`pack` returns."""

    def __init__(self, path: str | Path, seq_len: int) -> None:
        self.path = Path(path)
        sidecar = self.path.with_name(self.path.name + ".json")
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{self.path} is not a token file (no readable {sidecar.name}: {err})") from None
        tokens = np.memmap(self.path, dtype=info["dtype"], mode="r")
        n = tokens.size // seq_len
        if n == 0:
            raise UserError(f"the data has {tokens.size} tokens, fewer than one sequence of {seq_len}")
        self.tokens, self.seq_len = tokens[: n * seq_len].reshape(n, seq_len), seq_len

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        return torch.from_numpy(self.tokens[index].astype(np.int64))


# detokenize: "wikitext" turns WikiText's word-level tokenization ("a @-@ b , c") back into running text, as the raw
# test split and pretrained tokenizers see it (lm-evaluation-harness's wikitext detokenizer)
DETOKENIZERS = ("wikitext",)


def data_source(source: str) -> str:
    """``data:NAME`` is ``NAME`` inside the data folder (:func:`default_data_dir`), so that packaged recipes can
    name the local copies of public corpora; anything else is returned as it is."""
    return str(default_data_dir() / source[len("data:"):]) if source.startswith("data:") else source


def detokenized(texts: Iterable[str], how: str | None) -> Iterable[str]:
    """``texts`` as they are (``how=None``) or detokenized (:data:`DETOKENIZERS`)."""
    if how is None:
        return texts
    if how not in DETOKENIZERS:
        raise UserError(f"data detokenize must be one of {DETOKENIZERS}, got {how!r}")
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return (wikitext_detokenizer({"page": text}) for text in texts)


def source_texts(source: dict, streamed: bool = True) -> Iterable[str]:
    """The documents of one recipe data source, streamed (or all of them, as a list), detokenized if asked."""
    args = source_arguments(source)
    texts = iter_texts(**args) if streamed else load_texts(**args)
    return detokenized(texts, source.get("detokenize"))


def data_meta(source: dict, tokenizer, tokenizer_name: str) -> dict:
    """What a token file is made from: the data source, the tokenizer's name and size, the separators."""
    return {"data": {k: source.get(k) for k in SOURCE_FIELDS}, "tokenizer": tokenizer_name,
            "vocab_size": len(tokenizer), "separators": source.get("separators", True)}


def source_arguments(source: dict) -> dict:
    """:func:`iter_texts` arguments of one recipe data source (keys :data:`SOURCE_FIELDS`; ``source`` needed)."""
    unknown = set(source) - set(SOURCE_FIELDS) if isinstance(source, dict) else None
    if unknown is None or "source" not in source or unknown:
        raise UserError(f"a data source needs 'source' and takes only {SOURCE_FIELDS} (got {source!r})")
    return dict(source=data_source(str(source["source"])), split=source.get("split", "train"), name=source.get("name"),
                text_field=source.get("text_field", "text"), max_documents=source.get("max_documents"))


def training_data(data: dict, tokenizer: PreTrainedTokenizerBase, seq_len: int, folder: str | Path,
                  tokenizer_name: str) -> tuple[TokenFile, torch.Tensor | None]:
    """Training and validation sequences ``[n, seq_len]`` of a recipe's ``data`` section (``train`` and optional
    ``valid`` sources, see :data:`SOURCE_FIELDS`). Every document (a dataset row, a line of a text file) is
    tokenized between the tokenizer's BOS/EOS, and the stream is cut into sequences.

    The training source is tokenized once into ``folder/train.bin`` (streamed: the corpus never sits in memory)
    and memory-mapped; a run resumed in the same folder reuses the file. Of several processes, the main one
    tokenizes and the others wait, then map the complete file. The validation source is tokenized in memory."""
    from accelerate import PartialState

    if not isinstance(data, dict) or "train" not in data or set(data) - {"train", "valid"}:
        raise UserError(f"the data section needs 'train' and takes only 'train' and 'valid' (got {data!r})")
    train = data["train"]
    args = source_arguments(train)
    path = Path(folder) / "train.bin"
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        tokenize_to_file(source_texts(train), tokenizer, path, max_tokens=train.get("max_tokens"),
                         meta=data_meta(train, tokenizer, tokenizer_name),
                         label=f"dataset {args['source']!r} (split {args['split']!r})",
                         separators=train.get("separators", True))
    valid = None
    if "valid" in data:
        ids = encode(list(source_texts(data["valid"], streamed=False)), tokenizer,
                     separators=data["valid"].get("separators", True))
        valid = pack(ids[: data["valid"].get("max_tokens")], seq_len)
    return TokenFile(path, seq_len), valid


def unigram_log_probs(train_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities ``[vocab_size]`` from training token counts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    return (counts / counts.sum()).log()
