"""BiSpikCLM: a causal LM whose every activation inside the blocks is a binary spike (METHOD §2).

    X0[t]  = input_gain * (tok_emb(x) + pos_emb(pos))     # the same current at every time step t
    A      = SN(X)                                        # binary
    X'     = X + SFSA(A)
    B      = SN(X')
    X_next = X' + SFFN(B),    SFFN(B) = SN(W2 · SN(W1 · B + b1) + b2)       (OPT-style)
                           or SN(Wd · SN(SN(Wg · B + bg) ⊙ (Wu · B + bu)) + bd)   (gated, Llama-style)
    h      = mean_t X_L[t]
    logits = head(LayerNorm(h))            or, with spiking_head, mean_t head(SN(X_L[t]))

Tensors inside the blocks are laid out ``[T, B, N, D]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .attention import SFSA
from .configuration import BiSpikCLMConfig
from .neurons import FiringRateRecorder, LIFNeuron
from .spike_ops import SpikeLinear, net_spikes, spike_scale

#: Neuron module paths inside a block (and the head's) -> neuron group (``BiSpikCLMConfig.neuron_overrides``).
NEURON_GROUP_OF = {"attn_in_neuron": "block_in", "self_attn.q_neuron": "q", "self_attn.k_neuron": "k",
                   "self_attn.v_neuron": "v", "self_attn.attn_neuron": "attn", "self_attn.out_neuron": "attn_out",
                   "ffn_in_neuron": "ffn_in", "ffn.gate_neuron": "ffn_gate", "ffn.hidden_neuron": "ffn_hidden",
                   "ffn.out_neuron": "ffn_out", "head_neuron": "head"}


def neuron_group(path: str) -> tuple[int | None, str]:
    """``(block index or None, neuron group)`` of a neuron's module path in a :class:`BiSpikCLMForCausalLM`,
    e.g. ``"model.layers.3.self_attn.q_neuron"`` -> ``(3, "q")``, ``"head_neuron"`` -> ``(None, "head")``."""
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return int(parts[i + 1]), NEURON_GROUP_OF[".".join(parts[i + 2:])]
    return None, NEURON_GROUP_OF[path]


@dataclass
class BiSpikCLMModelOutput(ModelOutput):
    """What the stack of spiking blocks returns.

    * ``last_hidden_state``: the last residual stream over time, ``X_L`` ``[T, B, N, D]``.
    * ``hidden_states``: time-averaged residual stream, ``L + 1`` tensors ``[B, N, D]`` (embedding first).
    * ``attentions``: time-averaged binary attention maps mean_t P, ``L`` tensors ``[B, H, N, Nk]``.
    * ``spike_rates``: time-averaged block-input spikes mean_t SN(X_l), ``L`` tensors ``[B, N, D]``.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    spike_rates: tuple[torch.Tensor, ...] | None = None


# Name of the K/V cache in model inputs and outputs: ``cache`` from transformers 5.24 on (which warns on the old
# name), ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


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
    """Spiking feed-forward network (OPT-style): ``SN(W2 · SN(W1 · B + b1) + b2)``."""

    def __init__(self, config: BiSpikCLMConfig) -> None:
        super().__init__()
        self.fc1 = SpikeLinear(config.hidden_size, config.ffn_dim, signed=config.signed("ffn_in"))
        self.fc2 = SpikeLinear(config.ffn_dim, config.hidden_size)
        self.hidden_neuron = LIFNeuron(**config.neuron_kwargs("ffn_hidden", config.ffn_dim))
        self.out_neuron = LIFNeuron(**config.neuron_kwargs("ffn_out", config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_neuron(self.fc2(self.hidden_neuron(self.fc1(x))))


class GatedSFFN(nn.Module):
    """Gated spiking feed-forward network, the analogue of Llama's ``down(silu(gate(x)) * up(x))``::

        G = SN_gate(Wg · B + bg)                                   # binary gate
        H = SN_hidden(G ⊙ (Wu · B + bu))     (ffn_gate="select")    # a gate spike lets the up current in
        H = G AND SN_hidden(Wu · B + bu)     (ffn_gate="and")       # both must fire
        Y = SN_out(Wd · H + bd)

    Every product stays spike-driven: ``Wg · B`` and ``Wu · B`` are fed by the block's spikes, ``G ⊙ I`` selects
    currents by a binary gate (no multiplication), ``G AND U`` is a bit operation, and ``Wd`` receives binary ``H``.
    ``docs/model.md`` has the measurement that chose the default form."""

    def __init__(self, config: BiSpikCLMConfig) -> None:
        super().__init__()
        self.gate_mode = config.ffn_gate
        self.gate_proj = SpikeLinear(config.hidden_size, config.ffn_dim, signed=config.signed("ffn_in"))
        self.up_proj = SpikeLinear(config.hidden_size, config.ffn_dim, signed=config.signed("ffn_in"))
        self.down_proj = SpikeLinear(config.ffn_dim, config.hidden_size)
        self.down_proj.gated_input = True       # its inputs fire at about input_rate² (see _init_weights)
        self.gate_neuron = LIFNeuron(**config.neuron_kwargs("ffn_gate", config.ffn_dim))
        self.hidden_neuron = LIFNeuron(**config.neuron_kwargs("ffn_hidden", config.ffn_dim))
        self.out_neuron = LIFNeuron(**config.neuron_kwargs("ffn_out", config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_neuron(self.gate_proj(x))
        if self.gate_mode == "select":
            hidden = self.hidden_neuron(gate * self.up_proj(x))
        else:
            hidden = gate * self.hidden_neuron(self.up_proj(x))
        return self.out_neuron(self.down_proj(hidden))


class BiSpikCLMBlock(GradientCheckpointingLayer):
    """Spike-driven residual block: ``X' = X + g1 * SFSA(SN(X))``, ``X_next = X' + g2 * SFFN(SN(X'))``.

    ``g1``, ``g2`` are learned per-channel weights of the residual spikes (``config.residual_scale`` at init)."""

    def __init__(self, config: BiSpikCLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_in_neuron = LIFNeuron(**config.neuron_kwargs("block_in", config.hidden_size))
        self.self_attn = SFSA(config, layer_idx)
        self.ffn_in_neuron = LIFNeuron(**config.neuron_kwargs("ffn_in", config.hidden_size))
        self.ffn = GatedSFFN(config) if config.ffn_type == "gated" else SFFN(config)
        # per-channel weights of the spikes each branch adds to the residual stream (a spike selects its weight:
        # an accumulate, not a multiply); small at init so the stream does not drift into saturation with depth
        self.attn_residual_scale = nn.Parameter(torch.full((config.hidden_size,), config.effective_residual_scale))
        self.ffn_residual_scale = nn.Parameter(torch.full((config.hidden_size,), config.effective_residual_scale))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, cache=None,
                output_attentions: bool = False, output_spike_rates: bool = False):
        a = self.attn_in_neuron(x)
        y, attn = self.self_attn(a, key_mask, cache, output_attentions)
        x = x + spike_scale(y, self.attn_residual_scale, self.self_attn.out_neuron.signed)
        x = x + spike_scale(self.ffn(self.ffn_in_neuron(x)), self.ffn_residual_scale, self.ffn.out_neuron.signed)
        if output_spike_rates and self.attn_in_neuron.signed:     # a signed pair's net rate, mean_t (S⁺ - S⁻)
            a = net_spikes(a)
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
            # currents driven by spikes at rate `input_rate` start with std ~ weight_gain; the down projection of a
            # gated SFFN is driven by spikes that need two neurons to fire, at about the square of that rate
            rate = cfg.input_rate ** 2 if getattr(module, "gated_input", False) else cfg.input_rate
            std = cfg.weight_gain / math.sqrt(module.in_features * rate)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, LIFNeuron):
            if module.threshold_param is not None:
                init.constant_(module.threshold_param, module.threshold)
            if module.beta_param is not None:
                init.constant_(module.beta_param, module.beta)
            if module.per_channel:
                init.constant_(module.channel_threshold, module.threshold)
                init.constant_(module.channel_initial, module.initial_membrane * module.threshold)
        elif isinstance(module, BiSpikCLMBlock):
            init.constant_(module.attn_residual_scale, cfg.effective_residual_scale)
            init.constant_(module.ffn_residual_scale, cfg.effective_residual_scale)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class BiSpikCLMModel(BiSpikCLMPreTrainedModel):
    """Embedding, direct encoding over ``time_steps``, and the spiking blocks (:class:`BiSpikCLMModelOutput`)."""

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

    def forward(self, input_ids: torch.LongTensor, position_ids: torch.LongTensor,
                key_mask: torch.Tensor | None = None, cache=None, output_attentions: bool = False,
                output_hidden_states: bool = False, output_spike_rates: bool = False) -> BiSpikCLMModelOutput:
        """``input_ids``, ``position_ids`` ``[B, N]``; ``key_mask`` ``[B, past + N]`` (``None``: no padding);
        ``cache``: binary K/V spikes of earlier positions (updated in place)."""
        x0 = self.embed(input_ids, position_ids)
        x = x0.unsqueeze(0).expand(self.config.time_steps, *x0.shape)     # direct encoding, [T, B, N, D]
        hidden, maps, rates = [x0], [], []
        for layer in self.layers:
            x, attn, rate = layer(x, key_mask, cache=cache, output_attentions=output_attentions,
                                  output_spike_rates=output_spike_rates)
            if output_hidden_states:
                hidden.append(x.mean(0))
            maps.append(attn)
            rates.append(rate)
        return BiSpikCLMModelOutput(last_hidden_state=x,
                                    hidden_states=tuple(hidden) if output_hidden_states else None,
                                    attentions=tuple(maps) if output_attentions else None,
                                    spike_rates=tuple(rates) if output_spike_rates else None)

    def resize_position_embeddings(self, num_positions: int) -> None:
        """Give the learned position table ``num_positions`` rows. New rows repeat the trained table cyclically
        (row ``p`` starts as row ``p mod old``, the copy initialization used to extend learned positions in
        Longformer, Beltagy et al. 2020), so a longer context starts from trained rows; fine-tune on long
        sequences afterwards. Fewer rows truncate the table."""
        old = self.embed_positions
        if num_positions < 1:
            raise ValueError(f"num_positions must be >= 1, got {num_positions}")
        new = nn.Embedding(num_positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            rows = torch.arange(num_positions, device=old.weight.device) % old.num_embeddings
            new.weight.copy_(old.weight[rows])
        self.embed_positions = new
        self.config.max_position_embeddings = num_positions


class BiSpikCLMForCausalLM(BiSpikCLMPreTrainedModel, GenerationMixin):
    """BiSpikCLM with its LM head; Hugging Face conventions (``generate``, ``save_pretrained``, Auto classes)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BiSpikCLMConfig) -> None:
        super().__init__(config)
        self.model = BiSpikCLMModel(config)
        self.final_layer_norm = None if config.spiking_head else nn.LayerNorm(config.hidden_size,
                                                                             eps=config.layer_norm_eps)
        self.head_neuron = (LIFNeuron(**config.neuron_kwargs("head", config.hidden_size)) if config.spiking_head
                            else None)
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
        """Every LIF neuron of the model by module path (:func:`neuron_group` maps a path to its group)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LIFNeuron)}

    def resize_position_embeddings(self, num_positions: int) -> None:
        """See :meth:`BiSpikCLMModel.resize_position_embeddings`."""
        self.model.resize_position_embeddings(num_positions)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_spike_rates: bool = False,
        output_firing_rates: bool = False,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BiSpikCLMOutput:
        """``input_ids`` ``[B, N]``; ``attention_mask`` ``[B, past + N]`` (1 = token, 0 = padding, left padding);
        ``labels`` ``[B, N]`` (shifted inside; -100 is ignored). ``cache``: the K/V spikes of earlier positions
        (``past_key_values``, its name before transformers 5.24, is taken too), returned updated in the output's
        :data:`CACHE_FIELD`."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass the K/V cache as `cache` or as `past_key_values`, not both")
            cache = past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        b, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, past + n):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + n)}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
        key_mask = None if bool(attention_mask.all()) else attention_mask.bool()

        with FiringRateRecorder(self.neurons() if output_firing_rates else {}) as recorder:
            out = self.model(input_ids, position_ids, key_mask, cache,
                             output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states),
                             output_spike_rates=output_spike_rates)
            logits = self.head(out.last_hidden_state)
        firing = recorder.rates() if output_firing_rates else None

        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return BiSpikCLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                               spike_rates=out.spike_rates, firing_rates=firing, **{CACHE_FIELD: cache})


AutoModelForCausalLM.register(BiSpikCLMConfig, BiSpikCLMForCausalLM, exist_ok=True)
