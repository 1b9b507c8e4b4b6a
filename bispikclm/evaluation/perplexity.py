"""WikiText-2 perplexity for BiSpikCLM students and Hugging Face causal LMs, at any context length.

Windows of ``context_length`` tokens start every ``stride`` tokens (``stride = context_length``: non-overlapping
windows; smaller: a sliding window where each token is scored once, with up to ``context_length - stride`` tokens
of history). Memory stays bounded at long contexts: the student's SFSA runs its queries in chunks of
``attn_chunk_size`` (binary maps, integer scores, never the whole ``T x H x N x N`` map), and the LM head runs
over ``head_chunk`` positions at a time, so ``N x vocab`` logits are never materialized.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM
from ..neurons import FiringRateRecorder
from ..validation import check_text_file
from .models import check_context_length
from .tasks import default_data_dir

CONTEXT_LENGTHS = (512, 1024, 2048, 4096, 8192)
WIKITEXT_FILES = {"raw": "wikitext-2-raw/wiki.test.raw", "tokenized": "wikitext-2/test.txt"}


@dataclass
class PerplexityResult:
    """Perplexity over ``tokens`` scored tokens. Students only: ``firing_rate`` = spikes / neuron updates over
    every neuron (at long contexts mostly the attention map's), ``firing_rates`` the same per kind of neuron."""

    context_length: int
    stride: int
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seconds: float
    tokens_per_second: float
    firing_rate: float | None = None
    firing_rates: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def wikitext2_text(variant: str = "raw", data_dir: str | Path | None = None) -> str:
    """The WikiText-2 test split as one string, joined as LLM papers do:
    ``"\\n\\n".join(rows)`` with ``rows = [line if line.strip() else "" for line in file]``."""
    if variant not in WIKITEXT_FILES:
        raise UserError(f"unknown WikiText-2 variant {variant!r} (known: {', '.join(WIKITEXT_FILES)})")
    path = Path(data_dir or default_data_dir()) / WIKITEXT_FILES[variant]
    if not path.is_file():
        raise UserError(f"WikiText-2 file {path} not found; set --data-dir or $BISPIKCLM_DATA")
    check_text_file(path, "WikiText-2 file")
    with path.open(encoding="utf-8") as handle:
        return "\n\n".join(line if line.strip() else "" for line in handle)


def encode_corpus(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids ``[L]`` of the whole text (the tokenizer's default special tokens, as in the HF recipe)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def windows(length: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` for each window over ``length`` tokens: the window feeds tokens
    ``[begin, end)`` and scores tokens ``[first_target, end)``, each token at most once. A token needs a prefix
    inside its window, so with non-overlapping windows the first token of each window goes unscored (as in the
    usual recipe); with a sliding stride every token but the first is scored."""
    if not 1 <= stride <= context_length:
        raise UserError(f"stride must be in [1, context length {context_length}], got {stride}")
    spans, scored_until = [], 1
    for begin in range(0, length - 1, stride):
        end = min(begin + context_length, length)
        first = max(scored_until, begin + 1)
        if end > first:
            spans.append((begin, end, first))
            scored_until = end
        if end == length:
            break
    return spans


def logits_fn(model: PreTrainedModel, input_ids: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Run the model body on ``input_ids`` ``[B, N]`` and return ``head(start, end)``: logits ``[B, end-start, V]``
    of positions ``[start, end)``, so callers apply the LM head to the positions they need only."""
    b, n = input_ids.shape
    if isinstance(model, BiSpikCLMForCausalLM):
        positions = torch.arange(n, device=input_ids.device).expand(b, n)
        x_last = model.model(input_ids, positions)[0]                  # [T, B, N, D]
        return lambda start, end: model.head(x_last[:, :, start:end])
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state   # [B, N, D]
    lm_head = model.get_output_embeddings()
    return lambda start, end: lm_head(hidden[:, start:end])


@torch.no_grad()
def token_nll(model: PreTrainedModel, input_ids: torch.Tensor, head_chunk: int = 1024) -> torch.Tensor:
    """Negative log-likelihood ``[B, N-1]`` of tokens ``1..N-1`` of ``input_ids`` ``[B, N]`` given their prefix.

    The LM head and the log-softmax run over ``head_chunk`` positions at a time (float32)."""
    n = input_ids.shape[1]
    head = logits_fn(model, input_ids)
    nll = []
    for start in range(0, n - 1, head_chunk):
        end = min(start + head_chunk, n - 1)
        logits = head(start, end).float()                               # [B, chunk, V]
        nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, start + 1:end + 1],
                                                     reduction="none"))
    return torch.cat(nll, dim=1)


def firing_rates(recorder: FiringRateRecorder) -> dict[str, float]:
    """Spikes / neuron updates counted by ``recorder``: ``"all"`` over every neuron, and one entry per kind of
    neuron over all layers (e.g. ``self_attn.attn_neuron``, the attention map)."""
    counts: dict[str, list[float]] = {"all": [0.0, 0.0]}
    for name, (fired, updates) in recorder.counts.items():
        for key in ("all", re.sub(r"^model\.layers\.\d+\.", "", name)):
            total = counts.setdefault(key, [0.0, 0.0])
            total[0] += fired
            total[1] += updates
    return {key: spikes / max(updates, 1.0) for key, (spikes, updates) in counts.items()}


@torch.no_grad()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor, context_length: int, stride: int | None = None,
               batch_size: int = 1, max_tokens: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``input_ids`` ``[L]``.

    ``stride`` defaults to ``context_length`` (non-overlapping windows); ``max_tokens`` keeps only the first
    tokens of the stream (quick runs); ``batch_size`` windows of equal length run together."""
    check_context_length(model, context_length)
    stride = stride or context_length
    if max_tokens:
        input_ids = input_ids[:max_tokens]
    if input_ids.numel() < 2:
        raise UserError("need at least two tokens to measure perplexity")
    spans = windows(input_ids.numel(), context_length, stride)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    student = isinstance(model, BiSpikCLMForCausalLM)
    started = time.perf_counter()
    with FiringRateRecorder(model.neurons() if student else {}) as recorder:
        bar = tqdm(total=len(spans), desc=f"ppl @ {context_length}", unit="window", disable=not progress)
        for i in range(0, len(spans), batch_size):
            group = spans[i:i + batch_size]
            lengths = {end - begin for begin, end, _ in group}
            batches = [group] if len(lengths) == 1 else [[span] for span in group]   # only the last may be short
            for batch in batches:
                ids = torch.stack([input_ids[begin:end] for begin, end, _ in batch]).to(device)
                nll = token_nll(model, ids)                            # [B, N-1]; column j scores token j+1
                for row, (begin, end, first) in enumerate(batch):
                    total_nll += float(nll[row, first - begin - 1:].double().sum())
                    total_tokens += end - first
            bar.update(len(group))
        bar.close()
    seconds = time.perf_counter() - started
    rates = firing_rates(recorder) if student else None
    mean_nll = total_nll / total_tokens
    return PerplexityResult(context_length=context_length, stride=stride, perplexity=math.exp(mean_nll),
                            nll=mean_nll, tokens=total_tokens, windows=len(spans), seconds=seconds,
                            tokens_per_second=sum(end - begin for begin, end, _ in spans) / seconds,
                            firing_rate=rates and rates["all"], firing_rates=rates)
