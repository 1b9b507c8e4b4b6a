"""``bispikclm energy CHECKPOINT [--teacher PATH]``: count operations on real text and estimate energy against
the ANN (the teacher, or a same-shape OPT when no teacher is given)."""

from __future__ import annotations

import argparse

from ..cost_tables import PRECISIONS
from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the student: a save_pretrained folder (model and tokenizer), a .gguf "
                                           "file, a short name or a Hub name")
    parser.add_argument("--teacher", default=None, help="ANN to compare with, named the same ways (default: a "
                                                        "same-shape OPT; its count depends only on its shape)")
    parser.add_argument("--text", default=None, help="text file (default: WikiText-2 test from $BISPIKCLM_DATA, "
                                                     "default <repo>/../shared/data)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--num-sequences", type=int, default=1, help="number of sequences (default 1)")
    parser.add_argument("--time-steps", type=int, default=None, help="run the student with this T")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float32",
                        help="arithmetic of both models in the main table: float32 (MAC 4.6 / add 0.9 pJ, the "
                             "paper's) or int8 (MAC 0.23 / add 0.03 pJ); Horowitz ISSCC 2014, 45 nm. The table of "
                             "both conventions below it always lists both")
    parser.add_argument("--energy-table", default=None, help="YAML/JSON file with mac_pj, ac_pj (overrides "
                                                             "--precision)")
    parser.add_argument("--json", default=None, help="also write the full report (every line) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from ..ann import same_shape_ann
    from ..checkpoints import check_vocabulary, load_pretrained
    from ..configuration import max_positions
    from ..cost_tables import load_energy_table
    from ..data import text_token_ids
    from ..energy import count_operations, energy_report, format_report, save_report

    student, tokenizer = load_pretrained(args.checkpoint)
    if not hasattr(student.config, "time_steps"):
        raise UserError(f"{args.checkpoint} is not a BiSpikCLM student ({type(student).__name__})")
    if args.time_steps is not None:
        student.config.time_steps = args.time_steps
        student.config._validate()
    table = load_energy_table(args.energy_table) if args.energy_table else PRECISIONS[args.precision]
    input_ids = text_token_ids(tokenizer, args.text, args.seq_len, args.num_sequences,
                               max_length=max_positions(student))
    ann = load_pretrained(args.teacher)[0] if args.teacher else same_shape_ann(student.config)
    check_vocabulary(ann, len(tokenizer), "teacher")
    report = energy_report(count_operations(student, input_ids, name=args.checkpoint),
                           count_operations(ann, input_ids, name=args.teacher or "same-shape OPT"), table)
    print(format_report(report))
    if args.json:
        save_report(report, args.json)
    return 0
