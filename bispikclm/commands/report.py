"""``bispikclm report RUN_DIR``: firing-pattern pictures, firing rates, attention maps, energy and audit of the
student in ``RUN_DIR/student`` (against ``RUN_DIR/teacher`` when present), or of a student named like any model
(against ``--teacher``), as PNG files and one HTML file."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="folder holding student/ and optionally teacher/ (save_pretrained folders, "
                                        "or training run folders with the model in model/, as the quickstart "
                                        "writes), or the student itself: a save_pretrained folder, a .gguf file, a "
                                        "short name or a Hub name")
    parser.add_argument("--teacher", default=None, help="the teacher to compare with, named the same ways (default: "
                                                        "RUN_DIR/teacher when present, else a same-shape OPT)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    parser.add_argument("--text", default=None, help="text file (default: WikiText-2 test from $BISPIKCLM_DATA, "
                                                     "default <repo>/../shared/data)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens shown in the pictures (default 32)")
    parser.add_argument("--energy-seq-len", type=int, default=256, help="tokens the energy is counted on")


def run(args: argparse.Namespace) -> int:
    from ..report import build_report

    path = build_report(args.run_dir, args.out, args.text, args.tokens, args.energy_seq_len, teacher=args.teacher)
    print(f"report written to {path}")
    return 0
