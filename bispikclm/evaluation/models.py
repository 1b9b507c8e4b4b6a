"""Loading checkpoints for evaluation: BiSpikCLM students and any Hugging Face causal LM, with inference-time
overrides of the spiking settings (threshold, time steps, attention chunk size) that need no retraining."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM

# Fields of BiSpikCLMConfig that can change at inference without retraining.
SPIKING_OVERRIDES = ("threshold", "time_steps", "attn_threshold", "attn_chunk_size")


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a ``save_pretrained`` folder (or a hub name where there is network).

    ``overrides`` (see :data:`SPIKING_OVERRIDES`; ``None`` values are ignored) apply to BiSpikCLM students;
    ``attn_chunk_size`` is ignored for other models, the rest are an error."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path!r} is not a model checkpoint ({reason})") from None
    if config.model_type != BiSpikCLMForCausalLM.config_class.model_type:
        overrides.pop("attn_chunk_size", None)
        if overrides:
            raise UserError(f"{sorted(overrides)} only apply to BiSpikCLM students; {path!r} is a "
                            f"{config.model_type}")
    unknown = set(overrides) - set(SPIKING_OVERRIDES)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)} at inference (known: {SPIKING_OVERRIDES})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path!r} has no usable tokenizer ({str(err).strip().splitlines()[0]})") from None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **overrides).to(device).eval()
    return model, tokenizer


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest input the model can take (learned positions), or ``None`` when the config does not say."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def check_context_length(model: PreTrainedModel, context_length: int) -> None:
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
    unknown = set(overrides) - set(SPIKING_OVERRIDES)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)} at inference (known: {SPIKING_OVERRIDES})")
    config = copy.deepcopy(model.config)
    for name, value in overrides.items():
        setattr(config, name, value)
    try:
        config._validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    with torch.device("meta"):
        rebuilt = BiSpikCLMForCausalLM(config)
    rebuilt.load_state_dict(model.state_dict(), assign=True)
    rebuilt.tie_weights()
    return rebuilt.eval()
