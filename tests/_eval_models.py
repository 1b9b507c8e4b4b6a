"""Small real models for the evaluation tests: a byte-level BPE trained on WikiText-2, a randomly initialised
tiny OPT teacher and a same-shape BiSpikCLM student, each saved with ``save_pretrained`` beside its tokenizer."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.data import train_tokenizer

# These models are tiny; one thread avoids oversubscribing small shared CI machines.
torch.set_num_threads(1)


def build_tokenizer(data_dir: Path, vocab_size: int = 1024, lines: int = 5000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the first ``lines`` lines of WikiText-2 train."""
    with open(data_dir / "wikitext-2" / "train.txt", encoding="utf-8") as handle:
        return train_tokenizer(list(islice(handle, lines)), vocab_size)


def build_models(data_dir: Path, out: Path, max_positions: int = 1024) -> tuple[Path, Path]:
    """Save a tiny OPT teacher and a BiSpikCLM student (random weights) under ``out``; return their folders."""
    tokenizer = build_tokenizer(data_dir)
    torch.manual_seed(0)
    teacher_config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=max_positions,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, init_std=0.2)
    student_config = BiSpikCLMConfig.from_teacher_config(teacher_config, time_steps=2)
    folders = []
    for name, model in (("teacher", OPTForCausalLM(teacher_config)), ("student", BiSpikCLMForCausalLM(student_config))):
        folder = out / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]
