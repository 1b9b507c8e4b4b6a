"""Energy of BiSpikCLM students against same-shape ANNs on WikiText-2 test text, written to results/energy.json.

By default: an ``opt-125m``-shape student with **random weights** (seed 0) at T = 2 and T = 4 with a spiking head,
and at T = 2 with the LayerNorm head, against a same-shape OPT (an ANN's count depends only on its shape). With
``--run-dir`` (a folder holding ``student/`` and ``teacher/``, as the quickstart writes), that trained student
is also counted at T = 2 and 4 against its teacher, with its own tokenizer.

    python benchmarks/energy.py [--run-dir runs/quickstart] [--seq-len 512] [--out results/energy.json]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.checkpoints import load_pretrained
from bispikclm.data import default_text_path, text_token_ids, train_tokenizer
from bispikclm.energy import EnergyTable, count_operations, energy_report, format_report, same_shape_ann, save_report
from bispikclm.report import model_dir


def wikitext_tokenizer(data_text: Path, vocab_size: int = 8192, lines: int = 20000) -> PreTrainedTokenizerFast:
    """Byte-level BPE (:func:`bispikclm.data.train_tokenizer`) trained on the first ``lines`` lines of WikiText-2
    train (for the random-weight students)."""
    with open(data_text.parent / "train.txt", encoding="utf-8") as handle:
        return train_tokenizer([next(handle) for _ in range(lines)], vocab_size)


def measure(student, ann_count, input_ids, label: str, table: EnergyTable) -> dict:
    start = time.perf_counter()
    report = energy_report(count_operations(student, input_ids, name=label), ann_count, table)
    print(f"\n== {label}: T = {student.config.time_steps}, spiking_head = {student.config.spiking_head} "
          f"({time.perf_counter() - start:.0f} s)\n{format_report(report)}", flush=True)
    return {"label": label, "spiking_head": student.config.spiking_head, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="quickstart run folder with student/ and teacher/")
    parser.add_argument("--text", default=None, help="text file (default: WikiText-2 test)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--time-steps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="results/energy.json")
    parser.add_argument("--presets", nargs="*", default=["opt-125m"],
                        help="shapes of random-weight students to count (none: only --run-dir)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.text) if args.text else default_text_path()
    table, runs = EnergyTable(), []

    for preset in args.presets:
        torch.manual_seed(0)
        config = BiSpikCLMConfig.from_preset(preset, spiking_head=True)
        input_ids = text_token_ids(wikitext_tokenizer(text), text, seq_len=args.seq_len)
        ann_count = count_operations(same_shape_ann(config), input_ids, name=f"{preset} shape OPT (ANN)")
        student, label = BiSpikCLMForCausalLM(config), f"{preset} shape, random weights (seed 0)"
        for t in args.time_steps:
            student.config.time_steps = t
            runs.append(measure(student, ann_count, input_ids, label, table))
        student.config.time_steps = min(args.time_steps)
        student.config.spiking_head = False   # same weights; the head becomes lm_head(LayerNorm(mean_t X_L))
        student.final_layer_norm = torch.nn.LayerNorm(config.hidden_size)
        runs.append(measure(student, ann_count, input_ids, label, table))

    if args.run_dir:
        student, tokenizer = load_pretrained(model_dir(Path(args.run_dir) / "student"))
        teacher = load_pretrained(model_dir(Path(args.run_dir) / "teacher"))[0]
        positions = student.config.max_position_embeddings
        input_ids = text_token_ids(tokenizer, text, min(args.seq_len, positions))
        ann_count = count_operations(teacher, input_ids, name="quickstart teacher")
        for t in args.time_steps:
            student.config.time_steps = t
            runs.append(measure(student, ann_count, input_ids, f"quickstart student ({args.run_dir})", table))

    save_report({
        "command": "python " + shlex.join(["benchmarks/energy.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "text": f"{text}, first {args.seq_len} tokens (fewer if a model has fewer positions)",
        "torch": torch.__version__,
        "runs": runs,
    }, args.out)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
