"""``bispikclm quickstart``: train a small OPT teacher on WikiText-2 to convergence, distill a same-shape BiSpikCLM
student with SpAD and, beside it, an ANN of exactly the student's shape with the same losses, tokens, data order and
seed, and compare all three (and a unigram model) on WikiText-2 test perplexity.

The teacher trains until its validation loss stops improving (early stopping, and never fewer tokens than the
students see), so the teacher is the ceiling and the ANN student measures the price of spikes at equal everything.

Run folder: ``tokenizer/``, ``teacher/``, ``student/`` and ``ann_student/`` (each: ``model/`` with its tokenizer,
``metrics.jsonl``, ``checkpoints/``), ``results.json``, ``loss_curves.png`` and ``report/`` (energy against the
teacher, MatMul-free audit, firing-pattern pictures, ``report.html``; see ``bispikclm report``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..errors import UserError
from ..paths import default_data_dir
from ..recipes import load_recipe, merge, parse_overrides
from ..recipes.schema import QUICKSTART_SECTIONS, TEACHER_FIELDS, TOKENIZER_TYPES
from ..runfolder import hold
from ..validation import check_text_file, check_types, need


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=str(default_data_dir()),
                        help="folder holding wikitext-2/{train,valid,test}.txt (default: $BISPIKCLM_DATA or "
                             "<repo>/../shared/data)")
    parser.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    parser.add_argument("--recipe", default="quickstart", help="recipe name or YAML file (default: quickstart)")
    parser.add_argument("--teacher-tokens", type=int, help="teacher training tokens (recipe: teacher_train.tokens)")
    parser.add_argument("--student-tokens", type=int, help="student distillation tokens (recipe: train.tokens)")
    parser.add_argument("--time-steps", type=int, help="student time steps T (recipe: student.time_steps)")
    parser.add_argument("--no-ann-student", action="store_true",
                        help="skip the same-shape ANN student (the price-of-spikes baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any recipe value, e.g. --set teacher.num_hidden_layers=4 --set train.lr=0.002 "
                             "--set train.weights.soft=0 (repeatable)")
    parser.add_argument("--cache-dir", default=os.environ.get("BISPIKCLM_CACHE", str(Path.home() / ".cache" /
                                                                                   "bispikclm")),
                        help="where the trained tokenizer and token ids are cached")
    parser.add_argument("--test-tokens", type=int, help="score only the first N test tokens (default: all)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_from_args(args: argparse.Namespace) -> dict:
    flags = {"teacher_train": {"tokens": args.teacher_tokens}, "train": {"tokens": args.student_tokens},
             "student": {"time_steps": args.time_steps}}
    flags = {s: {k: v for k, v in d.items() if v is not None} for s, d in flags.items()}
    return merge(merge(load_recipe(args.recipe), flags), parse_overrides(args.set))


def plot_curves(out: Path) -> None:
    """``loss_curves.png``: training loss per step (with each SpAD term) of teacher and student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("teacher", "ann_student", "student") if (out / n / "metrics.jsonl").is_file()]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4))
    for ax, name in zip(axes, names):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        for key in sorted({k for r in steps for k in r if k == "loss" or k.startswith("loss_")}):
            ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=key, linewidth=0.8)
        evals = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o", label="val_loss")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..configuration import BiSpikCLMConfig
    from ..data import SPECIAL_TOKENS, pack
    from ..distill import TEACHER_DTYPES, TrainConfig, Trainer, check_teacher
    from ..distill.init import INIT_MODES, calibration_sequences
    from ..energy import format_cost_table, honest_cost, text_token_ids
    from ..evaluation.perplexity import perplexity
    from ..pipeline import (blocks_ratio, build_student, load_saved_teacher, student_config,
                            train_quickstart_teacher, unigram_perplexity, wikitext_ids)
    from ..report import build_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    recipe = recipe_from_args(args)
    # the whole recipe and the data are checked before the run folder is touched
    check_types("recipe", recipe, dict.fromkeys(QUICKSTART_SECTIONS, "dict | None"))
    check_types("teacher", recipe.get("teacher"), TEACHER_FIELDS)
    for key, value in recipe["teacher"].items():
        need(TEACHER_FIELDS[key] != "int" or value >= 1, f"teacher.{key}", "must be >= 1", value)
    teacher_cfg = TrainConfig.from_dict(recipe.get("teacher_train", {}), "teacher_train")
    student_cfg = TrainConfig.from_dict(recipe.get("train", {}))
    check_types("tokenizer", recipe.get("tokenizer"), TOKENIZER_TYPES)
    need(recipe["tokenizer"].get("vocab_size", 0) >= 256 + len(SPECIAL_TOKENS), "tokenizer.vocab_size",
         f"must be an integer >= {256 + len(SPECIAL_TOKENS)} (the byte alphabet and special tokens)",
         recipe["tokenizer"].get("vocab_size"))
    check_types("student", recipe.get("student") or {}, BiSpikCLMConfig.__annotations__, extra=("init",))
    init = (recipe.get("student") or {}).get("init", "random")
    need(init in INIT_MODES, "student.init", f"must be one of {INIT_MODES}", init)
    for split in ("train", "valid", "test"):
        check_text_file(Path(args.data) / "wikitext-2" / f"{split}.txt", "WikiText-2 file (pass --data DIR)")
    out = Path(args.out)
    if (out / "teacher" / "checkpoints" / "latest").is_file():
        raise UserError(f"{out} already holds a quickstart run; use another --out or delete it")
    hold(out, "quickstart")     # one writer per run folder, until the command ends
    timings: dict[str, float] = {}

    start = time.perf_counter()
    vocab_size = recipe["tokenizer"]["vocab_size"]
    tokenizer, ids = wikitext_ids(Path(args.data), vocab_size, Path(args.cache_dir))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    timings["data_s"] = time.perf_counter() - start

    context = teacher_cfg.seq_len
    train_seqs, val_seqs = pack(ids["train"], context), pack(ids["valid"], context)
    progress = not args.no_progress

    start = time.perf_counter()
    trained = train_quickstart_teacher(recipe, tokenizer, train_seqs, val_seqs, out / "teacher", progress=progress)
    timings["teacher_train_s"] = time.perf_counter() - start
    teacher = load_saved_teacher(out / "teacher", dtype=TEACHER_DTYPES[student_cfg.teacher_dtype])
    check_teacher(teacher, len(tokenizer), student_cfg.seq_len)

    config = student_config(teacher.config, recipe["student"])
    calibration = calibration_sequences(train_seqs, seed=student_cfg.seed)
    students = {"student": None} if args.no_ann_student else {"ann_student": None, "student": None}
    runs = {}
    for name in students:   # the same seed, data order, losses, tokens and teacher weights for both students
        start = time.perf_counter()
        torch.manual_seed(student_cfg.seed)
        model = build_student(teacher, recipe["student"], calibration=calibration,
                              kind="spiking" if name == "student" else "ann")
        runs[name] = Trainer(model, student_cfg, train_seqs, val_seqs, out / name, teacher=teacher,
                             progress=progress, tokenizer=tokenizer).fit()
        students[name] = model
        timings[f"{name}_train_s"] = time.perf_counter() - start
    distilled = runs["student"]

    start = time.perf_counter()
    test = ids["test"][: args.test_tokens]
    scored = {name: perplexity(model.eval(), test, context, batch_size=16, progress=progress)
              for name, model in {"teacher": teacher, **students}.items()}
    results = {
        "teacher_ppl": scored["teacher"].perplexity,
        "student_ppl": scored["student"].perplexity,
        "unigram_ppl": unigram_perplexity(ids["train"], test, len(tokenizer), context),
        "student_firing_rates": scored["student"].firing_rates,
        "test_tokens": scored["teacher"].tokens,
        "teacher_tokens_per_s": trained["tokens_per_s"], "student_tokens_per_s": distilled["tokens_per_s"],
        "teacher_train_tokens": trained["tokens"], "student_train_tokens": distilled["tokens"],
        "teacher_stopped_early": trained["stopped_early"], "teacher_val_ppl": trained.get("val_ppl"),
        "student_skipped_steps": distilled["skipped_steps"],
    }
    if "ann_student" in scored:
        results.update(ann_student_ppl=scored["ann_student"].perplexity,
                       ann_student_train_tokens=runs["ann_student"]["tokens"],
                       ann_student_tokens_per_s=runs["ann_student"]["tokens_per_s"])
    timings["eval_s"] = time.perf_counter() - start

    start = time.perf_counter()
    report_html = build_report(out, text=Path(args.data) / "wikitext-2" / "test.txt",
                               energy_seq_len=min(256, context))
    energy = json.loads((report_html.parent / "energy.json").read_text())
    audit = json.loads((report_html.parent / "audit.json").read_text())
    results["energy"] = {"student_mj_per_token": energy["student"]["energy_mj_per_token"],
                         "teacher_mj_per_token": energy["ann"]["energy_mj_per_token"],
                         "ratio": energy["ratio"], "blocks_ratio": blocks_ratio(energy),
                         "head_percent_of_student": head_share(energy), "tokens": energy["tokens"]}
    # both conventions (the paper's: blocks, arithmetic; everything, with memory traffic) at float32 and int8
    text_ids = text_token_ids(tokenizer, Path(args.data) / "wikitext-2" / "test.txt", min(256, context))
    results["cost_table"] = honest_cost(students["student"], text_ids, ann=teacher)
    results["audit_blocks_clean"] = audit["blocks_clean"]
    results["report"] = str(report_html)
    timings["report_s"] = time.perf_counter() - start
    results["ratio"] = results["student_ppl"] / results["teacher_ppl"]
    if "ann_student_ppl" in results:
        results["ratio_to_ann_student"] = results["student_ppl"] / results["ann_student_ppl"]
        results["ann_student_ratio"] = results["ann_student_ppl"] / results["teacher_ppl"]
    results.update(timings, recipe=recipe)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(out)
    print_table(results, context, config.time_steps, config.spiking_head)
    print("\nEnergy per token against the teacher, both conventions (docs/energy.md):")
    print(format_cost_table(results["cost_table"]))
    rates = results["student_firing_rates"]
    print("student firing rates: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    print(f"MatMul-free audit of the blocks: {'clean' if results['audit_blocks_clean'] else 'NOT CLEAN'}")
    print("time: " + ", ".join(f"{k[:-2].replace('_train', '')} {v:.0f} s" for k, v in timings.items()))
    print(f"report: {report_html}  (results: {out / 'results.json'})")
    return 0 if results["audit_blocks_clean"] else 1


def print_table(results: dict, context: int, time_steps: int, spiking_head: bool) -> None:
    """The quickstart's table: unigram, teacher, ANN student and spiking student, with both ratios."""
    cost = results["energy"]
    print(f"\nWikiText-2 test ({results['test_tokens']:,} scored tokens, windows of {context}); energy per token "
          f"counted on {cost['tokens']} tokens (45 nm: MAC 4.6 pJ, AC 0.9 pJ, head included):")
    print(f"  {'model':<32}{'train tokens':>14}{'perplexity':>12}{'energy / token':>18}")
    print(f"  {'unigram (add-one)':<32}{'':>14}{results['unigram_ppl']:>12.1f}")
    stop = "early stop" if results.get("teacher_stopped_early") else "token cap"
    print(f"  {f'OPT teacher ({stop})':<32}{results['teacher_train_tokens']:>14,}{results['teacher_ppl']:>12.1f}"
          f"{cost['teacher_mj_per_token'] * 1e6:>15.1f} nJ")
    if "ann_student_ppl" in results:
        print(f"  {'ANN student (same shape)':<32}{results['ann_student_train_tokens']:>14,}"
              f"{results['ann_student_ppl']:>12.1f}{cost['teacher_mj_per_token'] * 1e6:>15.1f} nJ")
    print(f"  {f'BiSpikCLM student (T={time_steps})':<32}{results['student_train_tokens']:>14,}"
          f"{results['student_ppl']:>12.1f}{cost['student_mj_per_token'] * 1e6:>15.1f} nJ")
    line = f"  spiking / teacher: perplexity x{results['ratio']:.2f}"
    if "ratio_to_ann_student" in results:
        line += f"; spiking / ANN student (the price of spikes): x{results['ratio_to_ann_student']:.2f}"
    print(line)
    print(f"  energy, spiking / teacher: {100 * cost['ratio']:.1f}% (blocks without the head: "
          f"{100 * cost['blocks_ratio']:.1f}%; the {'spiking' if spiking_head else 'float'} head is "
          f"{cost['head_percent_of_student']:.0f}% of the student's energy)")


def head_share(energy: dict) -> float:
    """Percentage of the student's energy per token spent in its head (LayerNorm, time average, vocabulary
    product)."""
    head = energy["student"]["parts"].get("head", {})
    return head.get("percent_of_total", 0.0)
