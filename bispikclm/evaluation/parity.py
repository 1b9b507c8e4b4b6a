"""Zero-shot parity: our evaluator (:mod:`bispikclm.evaluation.zeroshot`) against lm-evaluation-harness's own
``hf`` backend (``lm_eval.models.huggingface.HFLM``, loading the model through the Auto classes, not our
adapter) on the same local tasks.

Both score every ``(prompt, choice)`` request by log-likelihood; the table compares ``acc`` / ``acc_norm`` per task
and, request by request, the log-likelihoods themselves, so a difference on the model side (the context /
continuation token boundary, BOS, truncation) shows even where it does not flip an answer.

The harness loads a folder: a GGUF model (or a short name that resolves to one) is saved with ``save_pretrained``
into a cache folder first, once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..checkpoints import load_pretrained, resolve
from .tasks import TASKS_DIR, Task, default_data_dir, read_task, resolve_tasks
from .zeroshot import loglikelihoods, score_lls

HARNESS_PREFIX = "bispikclm_"


def cache_root() -> Path:
    """``$BISPIKCLM_CACHE`` or ``~/.cache/bispikclm``."""
    return Path(os.environ.get("BISPIKCLM_CACHE") or Path.home() / ".cache" / "bispikclm")


def harness_folder(spec: str, cache_dir: str | Path | None = None, loaded: tuple | None = None) -> str:
    """A folder (or Hub name) ``from_pretrained`` loads ``spec`` from: itself, or for a GGUF file its dequantized
    ``save_pretrained`` copy (float32, with the tokenizer) in ``cache_dir/gguf/<name>-<hash>``, written once
    (from ``loaded``, the ``(model, tokenizer)`` of ``spec``, when given)."""
    source = resolve(spec)
    if not source.gguf_file:
        return source.path
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = Path(cache_dir or cache_root()) / "gguf" / f"{gguf.stem}-{key}"
    if not (folder / "config.json").is_file():
        model, tokenizer = loaded or load_pretrained(spec)
        # the weights are dequantized float32 tensors already; the GGUF "quantizer" only marks where they came from
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(str(partial))
        tokenizer.save_pretrained(str(partial))
        partial.rename(folder)
    return str(folder)


def _requests(items: list[dict]) -> list[tuple[str, str]]:
    return [(item["prompt"], choice) for item in items for choice in item["choices"]]


def harness_loglikelihoods(folder: str, tasks: list[Task], data_dir: str | Path, limit: int | None,
                           batch_size: int, device: str) -> dict[str, list[float]]:
    """Per task, the harness's log-likelihood of every request (items in file order, choices in order)."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm = HFLM(pretrained=folder, backend="causal", dtype="float32", batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(data_dir)})
    out = evaluator.simple_evaluate(model=lm, tasks=[HARNESS_PREFIX + t.name for t in tasks], limit=limit,
                                    task_manager=manager, log_samples=True, bootstrap_iters=0)
    lls = {}
    for task in tasks:
        samples = sorted(out["samples"][HARNESS_PREFIX + task.name], key=lambda s: s["doc_id"])
        lls[task.name] = [float(resp[0]) for s in samples for resp in s["filtered_resps"]]
    return lls


def parity(spec: str, tasks: list[str] | str, data_dir: str | Path | None = None, limit: int | None = None,
           batch_size: int = 16, device: str = "cpu", cache_dir: str | Path | None = None,
           progress: bool = True) -> dict:
    """Scores of ``spec`` on the multiple-choice ``tasks`` by our evaluator and by the harness.

    Returns ``{"tasks": {name: {"n", "ours": {acc, acc_norm}, "harness": {...}, "difference": {...} (points),
    "max_abs_loglikelihood_difference", "requests"}}, "max_abs_difference_points"}``."""
    data_dir = Path(data_dir or default_data_dir())
    resolved = [t for t in resolve_tasks(tasks) if t.kind == "multiple_choice"]
    items = {t.name: read_task(t, data_dir, limit) for t in resolved}   # every file checked first
    model, tokenizer = load_pretrained(spec)
    folder = harness_folder(spec, cache_dir, (model, tokenizer))
    model = model.to(device)
    ours = {name: [ll for ll, _ in loglikelihoods(model, tokenizer, _requests(task_items), batch_size, progress)]
            for name, task_items in items.items()}
    del model
    theirs = harness_loglikelihoods(folder, resolved, data_dir, limit, batch_size, device)
    table = {}
    for name, task_items in items.items():
        if len(theirs[name]) != len(ours[name]):
            raise RuntimeError(f"{name}: the harness scored {len(theirs[name])} requests, we scored "
                               f"{len(ours[name])}")
        mine, harness = score_lls(task_items, ours[name]), score_lls(task_items, theirs[name])
        table[name] = {
            "n": len(task_items), "requests": len(ours[name]),
            "ours": {m: mine[m] for m in ("acc", "acc_norm")},
            "harness": {m: harness[m] for m in ("acc", "acc_norm")},
            "difference": {m: 100 * (mine[m] - harness[m]) for m in ("acc", "acc_norm")},
            "max_abs_loglikelihood_difference": float(
                (torch.tensor(ours[name]) - torch.tensor(theirs[name])).abs().max()),
        }
    worst = max((abs(d) for row in table.values() for d in row["difference"].values()), default=0.0)
    return {"harness_model": folder, "limit": limit, "tasks": table, "max_abs_difference_points": worst}


def parity_markdown(result: dict) -> str:
    """The parity table, accuracies in percent, differences in points."""
    lines = ["| task | n | acc ours | acc harness | Δ acc | acc_norm ours | acc_norm harness | Δ acc_norm | "
             "max abs Δ log-likelihood |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["tasks"].items():
        ours, harness, diff = row["ours"], row["harness"], row["difference"]
        lines.append(f"| {name} | {row['n']} | {100 * ours['acc']:.2f} | {100 * harness['acc']:.2f} | "
                     f"{diff['acc']:+.2f} | {100 * ours['acc_norm']:.2f} | {100 * harness['acc_norm']:.2f} | "
                     f"{diff['acc_norm']:+.2f} | {row['max_abs_loglikelihood_difference']:.2e} |")
    return "\n".join(lines) + "\n"
