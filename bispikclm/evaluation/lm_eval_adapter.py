"""lm-evaluation-harness integration: the model ``bispikclm`` and the task YAMLs in ``evaluation/tasks``.

Importing this module registers the model. It is lm-eval's ``HFLM`` loading through the Auto classes, which
know the ``bispikclm`` model type once :mod:`bispikclm` is imported, so it runs students and any Hugging Face
causal LM alike. Model arguments that are fields of the student's config override it at load time
(``threshold=0.7,time_steps=4,attn_chunk_size=256``), so sweeps need no retraining.

Tasks (``--tasks``): ``bispikclm_<name>`` for each task of :data:`bispikclm.evaluation.tasks.TASKS`, and the
tags ``bispikclm_paper`` (the paper's eight) and ``bispikclm_extra``.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..checkpoints import load_config
from .parity import harness_folder
from .tasks import TASKS_DIR


@register_model("bispikclm")
class BiSpikCLMHarnessLM(HFLM):
    """``lm_eval --model bispikclm --model_args pretrained=PATH[,threshold=..,time_steps=..]``; ``PATH`` may also
    be a ``.gguf`` file or a short name such as ``smollm2-135m`` (:func:`bispikclm.checkpoints.resolve`)."""

    def __init__(self, pretrained: str, **kwargs) -> None:
        load_config(pretrained)
        pretrained = harness_folder(pretrained)   # a GGUF model (or short name) becomes its saved folder
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, backend="causal", **kwargs)
