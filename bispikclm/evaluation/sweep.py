"""Inference sweeps without retraining: perplexity and firing rate over thresholds x time steps x contexts.

The table form follows the paper: one table per number of time steps T, one row per threshold, one column per
context length, each cell ``perplexity (firing rate)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..modeling import BiSpikCLMForCausalLM
from .models import check_context_length, with_spiking_overrides
from .perplexity import perplexity


def sweep(model: BiSpikCLMForCausalLM, input_ids: torch.Tensor, thresholds: list[float], time_steps: list[int],
          context_lengths: list[int], stride: int | None = None, batch_size: int = 1, max_tokens: int | None = None,
          attn_chunk_size: int | None = None, progress: bool = True) -> list[dict]:
    """One record ``{threshold, time_steps, context_length, perplexity, firing_rate, tokens, ...}`` per cell.

    ``input_ids`` ``[L]`` is the evaluation token stream; the student's weights are shared by every cell and
    only ``threshold`` (every neuron group without its own override, i.e. all but the attention neuron by
    default) and ``time_steps`` change."""
    for length in context_lengths:
        check_context_length(model, length)
    records = []
    for steps in time_steps:
        for threshold in thresholds:
            variant = with_spiking_overrides(model, threshold=threshold, time_steps=steps,
                                             attn_chunk_size=attn_chunk_size or model.config.attn_chunk_size)
            for length in context_lengths:
                result = perplexity(variant, input_ids, length, stride=stride, batch_size=batch_size,
                                    max_tokens=max_tokens, progress=progress)
                records.append({"threshold": threshold, "time_steps": steps, **result.to_dict()})
    return records


def sweep_markdown(records: list[dict]) -> str:
    """The paper's table form: per T, rows = thresholds, columns = context lengths, ``ppl (rate)``."""
    lengths = sorted({r["context_length"] for r in records})
    blocks = []
    for steps in sorted({r["time_steps"] for r in records}):
        cells = {(r["threshold"], r["context_length"]): r for r in records if r["time_steps"] == steps}
        lines = [f"T = {steps}", "", "| threshold | " + " | ".join(str(n) for n in lengths) + " |",
                 "|---|" + "---|" * len(lengths)]
        for threshold in sorted({t for t, _ in cells}):
            row = [f"{cells[threshold, n]['perplexity']:.2f} ({cells[threshold, n]['firing_rate']:.3f})"
                   if (threshold, n) in cells else "–" for n in lengths]
            lines.append(f"| {threshold:g} | " + " | ".join(row) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def sweep_plot(records: list[dict], path: str | Path) -> None:
    """Perplexity against context length, one line per threshold, one panel per T; firing rates in the legend.
    With a single context length: perplexity and firing rate against the threshold, one line per T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len({r["context_length"] for r in records}) == 1:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for steps in sorted({r["time_steps"] for r in records}):
            rows = sorted((r for r in records if r["time_steps"] == steps), key=lambda r: r["threshold"])
            thresholds = [r["threshold"] for r in rows]
            left.plot(thresholds, [r["perplexity"] for r in rows], marker="o", label=f"T = {steps}")
            right.plot(thresholds, [r["firing_rate"] for r in rows], marker="o", label=f"T = {steps}")
        left.set_ylabel(f"WikiText-2 perplexity (context {records[0]['context_length']})")
        right.set_ylabel("firing rate (all neurons)")
        for ax in (left, right):
            ax.set_xlabel("threshold")
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    steps_list = sorted({r["time_steps"] for r in records})
    fig, axes = plt.subplots(1, len(steps_list), figsize=(5 * len(steps_list), 4), squeeze=False)
    for ax, steps in zip(axes[0], steps_list):
        for threshold in sorted({r["threshold"] for r in records}):
            rows = sorted((r for r in records if r["time_steps"] == steps and r["threshold"] == threshold),
                          key=lambda r: r["context_length"])
            rate = sum(r["firing_rate"] for r in rows) / len(rows)
            ax.plot([r["context_length"] for r in rows], [r["perplexity"] for r in rows], marker="o",
                    label=f"threshold {threshold:g} (rate {rate:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title(f"T = {steps}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
