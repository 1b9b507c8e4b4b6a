"""Evaluation: WikiText-2 perplexity at any context length, threshold x time-step sweeps, zero-shot tasks,
and lm-evaluation-harness integration (:mod:`.lm_eval_adapter`, imported on demand)."""

from .models import with_spiking_overrides
from .perplexity import CONTEXT_LENGTHS, PerplexityResult, encode_corpus, perplexity, wikitext2_text
from .sweep import sweep, sweep_markdown, sweep_plot
from .tasks import GROUPS, PAPER_TASKS, TASKS, read_task, resolve_tasks
from .zeroshot import evaluate_tasks, loglikelihoods, zeroshot_markdown

__all__ = ["CONTEXT_LENGTHS", "GROUPS", "PAPER_TASKS", "PerplexityResult", "TASKS", "encode_corpus", "evaluate_tasks",
           "loglikelihoods", "perplexity", "read_task", "resolve_tasks", "sweep", "sweep_markdown",
           "sweep_plot", "wikitext2_text", "with_spiking_overrides", "zeroshot_markdown"]
