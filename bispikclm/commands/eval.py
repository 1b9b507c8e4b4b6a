"""``bispikclm eval ppl|zeroshot|sweep|parity|lm-eval``: perplexity, zero-shot tasks, threshold x time-step
sweeps, our zero-shot scores against lm-evaluation-harness's own backend, and lm-evaluation-harness. Results go
to ``--out`` as JSON plus a Markdown table (also printed). The model is a positional argument or ``--model``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import UserError

DEFAULT_ATTN_CHUNK = 256


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _model_arguments(parser: argparse.ArgumentParser, spiking: bool = True) -> None:
    parser.add_argument("model", nargs="?", help="checkpoint folder (save_pretrained) of a student or any Hugging "
                                                 "Face causal LM with its tokenizer, a .gguf file, a short name "
                                                 "(smollm2-135m) or a Hub name")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the model, as an option")
    parser.add_argument("--data-dir", help="data folder (default: $BISPIKCLM_DATA or <repo>/../shared/data)")
    parser.add_argument("--out", type=Path, help="folder for the JSON and Markdown results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--attn-chunk-size", type=int, default=DEFAULT_ATTN_CHUNK,
                        help="student attention runs this many queries at a time (bounds memory); 0: all at once")
    if spiking:
        parser.add_argument("--threshold", type=float, help="override the student's firing threshold")
        parser.add_argument("--time-steps", type=int, help="override the student's number of time steps T")


def _ppl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-lengths", type=_ints, default=None,
                        help="comma-separated (default: 512,1024,2048,4096,8192 up to the model's positions)")
    parser.add_argument("--stride", type=int, help="sliding-window stride (default: non-overlapping windows)")
    parser.add_argument("--variant", choices=("raw", "tokenized"), default="raw", help="WikiText-2 test file")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first tokens of the test set")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("ppl", help="WikiText-2 perplexity at several context lengths")
    _model_arguments(ppl)
    _ppl_arguments(ppl)
    zeroshot = sub.add_parser("zeroshot", help="zero-shot tasks: acc / acc_norm, LAMBADA acc and perplexity")
    _model_arguments(zeroshot)
    zeroshot.add_argument("--tasks", default="paper", help="comma-separated task or group names (paper, extra)")
    zeroshot.add_argument("--limit", type=int, help="first N items of each task")
    sweep = sub.add_parser("sweep", help="perplexity (firing rate) over thresholds x time steps x contexts")
    _model_arguments(sweep, spiking=False)
    _ppl_arguments(sweep)
    sweep.add_argument("--thresholds", type=_floats, required=True, help="comma-separated, e.g. 0.5,0.7,1.0")
    sweep.add_argument("--time-steps", type=_ints, default=None, help="comma-separated (default: the model's T)")
    parity = sub.add_parser("parity", help="zero-shot scores of our evaluator against lm-evaluation-harness's "
                                           "own hf backend, task by task")
    _model_arguments(parity, spiking=False)
    parity.add_argument("--tasks", default="paper", help="comma-separated multiple-choice task or group names")
    parity.add_argument("--limit", type=int, help="first N items of each task")
    parity.add_argument("--cache-dir", help="where a GGUF model is saved for the harness (default: "
                                            "$BISPIKCLM_CACHE or ~/.cache/bispikclm)")
    # prefix_chars="+": every argument after `lm-eval`, dashes included, goes to lm-eval unchanged
    lm_eval = sub.add_parser("lm-eval", help="lm-evaluation-harness with the bispikclm model and local tasks",
                             prefix_chars="+",
                             description="Arguments after `lm-eval` go to lm-eval unchanged, e.g. --model bispikclm "
                                         "--model_args pretrained=PATH --tasks bispikclm_paper")
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER)


def _load(args: argparse.Namespace, context_lengths: list[int] | None = None, **overrides):
    """Model and tokenizer; bad context lengths fail on the config, before the weights load."""
    import torch

    from ..checkpoints import load_config, load_pretrained
    from ..evaluation.models import check_context_length

    config = load_config(args.model)
    for length in context_lengths or []:
        check_context_length(config, length)
    return load_pretrained(args.model, dtype=torch.float32, device=args.device,
                      attn_chunk_size=args.attn_chunk_size or None, **overrides)


def _context_lengths(args: argparse.Namespace) -> list[int]:
    """The requested context lengths, or the paper's 512..8192 up to the model's positions."""
    from ..checkpoints import load_config
    from ..configuration import max_positions
    from ..evaluation.perplexity import CONTEXT_LENGTHS

    if args.context_lengths:
        return args.context_lengths
    limit = max_positions(load_config(args.model))
    return [n for n in CONTEXT_LENGTHS if limit is None or n <= limit] or [limit]


def _write(args: argparse.Namespace, name: str, payload: dict, markdown: str) -> None:
    print(markdown)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"command": "bispikclm " + " ".join(sys.argv[1:]), "model": args.model, **payload}
        (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(markdown)
        print(f"wrote {args.out / name}.json and .md", file=sys.stderr)


def run_ppl(args: argparse.Namespace) -> int:
    from ..evaluation.perplexity import encode_corpus, perplexity, wikitext2_text

    lengths = _context_lengths(args)
    text = wikitext2_text(args.variant, args.data_dir)
    model, tokenizer = _load(args, lengths, threshold=args.threshold, time_steps=args.time_steps)
    ids = encode_corpus(tokenizer, text)
    results = [perplexity(model, ids, n, stride=args.stride, batch_size=args.batch_size or 1,
                          max_tokens=args.max_tokens).to_dict() for n in lengths]
    lines = ["| context | stride | perplexity | firing rate | tokens | tokens/s |", "|---|---|---|---|---|---|"]
    for r in results:
        rate = "–" if r["firing_rate"] is None else f"{r['firing_rate']:.3f}"
        lines.append(f"| {r['context_length']} | {r['stride']} | {r['perplexity']:.2f} | {rate} | {r['tokens']} | "
                     f"{r['tokens_per_second']:.0f} |")
    _write(args, "ppl", {"variant": args.variant, "results": results}, "\n".join(lines) + "\n")
    return 0


def run_zeroshot(args: argparse.Namespace) -> int:
    from ..evaluation.tasks import read_task, resolve_tasks
    from ..evaluation.zeroshot import evaluate_tasks, zeroshot_markdown

    for task in resolve_tasks(args.tasks):   # bad task names and files fail before the model loads
        read_task(task, args.data_dir, args.limit)
    model, tokenizer = _load(args, threshold=args.threshold, time_steps=args.time_steps)
    results = evaluate_tasks(model, tokenizer, args.tasks, args.data_dir, args.limit, args.batch_size or 16)
    _write(args, "zeroshot", {"limit": args.limit, **results}, zeroshot_markdown(results))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from ..evaluation.perplexity import encode_corpus, wikitext2_text
    from ..evaluation.sweep import sweep, sweep_markdown, sweep_plot
    from ..modeling import BiSpikCLMForCausalLM

    lengths = _context_lengths(args)
    text = wikitext2_text(args.variant, args.data_dir)
    model, tokenizer = _load(args, lengths)
    if not isinstance(model, BiSpikCLMForCausalLM):
        raise UserError(f"sweeps need a BiSpikCLM student; {args.model!r} is a {model.config.model_type}")
    ids = encode_corpus(tokenizer, text)
    records = sweep(model, ids, args.thresholds, args.time_steps or [model.config.time_steps], lengths,
                    stride=args.stride, batch_size=args.batch_size or 1, max_tokens=args.max_tokens)
    _write(args, "sweep", {"variant": args.variant, "records": records}, sweep_markdown(records))
    if args.out:
        sweep_plot(records, args.out / "sweep.png")
    return 0


def run_parity(args: argparse.Namespace) -> int:
    from ..evaluation.parity import parity, parity_markdown
    from ..evaluation.tasks import read_task, resolve_tasks

    tasks = resolve_tasks(args.tasks)
    lambada = [t.name for t in tasks if t.kind != "multiple_choice"]
    if lambada:
        raise UserError(f"parity compares multiple-choice tasks; drop {lambada}")
    for task in tasks:   # bad task names and files fail before the model loads
        read_task(task, args.data_dir, args.limit)
    start = time.perf_counter()
    result = parity(args.model, args.tasks, args.data_dir, args.limit, args.batch_size or 16, args.device,
                    args.cache_dir)
    result["seconds"] = time.perf_counter() - start
    _write(args, "parity", result, parity_markdown(result))
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    from ..evaluation.lm_eval_cli import main

    return main(args.lm_eval_args)


def run(args: argparse.Namespace) -> int:
    if hasattr(args, "model_option"):     # every subcommand but lm-eval
        if args.model and args.model_option and args.model != args.model_option:
            raise UserError(f"two models given ({args.model!r} and --model {args.model_option!r}); give one")
        args.model = args.model or args.model_option
        if not args.model:
            raise UserError("no model given: bispikclm eval COMMAND MODEL (or --model MODEL)")
    return {"ppl": run_ppl, "zeroshot": run_zeroshot, "sweep": run_sweep, "parity": run_parity,
            "lm-eval": run_lm_eval}[args.eval_command](args)
