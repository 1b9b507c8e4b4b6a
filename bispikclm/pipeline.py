"""The steps that ``bispikclm train``, ``bispikclm quickstart`` and the benchmarks share, so that a benchmark
measures exactly what the commands train.

* Students from a recipe's ``student`` section: ``kind`` (``spiking``, or ``ann``: the ANN of exactly the student's
  shape, :func:`bispikclm.ann.same_shape_ann`), ``init`` (``random``, ``embeddings``, ``all`` or ``calibrated``:
  :func:`bispikclm.distill.init.init_from_teacher`) and every other key a
  :class:`~bispikclm.configuration.BiSpikCLMConfig` override on the teacher's shape (:func:`student_config`,
  :func:`build_student`).
* The quickstart teacher: a small OPT trained on WikiText-2 until its validation loss stops improving
  (:func:`train_quickstart_teacher`), or a saved one (:func:`load_saved_teacher`).
* WikiText-2 token ids under a BPE trained on its train split (:func:`wikitext_ids`), the unigram baseline on the
  windows perplexity scores (:func:`unigram_perplexity`) and the energy ratio without the heads
  (:func:`blocks_ratio`).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from .ann import same_shape_ann
from .configuration import BiSpikCLMConfig, has_rotary_positions
from .data import encode, load_texts, train_tokenizer, unigram_log_probs
from .distill import TrainConfig, Trainer, load_teacher
from .distill.init import INIT_MODES, calibration_sequences, init_from_teacher, student_section_for
from .errors import UserError
from .evaluation.perplexity import windows
from .modeling import BiSpikCLMForCausalLM
from .recipes.schema import STUDENT_KINDS



def split_student_section(section: dict | None) -> tuple[str, str, dict]:
    """``(kind, init, overrides)`` of a recipe's ``student`` section, the overrides as ``init`` needs them
    (``calibrated`` sets per-channel neurons); a one-line UserError for an unknown kind or init."""
    overrides = dict(section or {})
    kind, init = overrides.pop("kind", "spiking"), overrides.pop("init", "random")
    if kind not in STUDENT_KINDS:
        raise UserError(f"student.kind must be one of {STUDENT_KINDS}, got {kind!r}")
    if init not in INIT_MODES:
        raise UserError(f"student.init must be one of {INIT_MODES}, got {init!r}")
    return kind, init, student_section_for(overrides, init)


def student_config(teacher_config, section: dict | None, seq_len: int | None = None) -> BiSpikCLMConfig:
    """The student config a recipe's ``student`` section describes on ``teacher_config``'s shape. With
    ``seq_len``, a student of a rotary-position teacher (no table to copy) gets a learned table of ``seq_len``
    rows unless the section sizes it."""
    _, _, overrides = split_student_section(section)
    if seq_len is not None and "max_position_embeddings" not in overrides and has_rotary_positions(teacher_config):
        overrides["max_position_embeddings"] = seq_len
    return BiSpikCLMConfig.from_teacher_config(teacher_config, **overrides)


def build_student(teacher, section: dict | None, train_seqs: torch.Tensor | None = None, seed: int = 0,
                  calibration: torch.Tensor | None = None, kind: str | None = None, seq_len: int | None = None):
    """The student (``section``'s ``kind``, or ``kind`` when given) that a recipe's ``student`` section describes,
    initialized from ``teacher`` as its ``init`` says. The random weights are drawn from torch's global generator
    (seed it first, e.g. ``torch.manual_seed(train.seed)``). ``init: calibrated`` uses ``calibration`` (token ids
    ``[S, N]``) or, without it, :func:`~bispikclm.distill.init.calibration_sequences` of ``train_seqs`` drawn with
    ``seed`` (its own generator: the global one is left alone). A one-line UserError when the init cannot serve
    this teacher or student."""
    own_kind, init, _ = split_student_section(section)
    kind = own_kind if kind is None else kind
    if kind not in STUDENT_KINDS:
        raise UserError(f"student.kind must be one of {STUDENT_KINDS}, got {kind!r}")
    config = student_config(teacher.config, section, seq_len)
    student = (BiSpikCLMForCausalLM(config) if kind == "spiking"
               else same_shape_ann(config, attn_implementation="eager"))
    if init == "calibrated" and calibration is None:
        if train_seqs is None:
            raise UserError("student.init calibrated needs training sequences to calibrate on")
        calibration = calibration_sequences(train_seqs, seed=seed)
    try:
        init_from_teacher(student, teacher, init, calibration=calibration)
    except ValueError as err:        # a teacher or student that this init cannot serve
        raise UserError(f"student.init {init}: {err}") from None
    return student


def quickstart_teacher_model(recipe: dict, tokenizer):
    """The randomly initialized OPT of a quickstart recipe's ``teacher`` section (its OPTConfig fields), with
    ``tokenizer``'s vocabulary and special tokens. Draws from torch's global generator."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=len(tokenizer), word_embed_proj_dim=recipe["teacher"]["hidden_size"],
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **recipe["teacher"])
    return OPTForCausalLM(config)


def train_quickstart_teacher(recipe: dict, tokenizer, train_seqs: torch.Tensor, val_seqs: torch.Tensor,
                             folder: str | Path, progress: bool = True) -> dict:
    """Train the quickstart teacher into ``folder`` (a training run folder: ``model/``, ``metrics.jsonl``,
    ``checkpoints/``) with the recipe's ``teacher_train`` section, seeded with its seed; with early stopping it
    never stops before the students' token count (``train.tokens``). Returns the trainer's final metrics."""
    config = TrainConfig.from_dict(recipe.get("teacher_train", {}), "teacher_train")
    if config.early_stopping:    # a converged teacher: never fewer tokens than the students see
        config.min_tokens = max(config.min_tokens, TrainConfig.from_dict(recipe.get("train", {})).tokens)
    torch.manual_seed(config.seed)
    return Trainer(quickstart_teacher_model(recipe, tokenizer), config, train_seqs, val_seqs, folder,
                   progress=progress, tokenizer=tokenizer).fit()


def load_saved_teacher(folder: str | Path, dtype: torch.dtype | None = None):
    """A frozen teacher from a saved model folder or from a training run folder holding it in ``model/``."""
    path = Path(folder)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    return load_teacher(str(path), dtype=dtype)


def wikitext_ids(data: Path, vocab_size: int, cache_dir: Path):
    """Tokenizer trained on WikiText-2 train (:func:`bispikclm.data.train_tokenizer`, cached) and the token ids of
    train/valid/test (cached)."""
    folder = Path(data) / "wikitext-2"
    try:
        digest = hashlib.sha256((folder / "train.txt").read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise UserError(f"cannot read WikiText-2 from {folder}: {err.strerror}; pass --data DIR") from None
    cache = Path(cache_dir) / f"wikitext2-bpe{vocab_size}-{digest}"
    tokenizer = train_tokenizer(load_texts(str(folder), "train"), vocab_size, cache)
    ids_path = cache / "ids.pt"
    if ids_path.is_file():
        ids = torch.load(ids_path, weights_only=True)
    else:
        ids = {split: encode(load_texts(str(folder), split), tokenizer) for split in ("train", "valid", "test")}
        torch.save(ids, ids_path)
    return tokenizer, ids


def unigram_perplexity(train_ids: torch.Tensor, ids: torch.Tensor, vocab_size: int, context: int) -> float:
    """Perplexity of the add-one smoothed unigram model on exactly the tokens that
    :func:`bispikclm.evaluation.perplexity.perplexity` scores with non-overlapping windows of ``context``."""
    targets = torch.cat([ids[first:end] for _, end, first in windows(ids.numel(), context, context)])
    return math.exp(-float(unigram_log_probs(train_ids, vocab_size)[targets].mean()))


def blocks_ratio(energy: dict) -> float:
    """Student energy over the ANN's (an :func:`~bispikclm.energy.energy_report`) with both heads left out
    (embedding, blocks, neurons, residuals)."""
    def without_head(summary: dict) -> float:
        return summary["energy_mj_per_token"] - summary["parts"].get("head", {}).get("mj_per_token", 0.0)

    return without_head(energy["student"]) / without_head(energy["ann"])
