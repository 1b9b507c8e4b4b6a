"""Zero-shot evaluation by log-likelihood scoring, tokenized and truncated exactly as lm-evaluation-harness does.

* Multiple choice: each choice is scored by ``log p(choice | prompt)``; ``acc`` takes the best choice,
  ``acc_norm`` the best log-likelihood per character of the choice, as lm-eval does (``len(choice)``; the data
  README says bytes, which is the same for ASCII choices: 335 of the 20,528 items of the eight tasks have
  accented choices).
* LAMBADA: ``acc`` is 1 when greedy decoding reproduces the whole continuation (every continuation token is the
  argmax), ``perplexity`` is ``exp(-mean log p(continuation | context))`` over items.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..configuration import max_positions
from .perplexity import logits_fn
from .tasks import PAPER_TASKS, Task, read_task, resolve_tasks


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)``: the pair is encoded whole and split after the context's tokens;
    trailing spaces of the context move to the continuation; an empty context becomes the BOS (or EOS) token."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        if continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[tuple[str, str]],
                   batch_size: int = 16, progress: bool = True) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy)`` for each ``(context, continuation)`` request.

    ``greedy`` is True when every continuation token is the argmax. Inputs longer than the model's positions (the
    config's, else the tokenizer's ``model_max_length``, else 2,048, as lm-eval resolves them) keep
    their last tokens; a continuation longer than the model's positions is scored on its last tokens that have a
    prediction in the window (all but the window's first). Requests run longest first in right-padded batches
    (causal masking keeps padding out)."""
    limit = max_positions(model) or _tokenizer_max_length(tokenizer) or 2048
    device = next(model.parameters()).device
    encoded = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        sequence = (context_ids + continuation_ids)[-(limit + 1):]
        encoded.append((sequence[:-1], sequence[-min(len(continuation_ids), len(sequence) - 1):]))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", unit="batch", disable=not progress):
        batch = order[start:start + batch_size]
        width = len(encoded[batch[0]][0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
        first = min(len(encoded[i][0]) - len(encoded[i][1]) for i in batch)
        logprobs = logits_fn(model, ids.to(device))(first, width).float().log_softmax(-1).cpu()  # [B, width-first, V]
        for row, i in enumerate(batch):
            inputs, targets = encoded[i]
            span = logprobs[row, len(inputs) - len(targets) - first:len(inputs) - first]     # [len(targets), V]
            targets = torch.tensor(targets)
            ll = float(span.gather(-1, targets[:, None]).sum())
            results[i] = (ll, bool((span.argmax(-1) == targets).all()))
    return results


def _tokenizer_max_length(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's ``model_max_length`` unless it is transformers' "unset" value: lm-eval's fallback when a
    config states no positions."""
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length and length < 1e29 else None


def score_multiple_choice(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[dict],
                          batch_size: int = 16, progress: bool = True) -> dict:
    """``{"acc", "acc_norm", "n"}`` (fractions) over multiple-choice items ``{"prompt", "choices", "answer"}``."""
    requests = [(item["prompt"], choice) for item in items for choice in item["choices"]]
    return score_lls(items, [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size, progress)])


def score_lls(items: list[dict], lls: list[float]) -> dict:
    """``{"acc", "acc_norm", "n"}`` from the log-likelihood of every choice of every item, in order.

    ``acc_norm`` divides each log-likelihood by the choice's length in characters, as lm-evaluation-harness does
    (``len(choice)``; the same as bytes for ASCII choices, fewer for accented ones)."""
    scores = iter(lls)
    correct = correct_norm = 0
    for item in items:
        item_lls = [next(scores) for _ in item["choices"]]
        per_char = [ll / len(choice) for ll, choice in zip(item_lls, item["choices"])]
        correct += max(range(len(item_lls)), key=item_lls.__getitem__) == item["answer"]
        correct_norm += max(range(len(item_lls)), key=per_char.__getitem__) == item["answer"]
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}


def score_lambada(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[dict],
                  batch_size: int = 16, progress: bool = True) -> dict:
    """``{"acc", "perplexity", "n"}`` over LAMBADA items ``{"context", "continuation"}``."""
    scores = loglikelihoods(model, tokenizer, [(item["context"], item["continuation"]) for item in items],
                            batch_size, progress)
    return {"acc": sum(greedy for _, greedy in scores) / len(scores),
            "perplexity": math.exp(-sum(ll for ll, _ in scores) / len(scores)), "n": len(scores)}


def evaluate_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[str] | str,
                   data_dir: str | Path | None = None, limit: int | None = None, batch_size: int = 16,
                   progress: bool = True) -> dict:
    """Scores per task and the average ``acc`` / ``acc_norm`` over the multiple-choice tasks.

    Returns ``{"tasks": {name: {...}}, "average": {"acc", "acc_norm", "tasks"}}`` (fractions), and
    ``"average_paper"`` over the paper's eight tasks when they are among more multiple-choice tasks."""
    resolved: list[Task] = resolve_tasks(tasks)
    items = {task.name: read_task(task, data_dir, limit) for task in resolved}   # every file checked first
    scores = {}
    for task in resolved:
        score = score_lambada if task.kind == "lambada" else score_multiple_choice
        scores[task.name] = score(model, tokenizer, items[task.name], batch_size, progress)
    choice_tasks = [t.name for t in resolved if t.kind == "multiple_choice"]
    results = {"tasks": scores, "average": _average(scores, choice_tasks)}
    if set(PAPER_TASKS) <= set(scores) and set(PAPER_TASKS) != set(choice_tasks):
        results["average_paper"] = _average(scores, list(PAPER_TASKS))
    return results


def _average(scores: dict, names: list[str]) -> dict:
    """Mean ``acc`` and ``acc_norm`` over the named multiple-choice tasks."""
    if not names:
        return {"tasks": []}
    return {**{metric: sum(scores[name][metric] for name in names) / len(names) for metric in ("acc", "acc_norm")},
            "tasks": names}


def zeroshot_markdown(results: dict) -> str:
    """A Markdown table of :func:`evaluate_tasks` results, in percent."""
    lines = ["| task | n | acc | acc_norm | perplexity |", "|---|---|---|---|---|"]
    for name, score in results["tasks"].items():
        norm = f"{100 * score['acc_norm']:.2f}" if "acc_norm" in score else "–"
        ppl = f"{score['perplexity']:.2f}" if "perplexity" in score else "–"
        lines.append(f"| {name} | {score['n']} | {100 * score['acc']:.2f} | {norm} | {ppl} |")
    for key, label in (("average_paper", "the paper's 8 tasks"), ("average", "{} tasks")):
        average = results.get(key, {})
        if average.get("tasks"):
            lines.append(f"| **average** ({label.format(len(average['tasks']))}) | | {100 * average['acc']:.2f} | "
                         f"{100 * average['acc_norm']:.2f} | |")
    return "\n".join(lines) + "\n"
