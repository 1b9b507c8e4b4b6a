"""Loading checkpoints for evaluation: BiSpikCLM students and any Hugging Face causal LM, with inference-time
overrides of the spiking settings (threshold, time steps, attention chunk size) that need no retraining."""

from __future__ import annotations

import copy

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoints import check_tokenizer_fits, load_causal_lm, load_config, load_tokenizer
from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM

# Fields of BiSpikCLMConfig that can change at inference without retraining.
SPIKING_OVERRIDES = ("threshold", "time_steps", "attn_threshold", "attn_chunk_size")


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a ``save_pretrained`` folder, a GGUF file, a short name such as ``smollm2-135m``
    or a Hub name where there is network (:func:`bispikclm.checkpoints.resolve`).

    ``overrides`` (see :data:`SPIKING_OVERRIDES`; ``None`` values are ignored) apply to BiSpikCLM students;
    ``attn_chunk_size`` is ignored for other models, the rest are an error."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = load_config(path)
    if config.model_type != BiSpikCLMForCausalLM.config_class.model_type:
        overrides.pop("attn_chunk_size", None)
        if overrides:
            raise UserError(f"{sorted(overrides)} only apply to BiSpikCLM students; {path!r} is a "
                            f"{config.model_type}")
    unknown = set(overrides) - set(SPIKING_OVERRIDES)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)} at inference (known: {SPIKING_OVERRIDES})")
    if overrides:   # from_pretrained sets them without checking: check a copy first
        checked = copy.deepcopy(config)
        for name, value in overrides.items():
            setattr(checked, name, value)
        checked._validate()
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dtype=dtype, **overrides).to(device)   # damaged checkpoints: one-line errors
    check_tokenizer_fits(model, tokenizer, path)
    return model, tokenizer


def max_positions(model: PreTrainedModel | PretrainedConfig) -> int | None:
    """The longest input a model (or config) can take (learned positions), or ``None`` when it does not say."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


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
