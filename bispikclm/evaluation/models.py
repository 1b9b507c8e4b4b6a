"""Loading checkpoints for evaluation: BiSpikCLM students and any Hugging Face causal LM, with inference-time
overrides of the spiking settings (threshold, time steps, attention chunk size) that need no retraining."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from ..errors import UserError
from ..modeling import BiSpikCLMForCausalLM
from ..validation import check_finite_weights, check_vocabulary, load_pretrained

# Fields of BiSpikCLMConfig that can change at inference without retraining.
SPIKING_OVERRIDES = ("threshold", "time_steps", "attn_threshold", "attn_chunk_size")


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a ``save_pretrained`` folder (or a hub name where there is network).

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path!r} has no usable tokenizer ({str(err).strip().splitlines()[0]})") from None
    if not tokenizer.encode("The text", add_special_tokens=False):   # transformers builds an empty one
        raise UserError(f"{path!r} has no usable tokenizer (it encodes text to nothing); save the tokenizer "
                        f"beside the model")
    model = load_pretrained(AutoModelForCausalLM.from_pretrained, path, weights=True, dtype=dtype, **overrides)
    model = model.to(device).eval()
    check_finite_weights(model, path)
    check_vocabulary(model, tokenizer, path)
    return model, tokenizer


def load_config(path: str) -> PretrainedConfig:
    """The config of a checkpoint folder (or hub name); UserError when ``path`` is not a model."""
    if Path(path).is_file():
        raise UserError(f"{path!r} is not a model checkpoint (a file; expected a save_pretrained folder)")
    if not Path(path).exists() and (Path(path).is_absolute() or path.startswith(".")):
        raise UserError(f"{path!r} is not a model checkpoint (no such folder)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path!r} is not a model checkpoint ({reason})") from None


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
