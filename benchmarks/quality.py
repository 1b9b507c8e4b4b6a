"""Quality levers of the spiking student, settled at equal tokens with several seeds.

Every variant distills the quickstart-shape student from the same frozen teacher (a converged quickstart teacher:
``--teacher`` or the one ``bispikclm quickstart`` trained in ``--run-dir``) on the same data and token budget, once
per seed (the seed sets the initialization and the data order), and is scored on WikiText-2 test perplexity
(the quickstart's tokenization and windows). A variant is a list of recipe overrides (``section.key=value``) on
the quickstart recipe. Writes ``results/quality.json`` (per run: perplexity, firing rates, wall time, tokens/s;
per variant: mean, spread and the ratio to the teacher) and ``results/quality.png``.

    python benchmarks/quality.py --run-dir runs/quickstart --tokens 600000 --seeds 0 1 2 --variants paper init_all
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from bispikclm.data import default_data_dir, pack
from bispikclm.distill import TrainConfig, Trainer, load_teacher
from bispikclm.distill.calibrate import set_time_steps
from bispikclm.errors import UserError
from bispikclm.evaluation.perplexity import perplexity
from bispikclm.pipeline import build_student, unigram_perplexity, wikitext_ids
from bispikclm.recipes import load_recipe, merge, parse_overrides
from bispikclm.runfolder import write_file

CALIBRATED = ["student.init=calibrated", "student.per_channel_neurons=true", "student.fire=count",
              "student.beta=1.0", "student.initial_membrane=0.5"]
CALIBRATED_IF = ["student.init=calibrated", "student.per_channel_neurons=true", "student.beta=1.0",
                 "student.initial_membrane=0.5"]
SIGNED = [f"student.neuron_overrides.{group}.signed=true" for group in ("block_in", "attn_out", "ffn_in", "ffn_out")]
SIGNED_QKV = [f"student.neuron_overrides.{group}.signed=true" for group in ("q", "k", "v")]
LOGITS = ["train.weights.emb=0", "train.weights.attn=0", "train.weights.feat=0", "train.weights.soft=0.8",
          "train.weights.hard=0.2"]

#: name -> (what it tests, recipe overrides). "paper" is the reference: random initialization, fixed neurons.
#: ``stage.time_steps=T0``: the first half of the tokens at T0, then the recipe's T (progressive precision).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "paper": ("random init, fixed thresholds and leaks (the paper's setting)", []),
    "quickstart": ("the quickstart recipe as it is (bispikclm/recipes/quickstart.yaml)", []),
    "ann": ("the ANN of the student's shape, same losses (no Rate-MSE), tokens, data order and seed",
            ["student.kind=ann"]),
    "init_embeddings": ("embeddings, head and final LayerNorm from the teacher", ["student.init=embeddings"]),
    "init_all": ("embeddings and every block linear from the teacher (rescaled)", ["student.init=all"]),
    "learn_threshold_group": ("one learned threshold per neuron module", ["student.learn_threshold=group"]),
    "learn_threshold_channel": ("one learned threshold per channel", ["student.learn_threshold=channel"]),
    "learn_beta": ("one learned leak per neuron module", ["student.learn_beta=group"]),
    "rate_matched": ("Rate-MSE targets on the student's scale (attention min(1, n p), hidden states rescaled)",
                     ["train.rate_targets=matched"]),
    "surrogate_wide": ("arctan surrogate, alpha 1 (wider)", ["student.surrogate_alpha=1.0"]),
    "surrogate_narrow": ("arctan surrogate, alpha 4 (narrower)", ["student.surrogate_alpha=4.0"]),
    "lr_1e-3": ("learning rate 0.001", ["train.lr=0.001"]),
    "lr_1e-2": ("learning rate 0.01", ["train.lr=0.01"]),
    "if_half": ("init all; IF neurons (beta 1) starting at half the threshold (QCFS rounding)",
                ["student.init=all", "student.beta=1.0", "student.initial_membrane=0.5"]),
    "count_half": ("init all; count firing (integrate the token's T steps, then fire) from half the threshold",
                   ["student.init=all", "student.fire=count", "student.initial_membrane=0.5"]),
    "calibrated": ("per-channel thresholds and block linears calibrated from the teacher; count firing",
                   CALIBRATED),
    "calibrated_if": ("calibrated; IF neurons firing step by step", CALIBRATED_IF),
    "calibrated_rel": ("calibrated; the surrogate's width follows each threshold",
                       CALIBRATED + ["student.relative_surrogate=true"]),
    "calibrated_logits": ("calibrated, relative surrogate; logits only: soft 0.8, hard 0.2 (no feature, "
                          "attention or Rate-MSE terms)", CALIBRATED + ["student.relative_surrogate=true"] + LOGITS),
    "calibrated_progressive": ("calibrated_logits trained at T = 4 for the first half of the tokens, then T = 2",
                               CALIBRATED + ["student.relative_surrogate=true"] + LOGITS + ["stage.time_steps=4"]),
    "calibrated_signed": ("calibrated_logits with signed neuron pairs (2T + 1 levels) at the block inputs and "
                          "the branch outputs", CALIBRATED + ["student.relative_surrogate=true"] + LOGITS + SIGNED),
    "calibrated_signed_qkv": ("calibrated_signed with Q, K and V signed pairs too (ternary Q·Kᵀ and P·V)",
                              CALIBRATED + ["student.relative_surrogate=true"] + LOGITS + SIGNED + SIGNED_QKV),
    "paper_logits": ("the paper's setting with the logit-only losses of calibrated_logits", LOGITS),
    "init_all_logits": ("init all with the logit-only losses of calibrated_logits", ["student.init=all"] + LOGITS),
    "ann_logits": ("the ANN of the student's shape, init all, with the logit-only losses of calibrated_logits",
                   ["student.kind=ann", "student.init=all"] + LOGITS),
    "ffn_mlp": ("Llama-style GQA student, two-matrix spiking MLP of width 512 (equal parameters)",
                ["student.num_key_value_heads=2", "student.ffn_type=mlp", "student.ffn_dim=512"]),
    "ffn_select": ("Llama-style GQA student, gated SFFN (select) of width 344",
                   ["student.num_key_value_heads=2", "student.ffn_type=gated", "student.ffn_gate=select",
                    "student.ffn_dim=344"]),
    "ffn_and": ("Llama-style GQA student, gated SFFN (and) of width 344",
                ["student.num_key_value_heads=2", "student.ffn_type=gated", "student.ffn_gate=and",
                 "student.ffn_dim=344"]),
}


def variant_spec(spec: str) -> str:
    """An argparse type: ``NAME`` or ``NAME@section.key=value,...`` with NAME a key of :data:`VARIANTS`."""
    name = spec.partition("@")[0]
    if name not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    try:                                     # a bad override is an argument error, before any training
        parse_overrides(variant(spec)[1])
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def variant(spec: str) -> tuple[str, list[str]]:
    """(description, overrides) of ``NAME`` or ``NAME@section.key=value,...`` (the extras after the variant's own)."""
    name, _, extra = spec.partition("@")
    description, overrides = VARIANTS[name]
    extras = [e for e in extra.split(",") if e]
    return (f"{description}; with {', '.join(extras)}" if extras else description), overrides + extras


def paper_recipe(quickstart: dict) -> dict:
    """The quickstart recipe with the paper's student and losses (random init, fixed LIF neurons, every SpAD
    term at its default weight): the base every variant's overrides apply to (variant ``quickstart`` takes the
    quickstart's recipe as it is)."""
    recipe = {**quickstart, "student": {"time_steps": quickstart["student"]["time_steps"]},
              "train": {k: v for k, v in quickstart["train"].items() if k != "weights"}}
    return recipe


def train(student, recipe: dict, seed: int, train_seqs, val_seqs, folder: Path, teacher) -> dict:
    """SpAD as the recipe says; with ``stage.time_steps`` the first half of the tokens at that T
    (:func:`~bispikclm.distill.calibrate.set_time_steps` keeps calibrated quantizers), the second at the
    student's own T, each half with the recipe's schedule."""
    cfg = TrainConfig.from_dict({**recipe["train"], "seed": seed})
    first = recipe.get("stage", {}).get("time_steps")
    if first is None:
        return Trainer(student, cfg, train_seqs, val_seqs, folder, teacher=teacher, progress=False).fit()
    final_steps, half = student.config.time_steps, cfg.tokens // 2
    set_time_steps(student, int(first))
    Trainer(student, TrainConfig.from_dict({**recipe["train"], "seed": seed, "tokens": half}), train_seqs, val_seqs,
            folder / "stage1", teacher=teacher, progress=False).fit()
    set_time_steps(student, final_steps)
    return Trainer(student, TrainConfig.from_dict({**recipe["train"], "seed": seed + 1000, "tokens": cfg.tokens - half}),
                   train_seqs, val_seqs, folder / "stage2", teacher=teacher, progress=False).fit()


def summarize(rows: list[dict], teacher_ppl: float) -> dict:
    ppl = [r["test_ppl"] for r in rows]
    mean = statistics.fmean(ppl)
    return {"runs": len(rows), "test_ppl_mean": mean, "test_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "test_ppl_min": min(ppl), "test_ppl_max": max(ppl), "ratio_to_teacher": mean / teacher_ppl,
            "firing_rate_mean": (statistics.fmean(r["firing_rate"] for r in rows)
                                 if rows[0]["firing_rate"] is not None else None),
            "train_wall_s_mean": statistics.fmean(r["train_wall_s"] for r in rows),
            "step0_ppl_mean": statistics.fmean(r["step0_ppl"] for r in rows) if "step0_ppl" in rows[0] else None}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4), constrained_layout=True)
    for i, name in enumerate(names):
        ppl = [r["test_ppl"] for r in results["runs"] if r["variant"] == name]
        ax.scatter([i] * len(ppl), ppl, color="tab:blue", s=14)
        ax.errorbar(i, results["variants"][name]["test_ppl_mean"], yerr=results["variants"][name]["test_ppl_std"],
                    fmt="_", color="black", capsize=4)
    ax.axhline(results["teacher_ppl"], color="tab:green", linestyle="--", label=f"teacher {results['teacher_ppl']:.1f}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title(f"equal tokens ({results['student_tokens']:,}), {len(results['seeds'])} seeds each")
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir()))
    parser.add_argument("--run-dir", default="runs/quickstart", help="quickstart run folder with the teacher")
    parser.add_argument("--teacher", help="saved teacher folder (default: RUN_DIR/teacher/model)")
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--results", default="results/quality.json")
    parser.add_argument("--tokens", type=int, help="student tokens per run (default: the quickstart's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["paper"], type=variant_spec, metavar="VARIANT[@KEY=VALUE,...]",
                        help=f"variants ({', '.join(VARIANTS)}), each optionally with extra overrides after '@', "
                             "e.g. calibrated_logits@train.spike_cost=3")
    parser.add_argument("--eval-windows", type=int, help="test windows to score (default: the whole test set)")
    parser.add_argument("--step0-only", action="store_true", help="score each student before training, no training")
    parser.add_argument("--calibration", type=int, default=64, help="training sequences for init: calibrated")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --results (same tokens and windows) and run only the missing ones")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override applied to every variant")
    args = parser.parse_args()

    quickstart = merge(load_recipe("quickstart"), parse_overrides(args.set))
    if args.tokens:
        quickstart["train"]["tokens"] = args.tokens
    base = paper_recipe(quickstart)
    teacher = load_teacher(args.teacher or str(Path(args.run_dir) / "teacher" / "model"))
    tokenizer, ids = wikitext_ids(Path(args.data), base["tokenizer"]["vocab_size"], Path.home() / ".cache" / "bispikclm")
    context = base["train"]["seq_len"]
    train_seqs, val_seqs = pack(ids["train"], context), pack(ids["valid"], context)
    test = ids["test"][: args.eval_windows * context] if args.eval_windows else ids["test"]
    teacher_ppl = perplexity(teacher.eval(), test, context, batch_size=16, progress=False).perplexity
    results_path = Path(args.results)
    results = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]), "teacher": str(teacher.name_or_path),
               "teacher_ppl": teacher_ppl, "unigram_ppl": unigram_perplexity(ids["train"], test, len(tokenizer), context),
               "test_tokens": int(pack(test, context)[:, 1:].numel()), "student_tokens": base["train"]["tokens"],
               "seeds": args.seeds, "recipe": base, "descriptions": {}, "runs": [], "variants": {}}
    done = {}
    if args.resume and results_path.exists():
        old = json.loads(results_path.read_text())
        if (old["student_tokens"], old["test_tokens"]) != (results["student_tokens"], results["test_tokens"]):
            raise SystemExit(f"error: {results_path} holds runs of {old['student_tokens']} tokens scored on "
                             f"{old['test_tokens']} test tokens; --resume needs the same --tokens and --eval-windows")
        done = {(r["variant"], r["seed"]): r for r in old["runs"]}
        results["descriptions"] = old["descriptions"]
        results["runs"] = list(old["runs"])   # every finished run stays in the file, whatever is run now
        results["variants"] = old["variants"]
        results["seeds"] = sorted(set(old["seeds"]) | set(args.seeds))

    def save() -> None:
        """The results so far, atomically: a killed run keeps every run that finished before it."""
        results_path.parent.mkdir(parents=True, exist_ok=True)
        write_file(results_path, json.dumps(results, indent=1))

    for name in args.variants:
        description, overrides = variant(name)
        results["descriptions"][name] = {"what": description, "overrides": overrides}
        recipe = merge(quickstart if name.partition("@")[0] == "quickstart" else base, parse_overrides(overrides))
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            # drawn from the global generator right after seeding, as for every committed run in results/quality.json
            # (not calibration_sequences' own generator): the weights that follow depend on it, so new runs stay
            # comparable with the committed ones
            torch.manual_seed(seed)
            calibration = train_seqs[torch.randperm(len(train_seqs))[:args.calibration]]
            student = build_student(teacher, recipe["student"], calibration=calibration)
            scored0 = perplexity(student.eval(), test, context, batch_size=16, progress=False)
            step0 = scored0.perplexity
            if args.step0_only:
                row = {"variant": name, "seed": seed, "step0_ppl": step0, "test_ppl": step0,
                       "firing_rate": scored0.firing_rate, "train_wall_s": 0.0}
                results["runs"].append(row)
                save()
                print(json.dumps(row), flush=True)
                continue
            folder = Path(args.out) / f"{name}-seed{seed}"
            shutil.rmtree(folder, ignore_errors=True)
            wall = time.perf_counter()
            final = train(student.train(), recipe, seed, train_seqs, val_seqs, folder, teacher)
            wall = time.perf_counter() - wall
            scored = perplexity(student.eval(), test, context, batch_size=16, progress=False)
            row = {"variant": name, "seed": seed, "step0_ppl": step0, "test_ppl": scored.perplexity,
                   "firing_rate": scored.firing_rate,
                   "firing_rates": scored.firing_rates, "train_wall_s": wall, "tokens_per_s": final["tokens_per_s"]}
            results["runs"].append(row)
            save()
            print(json.dumps({k: v for k, v in row.items() if k != "firing_rates"}), flush=True)
        rows = [r for r in results["runs"] if r["variant"] == name]
        results["variants"][name] = summarize(rows, teacher_ppl)
        save()
    plot(results, results_path.with_suffix(".png"))
    for name, row in results["variants"].items():
        rate = "" if row["firing_rate_mean"] is None else f", firing rate {row['firing_rate_mean']:.3f}"
        print(f"{name:26s} {row['test_ppl_mean']:8.2f} ± {row['test_ppl_std']:.2f} (x{row['ratio_to_teacher']:.2f} "
              f"the teacher's {teacher_ppl:.2f}){rate}")


if __name__ == "__main__":
    main()
