"""Forward+backward step time and memory of a BiSpikCLM student against an HF OPT of identical shape.

Side by side in one run, on this machine's CPU, sequence 256, T = 2 and 4. Memory is reported two ways:
``saved_mib``, the bytes autograd keeps for backward (activations; each storage counted once), and
``peak_rss_mib``, the growth of the process's peak resident memory during the step (each configuration runs in a
fresh subprocess so peaks do not mix). Writes ``results/train_step.json``.

    python benchmarks/train_step.py [--shapes tiny opt-125m] [--repeats 3]
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

SEQ = 256
BATCH = {"tiny": 8, "opt-125m": 1}


def build(kind: str, shape: str, time_steps: int):
    from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM, same_shape_ann

    student_cfg = BiSpikCLMConfig.from_preset(shape, time_steps=max(time_steps, 1))
    if kind == "student":
        return BiSpikCLMForCausalLM(student_cfg)
    return same_shape_ann(student_cfg, attn_implementation="eager")


def measure(kind: str, shape: str, time_steps: int, repeats: int) -> dict:
    """One configuration, in this process: step time (median of ``repeats``), saved bytes, peak RSS growth."""
    torch.manual_seed(0)
    model = build(kind, shape, time_steps).train()
    ids = torch.randint(0, model.config.vocab_size, (BATCH[shape], SEQ))

    def step():
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up; the peak-RSS growth covers this first step's allocations
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids, use_cache=False)
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    del out
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"model": kind, "shape": shape, "time_steps": time_steps if kind == "student" else None,
            "batch": BATCH[shape], "seq": SEQ, "step_s": times[len(times) // 2], "saved_mib": saved / 2**20,
            "peak_rss_growth_mib": (rss_after - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "opt-125m"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/train_step.json")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "SHAPE", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, shape, t = args.one
        print(json.dumps(measure(kind, shape, int(t), args.repeats)))
        return

    rows = []
    for shape in args.shapes:
        for kind, t in [("ann", 0), ("student", 2), ("student", 4)]:
            cmd = [sys.executable, __file__, "--one", kind, shape, str(t), "--repeats", str(args.repeats)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(row)
            print(json.dumps(row))
    for row in rows:
        if row["model"] == "student":
            ann = next(r for r in rows if r["model"] == "ann" and r["shape"] == row["shape"])
            t = row["time_steps"]
            row["time_ratio"] = row["step_s"] / ann["step_s"]
            row["saved_ratio"] = row["saved_mib"] / ann["saved_mib"]
            row["rss_ratio"] = row["peak_rss_growth_mib"] / max(ann["peak_rss_growth_mib"], 1e-9)
            row["time_goal_met"] = row["time_ratio"] <= 1.5 * t
            row["memory_goal_met"] = row["saved_ratio"] <= t
    result = {"benchmark": "train_step", "command": "python benchmarks/train_step.py",
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "goals": "step time <= 1.5*T x ANN; memory kept for backward <= T x ANN", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
