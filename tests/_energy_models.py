"""Small real models for the cost and audit tests: a byte-level BPE trained on WikiText-2 train, a randomly
initialised tiny OPT and same-shape BiSpikCLM students, each saved with ``save_pretrained`` beside the tokenizer."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.data import train_tokenizer


def build_tokenizer(data_dir: Path, vocab_size: int = 512, lines: int = 3000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the first ``lines`` lines of WikiText-2 train."""
    with open(data_dir / "wikitext-2" / "train.txt", encoding="utf-8") as handle:
        return train_tokenizer(list(islice(handle, lines)), vocab_size)


def build_models(data_dir: Path, out: Path) -> dict[str, Path]:
    """Save ``teacher`` (tiny OPT), ``student`` (BiSpikCLM, LayerNorm head) and ``spiking_student``
    (``spiking_head=True``) under ``out``; all random weights, same shape, same tokenizer."""
    tokenizer = build_tokenizer(data_dir)
    torch.manual_seed(0)
    teacher = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=256, word_embed_proj_dim=64, max_position_embeddings=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    models = {"teacher": OPTForCausalLM(teacher),
              "student": BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(teacher, time_steps=2)),
              "spiking_student": BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(
                  teacher, time_steps=2, spiking_head=True))}
    folders = {}
    for name, model in models.items():
        folders[name] = out / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders
