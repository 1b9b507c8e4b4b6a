"""Perplexity cost of 4-bit weights against int8 on a trained student: WikiText-2 test perplexity of the student
with its blocks' linear layers and its LM head quantized as the packed engine runs them (``quantize_``: int8 or
4-bit rows on a power-of-two grid; the head float, int8, or 4-bit in groups of 32 inputs).

    PYTHONPATH=. python benchmarks/engine_4bit.py --student runs/quickstart/student/model

writes ``results/engine_4bit.json``. The PyTorch model is scored: with quantized weights the engine computes the
same currents bit for bit (the same spikes), and its head the same logits to float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bispikclm.data import encode, load_texts  # noqa: E402
from bispikclm.engine import quantize_  # noqa: E402
from bispikclm.evaluation.perplexity import perplexity  # noqa: E402
from bispikclm.modeling import BiSpikCLMForCausalLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

# (rows, head): bits of the blocks' linear layers and of the LM head (None: float)
VARIANTS = {"float32": (None, None), "int8 rows, float head": (8, None), "int8 rows, int8 head": (8, 8),
            "4-bit rows, int8 head": (4, 8), "int8 rows, 4-bit head": (8, 4), "4-bit rows, 4-bit head": (4, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=str(REPO / "runs" / "quickstart" / "student" / "model"))
    parser.add_argument("--data", default=os.environ.get("BISPIKCLM_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--windows", type=int, default=100, help="first non-overlapping windows of WikiText-2 test")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "engine_4bit.json")
    args = parser.parse_args()
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    context = BiSpikCLMForCausalLM.config_class.from_pretrained(args.student).max_position_embeddings
    ids = encode(load_texts(str(Path(args.data) / "wikitext-2"), "test"), tokenizer)
    ids = ids[:args.windows * context]
    rows = {}
    for name, (bits, head_bits) in VARIANTS.items():
        model = BiSpikCLMForCausalLM.from_pretrained(args.student, dtype=torch.float32).eval()
        if bits is not None:
            quantize_(model, head=head_bits is not None, bits=bits, head_bits=head_bits)
        result = perplexity(model, ids, context, batch_size=16, progress=False)
        rows[name] = {"rows_bits": bits, "head_bits": head_bits, "perplexity": round(result.perplexity, 4),
                      "firing_rate": round(result.firing_rate, 4)}
        print(name, json.dumps(rows[name]), flush=True)
    base = rows["int8 rows, int8 head"]["perplexity"]
    for row in rows.values():
        row["vs_int8_percent"] = round(100 * (row["perplexity"] / base - 1), 2)
    result = {"command": " ".join(["PYTHONPATH=. python benchmarks/engine_4bit.py", *sys.argv[1:]]),
              "student": args.student, "context_length": context, "windows": args.windows,
              "tokens_scored": int(ids.numel() - args.windows), "variants": rows,
              "runtime_s": round(time.time() - start, 1)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
