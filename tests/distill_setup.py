"""Small real components for the distillation tests: a BPE tokenizer trained on WikiText-2, randomly initialized
OPT / Llama / GPT-2 teachers saved with ``save_pretrained``, and recipes that train on real text."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from bispikclm.data import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


def make_tokenizer(data_dir: Path, folder: Path, vocab_size: int = VOCAB):
    with (data_dir / "wikitext-2" / "train.txt").open(encoding="utf-8") as f:
        return train_tokenizer(list(islice(f, 3000)), vocab_size, folder)


def make_teacher(arch: str, folder: Path, tokenizer, positions: int = 64, width: int = 32, layers: int = 2):
    """A randomly initialized teacher of ``arch`` (opt, llama, llama-gqa: grouped-query attention with 2 K/V heads
    for 4 query heads and tied embeddings, gpt2), saved with its tokenizer in ``folder``."""
    torch.manual_seed(0)
    vocab = len(tokenizer)
    if arch == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=width, word_embed_proj_dim=width,
                                         num_hidden_layers=layers, num_attention_heads=4, ffn_dim=2 * width,
                                         max_position_embeddings=positions, dropout=0.0))
    elif arch in ("llama", "llama-gqa"):
        gqa = arch == "llama-gqa"
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                                             intermediate_size=2 * width, max_position_embeddings=positions,
                                             tie_word_embeddings=gqa))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4,
                                           n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_recipe(path: Path, teacher: Path, data_dir: Path, **train) -> Path:
    """A recipe distilling a same-shape student from ``teacher`` on the first WikiText-2 lines."""
    wikitext = str(data_dir / "wikitext-2")
    recipe = {
        "teacher": str(teacher),
        "data": {"train": {"source": wikitext, "split": "train", "max_documents": 2000},
                 "valid": {"source": wikitext, "split": "valid", "max_documents": 300}},
        "student": {"time_steps": 2},
        "train": {"tokens": 4 * 32 * 12, "seq_len": 32, "batch_size": 4, "lr": 0.003, "warmup_ratio": 0.2,
                  "eval_batches": 2, "log_every": 1, **train},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli_command(*args: str, launcher: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """Command line and environment of ``bispikclm ARGS`` in a fresh single-threaded process (so that results are
    bit-reproducible), optionally under a launcher such as ``-m torch.distributed.run``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    return [sys.executable, *launcher, "-m", "bispikclm", *args, "--no-progress"], env


def cli(*args: str, launcher: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``bispikclm ARGS`` (see :func:`cli_command`) to completion."""
    argv, env = cli_command(*args, launcher=launcher)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
