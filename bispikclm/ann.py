"""The ANN of a student's exact shape: the fair baseline for the price of spikes.

An ``OPTForCausalLM`` for OPT-style students (learned positions, ReLU MLP), a ``LlamaForCausalLM`` for Llama-style
students (gated FFN, grouped-query attention; rotary positions, as the Llama teachers have). Distilled from the same
teacher with the same losses, tokens, data order and seed (``bispikclm train`` with ``student_kind: ann``), its
perplexity over the spiking student's is the price of spikes at equal everything; the energy report uses the same
model (random weights: operation counts depend only on the shape).
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PretrainedConfig, PreTrainedModel

from .configuration import BiSpikCLMConfig


def ann_config(config: BiSpikCLMConfig) -> PretrainedConfig:
    """The Hugging Face config of the ANN with ``config``'s shape, special tokens and weight tying."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                  max_position_embeddings=config.max_position_embeddings,
                  tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    if config.ffn_type == "gated":
        return LlamaConfig(**common, intermediate_size=config.ffn_dim, num_key_value_heads=config.key_value_heads,
                           head_dim=config.attention_head_dim, initializer_range=config.initializer_range)
    if config.key_value_heads != config.num_attention_heads or config.head_dim is not None:
        raise ValueError("an OPT-style ANN has no grouped-query attention or custom head width")
    return OPTConfig(**common, ffn_dim=config.ffn_dim, word_embed_proj_dim=config.hidden_size, dropout=0.0,
                     init_std=config.initializer_range)


def same_shape_ann(config: BiSpikCLMConfig, attn_implementation: str | None = None) -> PreTrainedModel:
    """A randomly initialized ANN with ``config``'s shape (see :func:`ann_config`). Distillation with attention
    maps needs ``attn_implementation="eager"``."""
    hf = ann_config(config)
    if attn_implementation is not None:
        hf._attn_implementation = attn_implementation
    return (LlamaForCausalLM if isinstance(hf, LlamaConfig) else OPTForCausalLM)(hf)
