"""``bispikclm train RECIPE``: distill a BiSpikCLM student from a Hugging Face teacher with SpAD.

The recipe (YAML; see ``bispikclm/recipes/``) has sections ``teacher`` (a ``from_pretrained`` name or folder),
``tokenizer`` (default: the teacher's), ``data`` (``train`` and ``valid`` sources), ``student``
(BiSpikCLMConfig overrides) and ``train`` (:class:`bispikclm.distill.TrainConfig`). Several processes:
``torchrun --nproc_per_node N -m bispikclm train RECIPE`` (or ``accelerate launch`` with an FSDP config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..configuration import BiSpikCLMConfig
from ..data import encode, load_texts, pack
from ..distill import TrainConfig, Trainer, check_teacher, load_teacher
from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM
from ..recipes import load_recipe, merge, parse_overrides

SECTIONS = ("teacher", "tokenizer", "data", "student", "train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (quickstart, opt-125m, opt-1.3b) or YAML file")
    parser.add_argument("--out", required=True, help="run folder (metrics, checkpoints, final model)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set train.tokens=1000000 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def sequences(source: dict, tokenizer, seq_len: int):
    """Packed sequences ``[n, seq_len]`` of one data source ``{source, split, name, text_field, max_documents}``."""
    texts = load_texts(str(source["source"]), source.get("split", "train"), name=source.get("name"),
                       text_field=source.get("text_field", "text"), max_documents=source.get("max_documents"))
    return pack(encode(texts, tokenizer), seq_len)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    recipe = merge(load_recipe(args.recipe), parse_overrides(args.set))
    missing = [s for s in ("teacher", "data", "train") if s not in recipe]
    if missing or set(recipe) - set(SECTIONS):
        raise UserError(f"recipe {args.recipe!r} needs sections {SECTIONS} (missing {missing}, unknown "
                        f"{sorted(set(recipe) - set(SECTIONS))})")
    config = TrainConfig.from_dict(recipe["train"])
    teacher = load_teacher(str(recipe["teacher"]))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(recipe.get("tokenizer") or recipe["teacher"]))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer: {str(err).splitlines()[0]}") from None
    check_teacher(teacher, len(tokenizer), config.seq_len)
    student_config = BiSpikCLMConfig.from_teacher_config(teacher.config, **recipe.get("student", {}))
    if config.seq_len > student_config.max_position_embeddings:
        raise UserError(f"sequence length {config.seq_len} is beyond the student's "
                        f"{student_config.max_position_embeddings} positions")
    train_seqs = sequences(recipe["data"]["train"], tokenizer, config.seq_len)
    val_seqs = sequences(recipe["data"]["valid"], tokenizer, config.seq_len) if "valid" in recipe["data"] else None
    torch.manual_seed(config.seed)
    student = BiSpikCLMForCausalLM(student_config)
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
