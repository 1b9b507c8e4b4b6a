"""SpAD ablation at equal tokens on WikiText-2: full SpAD, cross-entropy only, and each SpAD term switched off.

Every variant trains the same student (same seed, same data order, same token budget) against the same frozen
teacher (the quickstart teacher, trained once here or given with --teacher: a model folder or the quickstart's
``teacher/`` run folder), starting as the quickstart's student does (``student.init``), and is scored on WikiText-2
test perplexity. Writes results/ablation.json with perplexity, wall time, CPU time and tokens/s per variant.

    python benchmarks/ablation.py --data ../shared/data [--teacher runs/quickstart/teacher] [--tokens N]
        [--eval-windows W]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from bispikclm.data import default_data_dir, pack
from bispikclm.distill import DEFAULT_WEIGHTS, TERMS, TrainConfig, Trainer
from bispikclm.evaluation.perplexity import perplexity
from bispikclm.pipeline import (build_student, load_saved_teacher, train_quickstart_teacher, unigram_perplexity,
                                wikitext_ids)
from bispikclm.recipes import load_recipe, merge, parse_overrides

VARIANTS = {"spad": {}, "ce_only": {t: 0.0 for t in TERMS if t != "hard"} | {"hard": 1.0},
            **{f"no_{t}": {t: 0.0} for t in TERMS}}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir()))
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--results", default="results/ablation.json")
    parser.add_argument("--teacher", help="saved teacher folder (default: train the quickstart teacher)")
    parser.add_argument("--tokens", type=int, help="student tokens per variant (default: the quickstart's)")
    parser.add_argument("--eval-windows", type=int, help="test windows to score (default: the whole test set)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--cache-dir", default=os.environ.get("BISPIKCLM_CACHE", str(Path.home() / ".cache" /
                                                                                   "bispikclm")))
    args = parser.parse_args()

    recipe = merge(load_recipe("quickstart"), parse_overrides(args.set))
    if args.tokens:
        recipe["train"]["tokens"] = args.tokens
    out = Path(args.out)
    tokenizer, ids = wikitext_ids(Path(args.data), recipe["tokenizer"]["vocab_size"], Path(args.cache_dir))
    context = recipe["train"]["seq_len"]
    train_seqs, val_seqs = pack(ids["train"], context), pack(ids["valid"], context)
    test = ids["test"]
    if args.eval_windows:
        test = test[: args.eval_windows * context]
    if args.teacher is None:
        train_quickstart_teacher(recipe, tokenizer, train_seqs, val_seqs, out / "teacher", progress=False)
        args.teacher = str(out / "teacher")
    teacher = load_saved_teacher(args.teacher)
    teacher_ppl = perplexity(teacher.eval(), test, context, batch_size=16, progress=False).perplexity
    results = {"command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:]),
               "teacher": args.teacher, "teacher_ppl": teacher_ppl,
               "unigram_ppl": unigram_perplexity(ids["train"], test, len(tokenizer), context),
               "test_tokens": int(pack(test, context)[:, 1:].numel()), "student_tokens": recipe["train"]["tokens"],
               "recipe": recipe, "variants": {}}
    for name in args.variants:
        weights = {**DEFAULT_WEIGHTS, **recipe["train"].get("weights", {}), **VARIANTS[name]}
        cfg = TrainConfig.from_dict({**recipe["train"], "weights": weights})
        torch.manual_seed(cfg.seed)
        student = build_student(teacher, recipe["student"], train_seqs, seed=cfg.seed)   # the quickstart's student
        shutil.rmtree(out / name, ignore_errors=True)
        wall, cpu = time.perf_counter(), cpu_seconds()
        final = Trainer(student, cfg, train_seqs, val_seqs, out / name, teacher=teacher, progress=False).fit()
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        scored = perplexity(student.eval(), test, context, batch_size=16, progress=False)
        row = {"weights": weights, "test_ppl": scored.perplexity, "train_wall_s": wall,
               "train_cpu_s": cpu, "tokens_per_s": final["tokens_per_s"], "final_loss_hard": final.get("loss_hard"),
               "firing_rate": scored.firing_rate}
        results["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
