"""Small real components the tests share: byte-level BPE tokenizers trained on WikiText-2, randomly initialised
teachers (OPT, Llama, GPT-2) and BiSpikCLM students saved with ``save_pretrained`` beside their tokenizer, recipes
that train on real text, the command line in a fresh process, a Llama written as a GGUF file as llama.cpp writes
it, and the packed engine run against the PyTorch model token by token."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast)

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.data import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512

# These models are tiny; one thread avoids oversubscribing small shared CI machines.
torch.set_num_threads(1)


# ---- tokenizers -----------------------------------------------------------------------------------------------

def make_tokenizer(data_dir: Path, folder: Path | None = None, vocab_size: int = VOCAB,
                   lines: int = 3000) -> PreTrainedTokenizerFast:
    """Byte-level BPE of ``vocab_size`` tokens trained on the first ``lines`` lines of WikiText-2 train; with
    ``folder``, saved there (and loaded from there when it already holds one)."""
    with (data_dir / "wikitext-2" / "train.txt").open(encoding="utf-8") as handle:
        return train_tokenizer(list(islice(handle, lines)), vocab_size, folder)


# ---- teachers and students ------------------------------------------------------------------------------------

def make_teacher(arch: str, folder: Path, tokenizer, positions: int = 64, width: int = 32, layers: int = 2) -> Path:
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


def save_models(data_dir: Path, out: Path, *, vocab_size: int, lines: int, ffn_dim: int, max_positions: int,
                init_std: float, spiking_student: bool) -> dict[str, Path]:
    """Save ``teacher`` (a tiny OPT: width 64, 2 layers, 4 heads), ``student`` (BiSpikCLM of its shape, T = 2,
    LayerNorm head) and with ``spiking_student`` also ``spiking_student`` (``spiking_head=True``) under ``out``,
    each beside one shared tokenizer; random weights (seed 0). Returns their folders by name."""
    tokenizer = make_tokenizer(data_dir, vocab_size=vocab_size, lines=lines)
    torch.manual_seed(0)
    teacher = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        ffn_dim=ffn_dim, word_embed_proj_dim=64, max_position_embeddings=max_positions,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, init_std=init_std)
    models = {"teacher": OPTForCausalLM(teacher),
              "student": BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(teacher, time_steps=2))}
    if spiking_student:
        models["spiking_student"] = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(
            teacher, time_steps=2, spiking_head=True))
    folders = {}
    for name, model in models.items():
        folders[name] = out / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def cost_models(data_dir: Path, out: Path) -> dict[str, Path]:
    """The models of the cost, audit and report tests: ``teacher``, ``student`` and ``spiking_student``
    (512 tokens, FFN 256, 256 positions, OPT's initialisation)."""
    return save_models(data_dir, out, vocab_size=512, lines=3000, ffn_dim=256, max_positions=256, init_std=0.02,
                       spiking_student=True)


def eval_models(data_dir: Path, out: Path, max_positions: int = 1024) -> tuple[Path, Path]:
    """The (teacher, student) folders of the evaluation and bad-input tests (1,024 tokens, FFN 128, weights of
    standard deviation 0.2 so that the student fires)."""
    folders = save_models(data_dir, out, vocab_size=1024, lines=5000, ffn_dim=128, max_positions=max_positions,
                          init_std=0.2, spiking_student=False)
    return folders["teacher"], folders["student"]


# ---- recipes and the command line -----------------------------------------------------------------------------

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


# ---- GGUF -----------------------------------------------------------------------------------------------------
# A Hugging Face Llama and its byte-level BPE tokenizer written as a GGUF file, as llama.cpp's converter does (the
# ``gguf`` package's writer; transformers reads GGUF but does not write it).

def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for the rotary halves of Q/K (the GGUF reader undoes it)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(model: LlamaForCausalLM, tokenizer, path) -> None:
    """Write a Llama (tied embeddings) and its byte-level BPE tokenizer as llama.cpp does, in float32."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.model.state_dict().items():
        parts = name.removesuffix(".weight").split(".")
        data = tensor.float().numpy()
        if parts[0] == "layers":
            kind = names[".".join(parts[2:])]
            if kind in ("attn_q", "attn_k"):
                data = _rope_permute(data, config.num_attention_heads if kind == "attn_q"
                                     else config.num_key_value_heads)
            writer.add_tensor(f"blk.{parts[1]}.{kind}.weight", data)
        else:
            writer.add_tensor(f"{names[parts[0]]}.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- the packed engine against the model ----------------------------------------------------------------------

def llama_folder_and_gguf(data_dir: Path, root: Path):
    """``(folder, model, tokenizer, gguf)``: a random grouped-query Llama (tied embeddings) with a BPE tokenizer
    trained on WikiText-2, saved as a ``save_pretrained`` folder and written as the GGUF file ``gguf``."""
    tokenizer = make_tokenizer(data_dir, root / "tok")
    folder = make_teacher("llama-gqa", root / "folder", tokenizer)
    model = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    path = root / "gguf" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_llama_gguf(model, tokenizer, path)
    return folder, model, tokenizer, path


def engine_and_model(model: BiSpikCLMForCausalLM, ids: torch.Tensor, prefill: int, int8: bool = False,
                     bits: int = 8):
    """Run ``ids`` ``[N]`` through the PyTorch model at once and through the packed engine: a prefill of the first
    ``prefill`` tokens, then the rest one by one against the packed cache. Returns ``(engine spikes, model spikes,
    engine logits [N, V], model logits [N, V])``, the spikes by neuron name as
    :func:`bispikclm.engine.spike_agreement` compares them."""
    from bispikclm.engine import PackedEngine, model_spikes

    theirs, logits = model_spikes(model, ids)
    engine = PackedEngine.from_model(model, int8=int8, bits=bits)
    cache, records, steps = engine.new_cache(), [], []
    for chunk in [ids[:prefill]] + [ids[i:i + 1] for i in range(prefill, len(ids))]:
        records.append({})
        steps.append(engine.forward(chunk, cache, all_logits=True, record=records[-1]))
    ours = {k: np.concatenate([r[k] for r in records]) for k in records[0]}
    return ours, theirs, torch.cat(steps), logits


# ---- real small file systems for the fault tests ------------------------------------------------------------------

def mount(*options: str, target: Path) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *options, str(target)], capture_output=True).returncode == 0


@contextlib.contextmanager
def tmpfs(target: Path, size: str = "16m"):
    """A real tmpfs of ``size`` at ``target`` (skips where this machine cannot mount one); unmounted after."""
    target.mkdir(parents=True, exist_ok=True)
    if not mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", target=target):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)]).returncode:
            subprocess.run(["umount", "-l", str(target)], check=True)
            raise AssertionError(f"{target} was still in use")


# ---- a small calibrated student -----------------------------------------------------------------------------------

def calibrated_opt(time_steps: int = 2, **options):
    """A small untrained OPT teacher and its same-shape per-channel count student (IF, from θ/2, ``options`` on
    top) calibrated on 24 random sequences of 32 tokens: ``(teacher, student, sequences)``."""
    from transformers import OPTConfig, OPTForCausalLM

    from bispikclm import BiSpikCLMConfig
    from bispikclm.distill.init import init_from_teacher

    torch.manual_seed(0)
    teacher = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64)).eval()
    config = BiSpikCLMConfig.from_teacher_config(teacher.config, time_steps=time_steps, fire="count", beta=1.0,
                                                 initial_membrane=0.5, per_channel_neurons=True, **options)
    student = BiSpikCLMForCausalLM(config).eval()
    sequences = torch.randint(0, 300, (24, 32))
    init_from_teacher(student, teacher, "calibrated", calibration=sequences)
    return teacher, student, sequences


def first_block_spikes_and_teacher_q(teacher, student, sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's first block-input spikes ``[T, S, N, C]`` (of its embeddings, constant over T) and the
    teacher's first ``q_proj`` output ``[S, N, D]`` on ``sequences``: what calibration fits ``q_proj`` between."""
    seen = {}
    hook = teacher.model.decoder.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, out: seen.__setitem__("q", out))
    with torch.no_grad():
        teacher(input_ids=sequences)
    hook.remove()
    n = sequences.shape[1]
    with torch.no_grad():
        x0 = student.model.embed(sequences, torch.arange(n)[None].expand_as(sequences))
        x = x0.unsqueeze(0).expand(student.config.time_steps, *x0.shape).contiguous()
        spikes = student.model.layers[0].attn_in_neuron(x)
    return spikes, seen["q"]
