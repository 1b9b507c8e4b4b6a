"""Perplexity against energy at the quickstart scale: the spiking head and the `spike_cost` training term.

Every variant distills the same student (same seed, data order, token budget and ``student.init`` as the
quickstart) from the same frozen quickstart teacher, changing only ``student.spiking_head`` and ``train.spike_cost``, then is scored on
WikiText-2 test perplexity and counted by the energy model against the teacher on the first test windows.
Writes results/spike_cost.json and a plot of perplexity against % of the ANN's energy.

    python benchmarks/spike_cost.py --teacher runs/quickstart/teacher [--variants ln:0 spiking:0 spiking:3 ...]

A variant is ``HEAD:WEIGHT`` with HEAD ``ln`` (LayerNorm + float head, the quickstart's) or ``spiking``. The
quickstart's ``init: calibrated`` needs the LayerNorm head; ``spiking`` variants start from ``init: all`` instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from bispikclm.data import default_data_dir, pack
from bispikclm.distill import TrainConfig, Trainer
from bispikclm.energy import EnergyTable, count_operations, energy_report
from bispikclm.evaluation.perplexity import perplexity
from bispikclm.pipeline import blocks_ratio, build_student, load_saved_teacher, unigram_perplexity, wikitext_ids
from bispikclm.recipes import load_recipe, merge, parse_overrides


def parse_variant(text: str) -> tuple[bool, float]:
    head, _, weight = text.partition(":")
    if head not in ("ln", "spiking") or not weight:
        raise SystemExit(f"spike_cost.py: error: variant {text!r} is not HEAD:WEIGHT with HEAD ln or spiking")
    return head == "spiking", float(weight)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spiking, marker in ((False, "s"), (True, "o")):
        rows = sorted((r for r in results["variants"].values() if r["spiking_head"] == spiking),
                      key=lambda r: r["spike_cost"])
        if rows:
            ax.plot([100 * r["energy_ratio"] for r in rows], [r["test_ppl"] for r in rows], marker=marker,
                    label="spiking head" if spiking else "LayerNorm + float head")
            for r in rows:
                ax.annotate(f"λ={r['spike_cost']:g}", (100 * r["energy_ratio"], r["test_ppl"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(results["teacher_ppl"], color="grey", linestyle="--", label="teacher (ANN)")
    ax.axhline(results["unigram_ppl"], color="grey", linestyle="-.", label="unigram")
    ax.axvline(3.0, color="grey", linestyle=":", label="3% of the ANN")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 3, 5, 10, 20, 50, 100]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yticks([100, 200, 500, 1000, 2000, 5000], ["100", "200", "500", "1000", "2000", "5000"])
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("student energy per token, % of the teacher's (head included)")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title("quickstart student: perplexity against energy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir()))
    parser.add_argument("--teacher", default="runs/quickstart/teacher", help="trained quickstart teacher folder")
    parser.add_argument("--variants", nargs="+", default=["ln:0", "spiking:0", "spiking:1", "spiking:3",
                                                            "spiking:10", "spiking:30"])
    parser.add_argument("--tokens", type=int, help="student tokens per variant (default: the quickstart's)")
    parser.add_argument("--energy-windows", type=int, default=8, help="test windows the energy is counted on")
    parser.add_argument("--out", default="runs/spike_cost")
    parser.add_argument("--results", default="results/spike_cost.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--cache-dir", default=os.environ.get("BISPIKCLM_CACHE", str(Path.home() / ".cache" /
                                                                                   "bispikclm")))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {name: parse_variant(name) for name in args.variants}

    recipe = merge(load_recipe("quickstart"), parse_overrides(args.set))
    if args.tokens:
        recipe["train"]["tokens"] = args.tokens
    out, context = Path(args.out), recipe["train"]["seq_len"]
    tokenizer, ids = wikitext_ids(Path(args.data), recipe["tokenizer"]["vocab_size"], Path(args.cache_dir))
    train_seqs, val_seqs, test = pack(ids["train"], context), pack(ids["valid"], context), ids["test"]
    energy_ids = pack(test, context)[: args.energy_windows]
    teacher = load_saved_teacher(args.teacher)
    ann_count = count_operations(teacher, energy_ids, name="quickstart teacher")
    results = {"command": "python " + shlex.join(["benchmarks/spike_cost.py", *sys.argv[1:]]),
               "date": datetime.date.today().isoformat(), "torch": torch.__version__, "teacher": args.teacher,
               "teacher_ppl": perplexity(teacher.eval(), test, context, batch_size=16, progress=False).perplexity,
               "unigram_ppl": unigram_perplexity(ids["train"], test, len(tokenizer), context),
               "energy_tokens": energy_ids.numel(), "energy_table": EnergyTable().__dict__,
               "recipe": recipe, "variants": {}}
    print(f"teacher {results['teacher_ppl']:.1f}, unigram {results['unigram_ppl']:.1f}", flush=True)
    for name, (spiking, weight) in variants.items():
        cfg = TrainConfig.from_dict({**recipe["train"], "spike_cost": weight})
        torch.manual_seed(cfg.seed)
        section = {**recipe["student"], "spiking_head": spiking}
        if spiking and section.get("init") == "calibrated":     # calibration needs the LayerNorm head
            section["init"] = "all"
        student = build_student(teacher, section, train_seqs, seed=cfg.seed)
        folder = out / name.replace(":", "-")
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        final = Trainer(student, cfg, train_seqs, val_seqs, folder, teacher=teacher, progress=False).fit()
        wall = time.perf_counter() - start
        student.eval()
        scored = perplexity(student, test, context, batch_size=16, progress=False)
        report = energy_report(count_operations(student, energy_ids, name=name), ann_count)
        head = report["student"]["parts"].get("head", {}).get("mj_per_token", 0.0)
        row = {"spiking_head": spiking, "spike_cost": weight, "test_ppl": scored.perplexity,
               "ppl_over_teacher": scored.perplexity / results["teacher_ppl"],
               "energy_ratio": report["ratio"], "blocks_ratio": blocks_ratio(report),
               "head_ratio": head / report["ann"]["energy_mj_per_token"],
               "formula": report["formula"], "firing_rate": scored.firing_rate,
               "firing_rates_by_layer": report["firing_rates"]["by_layer"],
               "final_loss_cost": final.get("loss_cost"), "final_loss_hard": final.get("loss_hard"),
               "train_wall_s": wall, "tokens_per_s": final["tokens_per_s"]}
        results["variants"][name] = row
        print(f"{name}: ppl {row['test_ppl']:.1f}, energy {100 * row['energy_ratio']:.2f}% (blocks "
              f"{100 * row['blocks_ratio']:.2f}%, head {100 * row['head_ratio']:.2f}%), rate {row['firing_rate']:.3f}, "
              f"{wall:.0f} s", flush=True)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=1))   # after every variant: a killed run keeps them
    plot(results, Path(args.results).with_suffix(".png"))
    print(f"written to {args.results} and {Path(args.results).with_suffix('.png')}")


if __name__ == "__main__":
    main()
