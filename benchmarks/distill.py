"""Training throughput and peak memory of SpAD distillation against training the teacher alone (CPU).

For the quickstart shape and the OPT-125M shape, a few optimizer steps of: the OPT teacher trained alone with
cross-entropy, the BiSpikCLM student with cross-entropy only, and the student with full SpAD (teacher forward
included). Each case runs in a fresh process so that its peak resident memory is its own. Writes
results/distill.json.

    python benchmarks/distill.py [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "quickstart": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512,
                       max_position_embeddings=128, seq_len=128, batch=16, time_steps=2),
    "opt-125m": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     max_position_embeddings=2048, seq_len=256, batch=2, time_steps=4),
}
MODES = ("teacher_ce", "student_ce", "student_spad")


def run_case(shape: str, mode: str, steps: int) -> dict:
    """Time ``steps`` optimizer steps (after one warm-up step) of one case in this process."""
    from transformers import OPTConfig, OPTForCausalLM

    from bispikclm.distill import SpADLoss, teacher_forward
    from bispikclm.distill.teacher import freeze
    from bispikclm.pipeline import build_student

    spec = dict(SHAPES[shape])
    seq_len, batch, time_steps = spec.pop("seq_len"), spec.pop("batch"), spec.pop("time_steps")
    torch.manual_seed(0)
    teacher = OPTForCausalLM(OPTConfig(word_embed_proj_dim=spec["hidden_size"], dropout=0.0, **spec))
    if mode == "teacher_ce":
        model, spad = teacher, SpADLoss(teacher.config, None, {"emb": 0, "attn": 0, "feat": 0, "soft": 0, "hard": 1})
    else:
        freeze(teacher)
        model = build_student(teacher, {"time_steps": time_steps})     # random init, as the paper trains
        weights = {"emb": 0, "attn": 0, "feat": 0, "soft": 0, "hard": 1} if mode == "student_ce" else {}
        spad = SpADLoss(model.config, teacher.config, weights)
    params = list(model.parameters()) + list(spad.parameters())
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, spec["vocab_size"], (batch, seq_len))
    extra = spad.student_outputs() if mode != "teacher_ce" else {}

    def step() -> None:
        out = model(ids, use_cache=False, **extra)
        loss, _ = spad(out, teacher_forward(teacher, ids) if spad.needs_teacher else None, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    return {"shape": shape, "mode": mode, "seq_len": seq_len, "batch": batch, "time_steps": time_steps,
            "steps": steps, "tokens_per_s": steps * batch * seq_len / elapsed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="results/distill.json")
    parser.add_argument("--case", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(*args.case, args.steps)))
        return
    rows = []
    for shape in args.shapes:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--case", shape, mode, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["mode"] == "teacher_ce")
        row["throughput_vs_teacher"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["memory_vs_teacher"] = row["peak_rss_mib"] / base["peak_rss_mib"]
    result = {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
              "command": " ".join(["python", "benchmarks/distill.py", *sys.argv[1:]]), "cases": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
