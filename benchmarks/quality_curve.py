"""The price of spikes against student tokens: does the gap to the ANN student close with tokens, or is it a floor?

For each token budget, ``benchmarks/quality.py`` distills the spiking variants and the ANN of the student's shape
from the same frozen quickstart teacher (same data order and seeds), writing one results file per budget under
``--folder`` (``--resume``: runs already there are kept, so an interrupted curve continues where it stopped).
This script then gathers them into ``results/quality_curve.json`` (per budget and variant: mean, spread, the
ratio to the ANN student and to the teacher, firing rate) and ``results/quality_curve.png``.

    python benchmarks/quality_curve.py --data ../shared/data --run-dir runs/quickstart \\
        --tokens 249856 499712 999424 1998848 3999744 --variants calibrated_logits init_all_logits --ann ann_logits
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def budget_file(folder: Path, tokens: int) -> Path:
    return folder / f"tokens-{tokens}.json"


def run_budget(args: argparse.Namespace, tokens: int) -> None:
    """quality.py for one budget: every variant (and the ANN), seeds as ``--seeds`` or ``--seeds-large``."""
    seeds = args.seeds if tokens <= args.small_budget else args.seeds_large
    command = [sys.executable, str(HERE / "quality.py"), "--data", args.data, "--run-dir", args.run_dir,
               "--results", str(budget_file(Path(args.folder), tokens)), "--out", f"{args.out}/tokens-{tokens}",
               "--tokens", str(tokens), "--eval-windows", str(args.eval_windows), "--resume",
               "--seeds", *map(str, seeds), "--variants", *args.variants, args.ann]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def gather(folder: Path, tokens: list[int], variants: list[str], ann: str) -> dict:
    """One row per (budget, variant) from the per-budget files; ``ratio_to_ann`` pairs runs of equal seed."""
    rows, teacher_ppl, test_tokens = [], None, None
    for budget in tokens:
        path = budget_file(folder, budget)
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        if teacher_ppl is not None and (result["teacher_ppl"], result["test_tokens"]) != (teacher_ppl, test_tokens):
            raise SystemExit(f"error: {path} was scored with another teacher or test set than the other budgets")
        teacher_ppl, test_tokens = result["teacher_ppl"], result["test_tokens"]
        ann_runs = {r["seed"]: r["test_ppl"] for r in result["runs"] if r["variant"] == ann}
        for name in [*variants, ann]:
            runs = [r for r in result["runs"] if r["variant"] == name]
            if not runs:
                continue
            ppl = [r["test_ppl"] for r in runs]
            paired = [r["test_ppl"] / ann_runs[r["seed"]] for r in runs if r["seed"] in ann_runs]
            rows.append({"tokens": budget, "variant": name, "seeds": [r["seed"] for r in runs],
                         "test_ppl_mean": statistics.fmean(ppl),
                         "test_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                         "ratio_to_ann": statistics.fmean(paired) if paired and name != ann else None,
                         "ratio_to_ann_std": statistics.stdev(paired) if len(paired) > 1 and name != ann else None,
                         "ratio_to_teacher": statistics.fmean(ppl) / teacher_ppl,
                         "firing_rate_mean": (statistics.fmean(r["firing_rate"] for r in runs)
                                              if runs[0].get("firing_rate") is not None else None)})
    return {"teacher_ppl": teacher_ppl, "test_tokens": test_tokens, "ann": ann, "variants": variants, "rows": rows}


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name in [*curve["variants"], curve["ann"]]:
        rows = [r for r in curve["rows"] if r["variant"] == name]
        if not rows:
            continue
        left.errorbar([r["tokens"] for r in rows], [r["test_ppl_mean"] for r in rows],
                      yerr=[r["test_ppl_std"] for r in rows], marker="o", capsize=3, label=name)
        paired = [r for r in rows if r["ratio_to_ann"] is not None]
        if paired:
            right.errorbar([r["tokens"] for r in paired], [r["ratio_to_ann"] for r in paired],
                           yerr=[r["ratio_to_ann_std"] or 0.0 for r in paired], marker="o", capsize=3, label=name)
    left.axhline(curve["teacher_ppl"], color="tab:green", linestyle="--", label=f"teacher {curve['teacher_ppl']:.1f}")
    right.axhline(1.15, color="gray", linestyle=":", label="goal 1.15")
    for ax, label in ((left, "WikiText-2 test perplexity"), (right, f"spiking / {curve['ann']} (same seed)")):
        ax.set_xscale("log")
        ax.set_xlabel("student tokens")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--run-dir", default="runs/quickstart", help="quickstart run folder with the teacher")
    parser.add_argument("--tokens", type=int, nargs="+", default=[249856, 499712, 999424, 1998848, 3999744])
    parser.add_argument("--variants", nargs="+", default=["calibrated_logits", "init_all_logits"])
    parser.add_argument("--ann", default="ann_logits", help="the ANN variant every spiking one is compared with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at budgets <= --small-budget")
    parser.add_argument("--seeds-large", type=int, nargs="+", default=[0], help="seeds at the larger budgets")
    parser.add_argument("--small-budget", type=int, default=499712)
    parser.add_argument("--eval-windows", type=int, default=200)
    parser.add_argument("--folder", default="results/quality_curve", help="one quality.py results file per budget")
    parser.add_argument("--out", default="runs/quality_curve")
    parser.add_argument("--results", default="results/quality_curve.json")
    parser.add_argument("--gather-only", action="store_true", help="no training: gather the files already there")
    args = parser.parse_args()

    if not args.gather_only:
        for tokens in args.tokens:
            run_budget(args, tokens)
    curve = gather(Path(args.folder), args.tokens, args.variants, args.ann)
    curve["command"] = "python benchmarks/quality_curve.py " + " ".join(sys.argv[1:])
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(curve, indent=1))
    plot(curve, Path(args.results).with_suffix(".png"))
    for row in curve["rows"]:
        ratio = f"{row['ratio_to_ann']:.3f}" if row["ratio_to_ann"] is not None else "-"
        print(f"{row['tokens']:>9,} {row['variant']:<20} {row['test_ppl_mean']:7.2f} ± {row['test_ppl_std']:5.2f}"
              f"  /ANN {ratio}  /teacher {row['ratio_to_teacher']:.3f}")


if __name__ == "__main__":
    main()
