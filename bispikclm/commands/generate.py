"""``bispikclm generate MODEL --prompt TEXT``: stream text from a student (the PyTorch model or the packed engine,
:mod:`bispikclm.engine`) or any causal LM (a folder, a ``.gguf`` file, a short name such as ``smollm2-135m``, a Hub
name). With ``--compare OTHER`` (repeatable), every model continues the same prompt greedily and the
continuations are printed side by side, e.g. a spiking student beside its teacher."""

from __future__ import annotations

import argparse
import math
import time
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

ENGINES = ("torch", "packed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a save_pretrained folder (model and tokenizer), a .gguf file, a short "
                                           "name (smollm2-135m) or a Hub name")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--compare", action="append", default=[], metavar="MODEL",
                        help="another model to continue the same prompt (repeatable); prints the greedy "
                             "continuations side by side")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="for students: the PyTorch model or the packed event-driven engine (default: packed); "
                             "other models run with PyTorch")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--int8", action="store_true",
                        help="quantize the students' linear layers to int8 (both engines then agree bit for bit)")
    parser.add_argument("--int8-head", action="store_true", help="with --int8, quantize the LM head too")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8,
                        help="with --int8, bits per weight: 8, or 4 (4-bit rows; a 4-bit head with --int8-head)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer of the first model (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def load(spec: str, args: argparse.Namespace, tokenizer_spec: str | None = None):
    """``(model, tokenizer, engine)`` of one model: a student runs on ``args.engine`` (default packed), quantized
    with ``--int8``; any other causal LM on PyTorch."""
    from ..checkpoints import load_pretrained
    from ..engine import PackedEngine, quantize_
    from ..modeling import BiSpikCLMForCausalLM

    model, tokenizer = load_pretrained(spec, tokenizer=tokenizer_spec)
    student = isinstance(model, BiSpikCLMForCausalLM)
    if not student:
        if args.engine == "packed":
            raise UserError(f"the packed engine runs BiSpikCLM students; {spec!r} is a {model.config.model_type} "
                            f"(use --engine torch)")
        return model, tokenizer, "torch"
    if args.int8:
        quantize_(model, head=args.int8_head, bits=args.bits)
    engine = args.engine or "packed"
    return ((PackedEngine.from_model(model, int8=args.int8, bits=args.bits) if engine == "packed" else model),
            tokenizer, engine)


def encode_prompt(tokenizer, prompt: str, positions: int | None = None, new_tokens: int = 0) -> torch.Tensor:
    """The prompt's ids ``[1, N]``; UserError when it is empty or, with ``positions``, when it and ``new_tokens``
    do not fit the model's positions."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise UserError("the prompt is empty")
    if positions is not None and ids.shape[1] + new_tokens > positions:
        raise UserError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {new_tokens} exceed the model's "
                        f"{positions} positions; shorten the prompt or generate fewer")
    return ids


def generate_ids(model, engine: str, tokenizer, prompt: torch.Tensor, args: argparse.Namespace, streamer=None):
    """The new token ids after ``prompt`` ``[1, N]`` (greedy unless ``--temperature``), streamed when given a
    streamer."""
    import torch

    if engine == "torch":
        torch.manual_seed(args.seed)
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or 0) \
            if args.temperature > 0 else dict(do_sample=False)
        out = model.generate(prompt, max_new_tokens=args.max_new_tokens, streamer=streamer,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        return out[0, prompt.shape[1]:].tolist()
    generator = torch.Generator().manual_seed(args.seed)
    if streamer is not None:
        streamer.put(prompt)
    tokens = []
    for token in model.generate(prompt[0], args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                temperature=args.temperature, top_k=args.top_k, generator=generator):
        tokens.append(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
    if streamer is not None:
        streamer.end()
    return tokens


def continuations(specs: list[str], prompt: str, args: argparse.Namespace) -> list[dict]:
    """For each model, ``{"model", "engine", "text", "tokens", "seconds"}``: its continuation of ``prompt``."""
    from ..configuration import max_positions

    rows = []
    for i, spec in enumerate(specs):
        model, tokenizer, engine = load(spec, args, args.tokenizer if i == 0 else None)
        ids = encode_prompt(tokenizer, prompt, max_positions(model), args.max_new_tokens)
        start = time.perf_counter()
        new = generate_ids(model, engine, tokenizer, ids, args)
        rows.append({"model": spec, "engine": engine, "text": tokenizer.decode(new, skip_special_tokens=True),
                     "tokens": len(new), "seconds": time.perf_counter() - start})
    return rows


def side_by_side(prompt: str, rows: list[dict]) -> None:
    """Print the prompt and one column per model (rich table)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prompt: {prompt!r}", show_lines=True)
    for row in rows:
        table.add_column(f"{row['model']} ({row['engine']}, {row['tokens'] / max(row['seconds'], 1e-9):.1f} "
                         f"tokens/s)", overflow="fold")
    table.add_row(*(row["text"] for row in rows))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from ..configuration import max_positions

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if (args.int8_head or args.bits != 8) and not args.int8:
        raise UserError(f"{'--int8-head' if args.int8_head else '--bits'} needs --int8")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)) or (args.top_k is not None and args.top_k < 1):
        raise UserError(f"--temperature must be a number >= 0 and --top-k >= 1, got {args.temperature}, {args.top_k}")
    if args.compare and args.temperature > 0:
        raise UserError("--compare continues the prompt greedily in every model; drop --temperature")
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    if args.compare:
        side_by_side(args.prompt, continuations([args.checkpoint, *args.compare], args.prompt, args))
        return 0
    model, tokenizer, engine = load(args.checkpoint, args, args.tokenizer)
    prompt = encode_prompt(tokenizer, args.prompt, max_positions(model), args.max_new_tokens)
    generate_ids(model, engine, tokenizer, prompt, args,
                 streamer=TextStreamer(tokenizer, skip_prompt=True))
    return 0
