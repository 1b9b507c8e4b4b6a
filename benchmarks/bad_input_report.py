"""How hard the commands are to break: runs the bad-input suite (``tests/test_bad_input.py``, hypothesis) and
writes how many cases ran, of which kinds, and whether every one ended in a one-line error with exit code 2,
no traceback and the output folder untouched, to ``results/bad_input.json``.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bad_input_report.py [--out results/bad_input.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bad_input.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / "cases.json"
        env = {**os.environ, "BISPIKCLM_BAD_INPUT_JSON": str(counts_path)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(REPO / "tests" / "test_bad_input.py")], cwd=REPO, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        cases = json.loads(counts_path.read_text()) if counts_path.is_file() else {}
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    result = {"command": "OMP_NUM_THREADS=1 PYTHONPATH=. python " + shlex.join(["benchmarks/bad_input_report.py",
                                                                               *sys.argv[1:]]),
              "all_passed": done.returncode == 0, "pytest": summary, "seconds": round(seconds, 1),
              "total_cases": sum(cases.values()), "kinds": len(cases), "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['total_cases']} bad-input cases in {result['kinds']} kinds ({summary}); wrote {args.out}")
    if done.returncode:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
