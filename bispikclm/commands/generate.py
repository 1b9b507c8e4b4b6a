"""``bispikclm generate CHECKPOINT --prompt TEXT``: stream text from a checkpoint, with the PyTorch model or the
packed engine (:mod:`bispikclm.engine`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..errors import UserError
from ..validation import check_finite_weights, check_student_config, load_pretrained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="folder written by save_pretrained (model and tokenizer)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--engine", choices=("torch", "packed"), default="packed",
                        help="PyTorch model or the packed event-driven engine (default: packed)")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--int8", action="store_true",
                        help="quantize the blocks' linear layers to int8 (both engines then agree bit for bit)")
    parser.add_argument("--int8-head", action="store_true", help="with --int8, quantize the LM head too")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer, TextStreamer

    from ..engine import PackedEngine, quantize_
    from ..modeling import BiSpikCLMForCausalLM

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} is not a checkpoint folder (no config.json); give a save_pretrained folder")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.int8_head and not args.int8:
        raise UserError("--int8-head needs --int8")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)) or (args.top_k is not None and args.top_k < 1):
        raise UserError(f"--temperature must be a number >= 0 and --top-k >= 1, got {args.temperature}, {args.top_k}")
    config = load_pretrained(AutoConfig.from_pretrained, checkpoint)
    check_student_config(config, checkpoint)
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or checkpoint)
    except (OSError, ValueError) as err:
        raise UserError(f"no tokenizer in {args.tokenizer or checkpoint} ({err}); pass --tokenizer") from err
    prompt = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if prompt.numel() == 0:
        raise UserError("the prompt is empty")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens, the model "
                        f"{config.vocab_size}; use the tokenizer the model was trained with")
    if prompt.shape[1] + args.max_new_tokens > config.max_position_embeddings:
        raise UserError(f"the prompt ({prompt.shape[1]} tokens) and --max-new-tokens {args.max_new_tokens} exceed the "
                        f"model's {config.max_position_embeddings} positions; shorten the prompt or generate fewer")
    model = load_pretrained(BiSpikCLMForCausalLM.from_pretrained, checkpoint, weights=True, dtype=torch.float32)
    model.eval()
    check_finite_weights(model, checkpoint)
    if args.int8:
        quantize_(model, head=args.int8_head)
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    generator = torch.Generator().manual_seed(args.seed)
    if args.engine == "torch":
        torch.manual_seed(args.seed)
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or 0) \
            if args.temperature > 0 else dict(do_sample=False)
        model.generate(prompt, max_new_tokens=args.max_new_tokens, streamer=streamer,
                       eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        return 0
    engine = PackedEngine.from_model(model, int8=args.int8)
    streamer.put(prompt)
    for token in engine.generate(prompt[0], args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 temperature=args.temperature, top_k=args.top_k, generator=generator):
        streamer.put(torch.tensor([token]))
    streamer.end()
    return 0
