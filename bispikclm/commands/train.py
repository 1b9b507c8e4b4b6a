"""``bispikclm train RECIPE``: distill a BiSpikCLM student from a Hugging Face teacher with SpAD.

The recipe (YAML; see ``bispikclm/recipes/``) has sections ``teacher`` (a Hub name, a ``save_pretrained`` folder,
a ``.gguf`` file or a short name such as ``smollm2-135m``: :func:`bispikclm.checkpoints.resolve`), ``tokenizer``
(default: the teacher's own, the same kinds of source), ``data`` (``train`` and ``valid`` sources), ``student``
(BiSpikCLMConfig overrides, and ``kind: ann`` for the same-shape ANN baseline) and ``train``
(:class:`bispikclm.distill.TrainConfig`). Several processes:
``torchrun --nproc_per_node N -m bispikclm train RECIPE`` (or ``accelerate launch`` with an FSDP config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..recipes import load_recipe, merge, parse_overrides
from ..recipes.schema import (CACHE_FIELDS, DATA_TYPES, MODEL_TYPES, REQUIRED_SECTIONS, SECTIONS, SOURCE_TYPES,
                              STUDENT_KEYS)
from ..runfolder import hold, write_file, writing
from ..validation import check_text_file, check_types, need

if TYPE_CHECKING:
    from ..distill import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (quickstart, opt-125m, opt-1.3b) or YAML file")
    parser.add_argument("--out", required=True, help="run folder (metrics, checkpoints, final model)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set train.tokens=1000000 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_recipe(recipe: dict, name: str) -> None:
    """UserError, before anything loads or is written, unless every section of the recipe has known keys and
    values of the right types (the student's ranges are checked by BiSpikCLMConfig, the train section's by
    TrainConfig.from_dict)."""
    from ..configuration import BiSpikCLMConfig

    missing = [s for s in REQUIRED_SECTIONS if s not in recipe]
    if missing or set(recipe) - set(SECTIONS):
        raise UserError(f"recipe {name!r} needs sections {SECTIONS} (missing {missing}, unknown "
                        f"{sorted(set(recipe) - set(SECTIONS))})")
    check_types("recipe", {k: recipe.get(k) for k in MODEL_TYPES}, MODEL_TYPES)
    need(bool(recipe["teacher"].strip()), "recipe teacher", "must name a model or folder", recipe["teacher"])
    check_types("data", recipe["data"], DATA_TYPES)
    need("train" in recipe["data"], "data", "needs a train source", recipe["data"])
    for split, source in recipe["data"].items():
        check_types(f"data.{split}", source, SOURCE_TYPES)
        need("source" in source, f"data.{split}", "needs 'source' (a text file, folder or dataset name)", source)
        for key in ("max_documents", "max_tokens"):
            if source.get(key) is not None:
                need(source[key] >= 1, f"data.{split}.{key}", "must be >= 1", source[key])
    check_types("student", recipe.get("student") or {}, BiSpikCLMConfig.__annotations__, extra=STUDENT_KEYS)


def check_local_source(source: dict, split: str) -> None:
    """UserError when a data source that names a local file or folder is missing, empty, binary or not UTF-8
    (hub dataset names are checked when they load)."""
    from ..data import data_source

    name = data_source(str(source["source"]))
    path = Path(name)
    if path.is_dir():
        path = path / f"{source.get('split', 'train')}.txt"
    if path.suffix == ".txt" or path.exists() or path.is_absolute() or name.startswith((".", "~")):
        check_text_file(path, f"text file (data.{split})")


def check_resumed_data(path: Path, meta: dict) -> None:
    """UserError when the token file of the run being resumed was made from other data or another tokenizer."""
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file() and json.loads(sidecar.read_text()).get("meta") != json.loads(json.dumps(meta)):
        raise UserError(f"the run being resumed was tokenized from other data or another tokenizer ({sidecar}); "
                        f"resume with the same recipe or use another output folder")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints import load_tokenizer
    from ..data import data_meta, training_data
    from ..distill import TEACHER_DTYPES, TrainConfig, Trainer, check_teacher, load_teacher
    from ..pipeline import build_student, student_config

    recipe = merge(load_recipe(args.recipe), parse_overrides(args.set))
    check_recipe(recipe, args.recipe)
    config = TrainConfig.from_dict(recipe["train"])
    if not args.resume and (Path(args.out) / "checkpoints" / "latest").is_file():
        raise UserError(f"{args.out} already holds a run; pass --resume to continue it or use another folder")
    # damaged, partial or NaN checkpoints are one-line errors inside (checkpoints.load_causal_lm)
    teacher = load_teacher(recipe["teacher"], dtype=TEACHER_DTYPES[config.teacher_dtype])
    tokenizer = load_tokenizer(str(recipe.get("tokenizer") or recipe["teacher"]))
    check_teacher(teacher, len(tokenizer), config.seq_len)
    # checked before anything is written; a rotary teacher's student gets a learned table sized to the context
    positions = student_config(teacher.config, recipe.get("student"), config.seq_len).max_position_embeddings
    if config.seq_len > positions:
        raise UserError(f"sequence length {config.seq_len} is beyond the student's {positions} positions")
    for split, source in recipe["data"].items():
        check_local_source(source, split)
    tokenizer_name = str(recipe.get("tokenizer") or recipe["teacher"])
    if args.resume:
        check_resumed_data(Path(args.out) / "data" / "train.bin", data_meta(recipe["data"]["train"], tokenizer,
                                                                           tokenizer_name))
    hold(args.out, "train")     # one writer per run folder, from here to the end of the command
    train_seqs, val_seqs = training_data(recipe["data"], tokenizer, config.seq_len, Path(args.out) / "data",
                                         tokenizer_name)
    torch.manual_seed(config.seed)
    student = build_student(teacher, recipe.get("student"), train_seqs, seed=config.seed, seq_len=config.seq_len)
    cache = None
    if recipe.get("teacher_cache") is not None:
        cache = build_teacher_cache(recipe["teacher_cache"], teacher, student, config, train_seqs, args.out,
                                    str(recipe["teacher"]), progress=not args.no_progress)
    trainer = Trainer(student, config, train_seqs, val_seqs, args.out, teacher=teacher,
                      fingerprint={"teacher": str(recipe["teacher"])}, progress=not args.no_progress,
                      tokenizer=tokenizer, teacher_cache=cache)
    final = trainer.fit(resume=args.resume)
    if trainer.accelerator.is_main_process:
        with writing(f"{Path(args.out) / 'final.json'}"):
            write_file(Path(args.out) / "final.json", json.dumps(final, indent=1))
        summary = {k: final[k] for k in ("step", "tokens", "loss", "val_ppl", "tokens_per_s", "skipped_steps", "processes")
                   if k in final}
        print(json.dumps(summary))
    return 0


def build_teacher_cache(section: dict, teacher, student, config: TrainConfig, train_seqs, out: str, teacher_name: str,
                        progress: bool = True):
    """The recipe's ``teacher_cache`` section: build (or reuse, or resume) the cache of the teacher's outputs over
    ``train_seqs`` that the student's losses need."""
    import torch
    from accelerate import PartialState

    from ..distill.losses import SpADLoss
    from ..distill.teacher_cache import CacheSpec, TeacherCache

    section = dict(section or {})
    unknown = set(section) - set(CACHE_FIELDS)
    if unknown:
        raise UserError(f"unknown teacher_cache settings {sorted(unknown)} (known: {CACHE_FIELDS})")
    spad = SpADLoss(student.config, teacher.config, config.weights, config.tau, rate_targets=config.rate_targets)
    if not spad.needs_teacher:
        return None
    spec = CacheSpec.for_loss(spad, student.config, teacher.config, int(section.get("top_k", 64)))
    folder = Path(section.get("folder") or Path(out) / "teacher_cache")
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        return TeacherCache.build(teacher, train_seqs, folder, spec, teacher_name,
                                  batch_size=int(section.get("batch_size", 8)), progress=progress)
