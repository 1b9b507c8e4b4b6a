"""``bispikclm train RECIPE``: distill a BiSpikCLM student from a Hugging Face teacher with SpAD.

The recipe (YAML; see ``bispikclm/recipes/``) has sections ``teacher`` (a ``from_pretrained`` name or folder),
``tokenizer`` (default: the teacher's), ``data`` (``train`` and ``valid`` sources), ``student``
(BiSpikCLMConfig overrides, and ``kind: ann`` for the same-shape ANN baseline) and ``train``
(:class:`bispikclm.distill.TrainConfig`). Several processes:
``torchrun --nproc_per_node N -m bispikclm train RECIPE`` (or ``accelerate launch`` with an FSDP config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..ann import same_shape_ann
from ..configuration import BiSpikCLMConfig, has_rotary_positions
from ..data import training_data
from ..distill import TEACHER_DTYPES, TrainConfig, Trainer, check_teacher, load_teacher
from ..distill.init import INIT_MODES, init_from_teacher
from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM
from ..recipes import load_recipe, merge, parse_overrides

SECTIONS = ("teacher", "tokenizer", "data", "student", "train")
# student.kind: the spiking student, or the ANN of exactly its shape (bispikclm.ann), the baseline for the price of
# spikes: the same teacher, losses, tokens, data order and seed
STUDENT_KINDS = ("spiking", "ann")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (quickstart, opt-125m, opt-1.3b) or YAML file")
    parser.add_argument("--out", required=True, help="run folder (metrics, checkpoints, final model)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set train.tokens=1000000 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    recipe = merge(load_recipe(args.recipe), parse_overrides(args.set))
    missing = [s for s in ("teacher", "data", "train") if s not in recipe]
    if missing or set(recipe) - set(SECTIONS):
        raise UserError(f"recipe {args.recipe!r} needs sections {SECTIONS} (missing {missing}, unknown "
                        f"{sorted(set(recipe) - set(SECTIONS))})")
    config = TrainConfig.from_dict(recipe["train"])
    teacher = load_teacher(str(recipe["teacher"]), dtype=TEACHER_DTYPES[config.teacher_dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(recipe.get("tokenizer") or recipe["teacher"]))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer: {str(err).splitlines()[0]}") from None
    check_teacher(teacher, len(tokenizer), config.seq_len)
    student_section = dict(recipe.get("student") or {})
    kind, init = student_section.pop("kind", "spiking"), student_section.pop("init", "random")
    if kind not in STUDENT_KINDS:
        raise UserError(f"student.kind must be one of {STUDENT_KINDS}, got {kind!r}")
    if init not in INIT_MODES:
        raise UserError(f"student.init must be one of {INIT_MODES}, got {init!r}")
    if "max_position_embeddings" not in student_section and has_rotary_positions(teacher.config):
        student_section["max_position_embeddings"] = config.seq_len    # a learned table sized to the context
    student_config = BiSpikCLMConfig.from_teacher_config(teacher.config, **student_section)
    if config.seq_len > student_config.max_position_embeddings:
        raise UserError(f"sequence length {config.seq_len} is beyond the student's "
                        f"{student_config.max_position_embeddings} positions")
    train_seqs, val_seqs = training_data(recipe["data"], tokenizer, config.seq_len, Path(args.out) / "data",
                                         str(recipe.get("tokenizer") or recipe["teacher"]))
    torch.manual_seed(config.seed)
    student = (BiSpikCLMForCausalLM(student_config) if kind == "spiking"
               else same_shape_ann(student_config, attn_implementation="eager"))
    if init != "random":
        init_from_teacher(student, teacher, init)
    trainer = Trainer(student, config, train_seqs, val_seqs, args.out, teacher=teacher,
                      fingerprint={"teacher": str(recipe["teacher"])}, progress=not args.no_progress,
                      tokenizer=tokenizer)
    final = trainer.fit(resume=args.resume)
    if trainer.accelerator.is_main_process:
        (Path(args.out) / "final.json").write_text(json.dumps(final, indent=1))
        summary = {k: final[k] for k in ("step", "tokens", "loss", "val_ppl", "tokens_per_s", "skipped_steps", "processes")
                   if k in final}
        print(json.dumps(summary))
    return 0
