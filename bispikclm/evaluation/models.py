"""Models under evaluation: the context-length check, and copies of a student with inference-time overrides of
its spiking settings (threshold, time steps, attention chunk size) that need no retraining. Models load through
:func:`bispikclm.checkpoints.load_pretrained`."""

from __future__ import annotations


import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..checkpoints import overridden_config
from ..configuration import max_positions
from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM


def check_context_length(model: PreTrainedModel | PretrainedConfig, context_length: int) -> None:
    """UserError when ``context_length`` is beyond the model's positions."""
    limit = max_positions(model)
    if limit is not None and context_length > limit:
        raise UserError(f"context length {context_length} is beyond the model's {limit} positions "
                        f"(max_position_embeddings)")


def with_spiking_overrides(model: BiSpikCLMForCausalLM, **overrides) -> BiSpikCLMForCausalLM:
    """A copy of a student with config fields changed (e.g. ``threshold=0.7, time_steps=4``), same weights.

    The model is rebuilt from the changed config, so every neuron takes its settings exactly as a freshly
    loaded checkpoint would (group overrides in ``neuron_overrides`` keep precedence over ``threshold``)."""
    if not isinstance(model, BiSpikCLMForCausalLM):
        raise UserError("threshold / time-step overrides need a BiSpikCLM student, not a "
                        f"{type(model).__name__}")
    config = overridden_config(model.config, overrides)
    with torch.device("meta"):
        rebuilt = BiSpikCLMForCausalLM(config)
    rebuilt.load_state_dict(model.state_dict(), assign=True)
    rebuilt.tie_weights()
    return rebuilt.eval()
