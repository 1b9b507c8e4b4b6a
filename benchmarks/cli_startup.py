"""How long the command line takes to answer when it loads no model: ``bispikclm --help``, ``bispikclm train
--help`` and an argument error (``bispikclm train`` without its arguments), each in a fresh interpreter, as a user
runs them. Also ``python -c "import torch"`` for scale (the floor a command that loads torch cannot beat).

Each case runs ``--repeats`` times, interleaved (case after case, so that a change of load hits all alike); the
median wall time is the result. The 1-, 5- and 15-minute load averages before and after are recorded with the
machine's CPU count, since other processes on a shared machine slow every start. With ``--baseline DIR`` (another
checkout, e.g. an older commit in a git worktree) the three ``bispikclm`` cases also run from that tree, interleaved
with these, for a before/after under the same load.

    PYTHONPATH=. python benchmarks/cli_startup.py            # writes results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "bispikclm --help": (["-m", "bispikclm", "--help"], 0),
    "bispikclm train --help": (["-m", "bispikclm", "train", "--help"], 0),
    "bispikclm train (argument error)": (["-m", "bispikclm", "train"], 2),
    "python -c 'import torch' (for scale)": (["-c", "import torch"], 0),
}


def timed(args: list[str], expected: int, tree: Path) -> float:
    """Wall seconds of ``python ARGS`` in a fresh process that imports bispikclm from ``tree`` (its working folder
    and PYTHONPATH: ``python -m`` puts the working folder first); its exit code must be ``expected``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"python {' '.join(args)} exited {done.returncode}, expected {expected}: "
                         f"{done.stderr.strip().splitlines()[-1:]}")
    return seconds


def commit(tree: Path) -> str | None:
    """The checked-out commit of ``tree`` (``+changes`` when its files differ from it), or None outside git."""
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each case (default 7)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "cli_startup.json")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time the same way")
    parser.add_argument("--note", default="", help="what else ran on the machine, recorded with the results")
    args = parser.parse_args()
    trees = {"": REPO} if args.baseline is None else {"": REPO, " [baseline]": args.baseline.resolve()}
    cases = {name + tag: (case_args, expected, tree)
             for tag, tree in trees.items() for name, (case_args, expected) in CASES.items()
             if tag == "" or "bispikclm" in case_args}
    for case_args, expected, tree in cases.values():    # one untimed run each: the file cache, as for a second call
        timed(case_args, expected, tree)
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (case_args, expected, tree) in cases.items():
            runs[name].append(timed(case_args, expected, tree))
    load_after = os.getloadavg()
    cpus = os.cpu_count()
    results = {name: {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                      "runs_s": [round(t, 4) for t in times]} for name, times in runs.items()}
    busy = max(load_before[0], load_after[0]) > 0.5 * cpus
    payload = {
        "what": "wall time of a fresh `python -m bispikclm ...` that loads no model (median of the runs)",
        "command": "PYTHONPATH=. python benchmarks/cli_startup.py " + " ".join(sys.argv[1:]),
        "commit": commit(REPO), "baseline_commit": None if args.baseline is None else commit(args.baseline),
        "repeats": args.repeats, "cpus": cpus, "python": platform.python_version(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "machine": (f"loaded: a 1-minute load average up to {max(load_before[0], load_after[0]):.2f} on {cpus} CPUs "
                    f"(other processes were running); an idle machine is faster" if busy
                    else "idle or nearly (1-minute load average at most half the CPUs)"),
        "note": args.note,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    for name, row in results.items():
        print(f"{name:<52} median {row['median_s']:.3f} s  (min {row['min_s']:.3f}, max {row['max_s']:.3f})")
    print(f"load average before {payload['load_average_before']}, after {payload['load_average_after']} "
          f"on {cpus} CPUs; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
