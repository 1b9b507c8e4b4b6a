"""``bispikclm audit CHECKPOINT``: list every non-spiking operation on the inference path; exit 1 if the blocks
have any."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a save_pretrained folder (model and tokenizer), a .gguf file, a short "
                                           "name or a Hub name")
    parser.add_argument("--text", default=None, help="text file to run on (default: WikiText-2 test from "
                                                     "$BISPIKCLM_DATA, default <repo>/../shared/data)")
    parser.add_argument("--tokens", type=int, default=128, help="number of tokens to run (default 128)")
    parser.add_argument("--json", default=None, help="also write the findings to this JSON file")


def run(args: argparse.Namespace) -> int:
    from ..audit import audit, format_audit
    from ..checkpoints import load_pretrained
    from ..configuration import max_positions
    from ..data import text_token_ids

    model, tokenizer = load_pretrained(args.checkpoint)
    input_ids = text_token_ids(tokenizer, args.text, args.tokens, max_length=max_positions(model))
    result = audit(model, input_ids, name=args.checkpoint)
    hint = "" if getattr(model.config, "spiking_head", True) else "spiking_head=False: LayerNorm and a real-valued " \
                                                                  "product; a model with spiking_head is binary here"
    print(format_audit(result, head_hint=hint))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return 0 if result.blocks_clean else 1
