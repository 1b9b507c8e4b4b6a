"""Perplexity-evaluation cost, student against teacher: throughput (tokens/s) at context 2048 and peak memory
at context 8192, for the ``tiny`` and ``opt-125m`` shapes. Writes ``results/eval.json``.

Weights are random (cost does not depend on them); the tokens are real WikiText-2 raw test text, encoded with a
4,096-token byte-level BPE trained on WikiText-2 train (ids are valid in both vocabularies). Each configuration
runs in its own process, single-threaded, so its peak resident memory (``ru_maxrss``) is its own. The student
evaluates with ``attn_chunk_size`` query chunks; the teacher is a same-shape OPT with PyTorch SDPA attention.
A second table measures the student's query chunk size (none, 2048, 512, 256, 128) at context 4096, ``tiny`` shape.

    python benchmarks/eval.py [--tokens-2048 N] [--shapes tiny,opt-125m]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM, same_shape_ann  # noqa: E402
from bispikclm.evaluation.perplexity import perplexity, wikitext2_text  # noqa: E402

POSITIONS = 8192


def rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus_ids(tokens: int) -> torch.Tensor:
    """The first ``tokens`` ids of WikiText-2 raw test under a 4,096-token BPE trained on WikiText-2 train."""
    from bispikclm.data import default_data_dir, train_tokenizer

    with open(default_data_dir() / "wikitext-2" / "train.txt", encoding="utf-8") as handle:
        tokenizer = train_tokenizer([next(handle) for _ in range(20000)], 4096)
    return torch.tensor(tokenizer(wikitext2_text("raw")[: tokens * 8], add_special_tokens=False)["input_ids"][:tokens])


def build(shape: str, kind: str, attn_chunk_size: int | None):
    """A randomly initialised student or same-shape OPT teacher with 8,192 positions."""
    student_config = BiSpikCLMConfig.from_preset(shape, max_position_embeddings=POSITIONS,
                                                 attn_chunk_size=attn_chunk_size)
    if kind == "student":
        return BiSpikCLMForCausalLM(student_config).eval()
    return same_shape_ann(student_config).eval()


def measure(shape: str, kind: str, context: int, tokens: int, attn_chunk_size: int | None) -> dict:
    """One configuration, in this process: tokens/s and peak memory of ``perplexity`` over ``tokens`` tokens."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = corpus_ids(tokens)
    model = build(shape, kind, attn_chunk_size)
    perplexity(model, ids[:129], 128, progress=False)           # warm-up
    loaded = rss_mb()
    started = time.perf_counter()
    result = perplexity(model, ids, context, progress=False)
    return {"shape": shape, "model": kind, "context_length": context, "tokens": int(ids.numel()),
            "attn_chunk_size": attn_chunk_size if kind == "student" else None,
            "seconds": time.perf_counter() - started, "tokens_per_second": result.tokens_per_second,
            "peak_rss_mb": rss_mb(), "rss_after_load_mb": loaded, "peak_over_load_mb": rss_mb() - loaded,
            "parameters": sum(p.numel() for p in model.parameters()), "firing_rate": result.firing_rate,
            "firing_rates": result.firing_rates}


def run_one(shape: str, kind: str, context: int, tokens: int, chunk: int | None) -> dict:
    """:func:`measure` in a fresh process, so that its peak memory is its own."""
    one = f"{shape},{kind},{context},{tokens},{chunk or 0}"
    done = subprocess.run([sys.executable, __file__, "--one", one], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,opt-125m")
    parser.add_argument("--tokens-2048", type=int, default=4096, help="tokens for the throughput runs (2 windows)")
    parser.add_argument("--attn-chunk-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "eval.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)     # internal: shape,kind,context,tokens,chunk
    args = parser.parse_args()
    if args.one:
        shape, kind, context, tokens, chunk = args.one.split(",")
        print(json.dumps(measure(shape, kind, int(context), int(tokens), int(chunk) or None)))
        return
    runs = [run_one(shape, kind, context, tokens, args.attn_chunk_size)
            for shape in args.shapes.split(",") for kind in ("student", "teacher")
            for context, tokens in ((2048, args.tokens_2048), (8192, 8192))]
    chunk_sizes = [run_one("tiny", "student", 4096, 4096, chunk) for chunk in (None, 2048, 512, 256, 128)]
    ratios = {}
    for shape in args.shapes.split(","):
        pick = {(r["model"], r["context_length"]): r for r in runs if r["shape"] == shape}
        ratios[shape] = {
            "throughput_2048_student_over_teacher": pick["student", 2048]["tokens_per_second"]
            / pick["teacher", 2048]["tokens_per_second"],
            "peak_memory_8192_student_over_teacher": pick["student", 8192]["peak_rss_mb"]
            / pick["teacher", 8192]["peak_rss_mb"],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "WikiText-2 perplexity evaluation: throughput at context 2048, peak memory at context 8192",
        "command": "python benchmarks/eval.py " + " ".join(sys.argv[1:]),
        "weights": "random (cost does not depend on the weights)",
        "threads": 1, "device": "cpu", "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "student": {"time_steps": 2, "attn_chunk_size": args.attn_chunk_size, "neuron_backend": "lean"},
        "teacher": "same-shape OPTForCausalLM, SDPA attention",
        "runs": runs, "ratios": ratios, "attn_chunk_size_tiny_4096": chunk_sizes}, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
