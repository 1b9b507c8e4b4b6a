"""BiSpikCLM: a causal LM whose every activation inside the blocks is a binary spike (METHOD §2).

    X0[t]  = input_gain * (tok_emb(x) + pos_emb(pos))     # the same current at every time step t
    A      = SN(X)                                        # binary
    X'     = X + SFSA(A)
    B      = SN(X')
    X_next = X' + SFFN(B),    SFFN(B) = SN(W2 · SN(W1 · B + b1) + b2)
    h      = mean_t X_L[t]
    logits = head(LayerNorm(h))            or, with spiking_head, mean_t head(SN(X_L[t]))

Tensors inside the blocks are laid out ``[T, B, N, D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import SFSA
from .configuration import BiSpikCLMConfig
from .neurons import LIFNeuron
from .spike_ops import SpikeLinear, spike_scale


@dataclass
class BiSpikCLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus spiking statistics.

    * ``hidden_states``: time-averaged residual stream, ``L + 1`` tensors ``[B, N, D]`` (embedding first).
    * ``attentions``: time-averaged binary attention maps mean_t P, ``L`` tensors ``[B, H, N, Nk]``.
    * ``spike_rates``: time-averaged block-input spikes mean_t SN(X_l), ``L`` tensors ``[B, N, D]``.
    * ``firing_rates``: ``{neuron path: rate}`` over this call, when ``output_firing_rates=True``.
    """

    spike_rates: tuple[torch.Tensor, ...] | None = None
    firing_rates: dict[str, float] | None = None


class SFFN(nn.Module):
    """Spiking feed-forward network: ``SN(W2 · SN(W1 · B + b1) + b2)``."""

    def __init__(self, config: BiSpikCLMConfig) -> None:
        super().__init__()
        self.fc1 = SpikeLinear(config.hidden_size, config.ffn_dim)
        self.fc2 = SpikeLinear(config.ffn_dim, config.hidden_size)
        self.hidden_neuron = LIFNeuron(**config.neuron_kwargs("ffn_hidden"))
        self.out_neuron = LIFNeuron(**config.neuron_kwargs("ffn_out"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_neuron(self.fc2(self.hidden_neuron(self.fc1(x))))


class BiSpikCLMBlock(GradientCheckpointingLayer):
    """Spike-driven residual block: ``X' = X + g1 * SFSA(SN(X))``, ``X_next = X' + g2 * SFFN(SN(X'))``.

    ``g1``, ``g2`` are learned per-channel weights of the residual spikes (``config.residual_scale`` at init)."""

    def __init__(self, config: BiSpikCLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_in_neuron = LIFNeuron(**config.neuron_kwargs("block_in"))
        self.self_attn = SFSA(config, layer_idx)
        self.ffn_in_neuron = LIFNeuron(**config.neuron_kwargs("ffn_in"))
        self.ffn = SFFN(config)
        # per-channel weights of the spikes each branch adds to the residual stream (a spike selects its weight:
        # an accumulate, not a multiply); small at init so the stream does not drift into saturation with depth
        self.attn_residual_scale = nn.Parameter(torch.full((config.hidden_size,), config.effective_residual_scale))
        self.ffn_residual_scale = nn.Parameter(torch.full((config.hidden_size,), config.effective_residual_scale))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, past_key_values=None,
                output_attentions: bool = False, output_spike_rates: bool = False):
        a = self.attn_in_neuron(x)
        y, attn = self.self_attn(a, key_mask, past_key_values, output_attentions)
        x = x + spike_scale(y, self.attn_residual_scale)
        x = x + spike_scale(self.ffn(self.ffn_in_neuron(x)), self.ffn_residual_scale)
        return x, attn, (a.mean(0) if output_spike_rates else None)


class BiSpikCLMPreTrainedModel(PreTrainedModel):
    config_class = BiSpikCLMConfig
    config: BiSpikCLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BiSpikCLMBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        cfg = self.config
        if isinstance(module, SpikeLinear):
            # currents driven by spikes at rate `input_rate` start with std ~ weight_gain
            std = cfg.weight_gain / math.sqrt(module.in_features * cfg.input_rate)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, BiSpikCLMBlock):
            init.constant_(module.attn_residual_scale, cfg.effective_residual_scale)
            init.constant_(module.ffn_residual_scale, cfg.effective_residual_scale)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class BiSpikCLMModel(BiSpikCLMPreTrainedModel):
    """Embedding, direct encoding over ``time_steps``, and the spiking blocks; returns ``X_L`` ``[T,B,N,D]``."""

    def __init__(self, config: BiSpikCLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.input_gain = config.effective_input_gain
        self.layers = nn.ModuleList(BiSpikCLMBlock(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """Input current ``[B, N, D]``: ``input_gain * (tok_emb + pos_emb)``."""
        if position_ids.numel() and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"sequence position {int(position_ids.max())} is beyond max_position_embeddings="
                             f"{self.config.max_position_embeddings}; use a shorter input or a model with more "
                             f"positions")
        return (self.embed_tokens(input_ids) + self.embed_positions(position_ids)) * self.input_gain

    def forward(self, input_ids, position_ids, key_mask=None, past_key_values=None, output_attentions=False,
                output_hidden_states=False, output_spike_rates=False):
        x0 = self.embed(input_ids, position_ids)
        x = x0.unsqueeze(0).expand(self.config.time_steps, *x0.shape)     # direct encoding, [T, B, N, D]
        hidden, maps, rates = [x0] if output_hidden_states else None, [], []
        for layer in self.layers:
            x, attn, rate = layer(x, key_mask, past_key_values=past_key_values,
                                  output_attentions=output_attentions, output_spike_rates=output_spike_rates)
            if output_hidden_states:
                hidden.append(x.mean(0))
            maps.append(attn)
            rates.append(rate)
        return (x, tuple(hidden) if output_hidden_states else None, tuple(maps) if output_attentions else None,
                tuple(rates) if output_spike_rates else None)


class BiSpikCLMForCausalLM(BiSpikCLMPreTrainedModel, GenerationMixin):
    """BiSpikCLM with its LM head; Hugging Face conventions (``generate``, ``save_pretrained``, Auto classes)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BiSpikCLMConfig) -> None:
        super().__init__(config)
        self.model = BiSpikCLMModel(config)
        self.final_layer_norm = None if config.spiking_head else nn.LayerNorm(config.hidden_size,
                                                                             eps=config.layer_norm_eps)
        self.head_neuron = LIFNeuron(**config.neuron_kwargs("head")) if config.spiking_head else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def head(self, x_last: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, N, V]`` from the last residual stream ``[T, B, N, D]``."""
        if self.config.spiking_head:
            return self.lm_head(self.head_neuron(x_last)).mean(0)
        return self.lm_head(self.final_layer_norm(x_last.mean(0)))

    def neurons(self) -> dict[str, LIFNeuron]:
        """Every LIF neuron of the model by module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LIFNeuron)}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_spike_rates: bool = False,
        output_firing_rates: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BiSpikCLMOutput:
        """``input_ids`` ``[B, N]``; ``attention_mask`` ``[B, past + N]`` (1 = token, 0 = padding, left padding);
        ``labels`` ``[B, N]`` (shifted inside; -100 is ignored)."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is None:   # transformers >= 5.24 passes the cache as `cache`
            past_key_values = kwargs.pop("cache", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        b, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, past + n):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + n)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        key_mask = None if bool(attention_mask.all()) else attention_mask.bool()

        neurons = self.neurons() if output_firing_rates else {}
        for neuron in neurons.values():
            neuron.reset_stats()
            neuron.record = True
        try:
            x_last, hidden, maps, rates = self.model(
                input_ids, position_ids, key_mask, past_key_values,
                output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
                output_spike_rates=output_spike_rates)
            logits = self.head(x_last)
        finally:
            for neuron in neurons.values():
                neuron.record = False
        firing = {name: m.spike_count / max(m.update_count, 1.0) for name, m in neurons.items()} or None

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return BiSpikCLMOutput(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None,
                               hidden_states=hidden, attentions=maps, spike_rates=rates, firing_rates=firing)
