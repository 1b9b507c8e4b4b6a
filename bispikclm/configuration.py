"""BiSpikCLMConfig: OPT's field names plus the spiking options (METHOD §1–3)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from .errors import InvalidConfig, UserError
from .neurons import FIRE_MODES, LEARNABLE, SURROGATES
from .validation import check_types

# Neuron groups; each can override beta / threshold / surrogate / alpha / detach_reset via `neuron_overrides`.
# `ffn_gate` exists only in gated FFNs (ffn_type="gated").
NEURON_GROUPS = ("block_in", "q", "k", "v", "attn", "attn_out", "ffn_in", "ffn_gate", "ffn_hidden", "ffn_out", "head")
NEURON_FIELDS = ("beta", "threshold", "surrogate", "alpha", "detach_reset", "learn_threshold", "learn_beta",
                 "initial_membrane", "fire", "per_channel", "relative_surrogate", "signed")
#: Groups that may be signed neuron pairs (``neuron_overrides: {group: {signed: true}}``, fire "count"): the
#: quantizers of the residual stream, of the updates added to it, and of Q, K and V (then Q·Kᵀ and P·V are sums of
#: ternary products, ±1 per pair of spikes). The attention map and the FFN's hidden layer stay unsigned.
SIGNED_GROUPS = ("block_in", "q", "k", "v", "attn_out", "ffn_in", "ffn_out")
FFN_TYPES = ("mlp", "gated")
FFN_GATES = ("select", "and")
# Teacher families whose MLP is gated (SwiGLU/GeGLU: down(act(gate(x)) * up(x))): their students get a gated SFFN.
GATED_FFN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                         "phi3", "granite", "smollm3", "cohere", "helium", "glm")

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512,
                 max_position_embeddings=512),
    "opt-125m": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     max_position_embeddings=2048),
    "opt-350m": dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     max_position_embeddings=2048),
    "opt-1.3b": dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     max_position_embeddings=2048),
    # SmolLM2-135M's shape (Llama family): grouped-query SFSA with 3 K/V heads, gated SFFN
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, ffn_dim=1536, ffn_type="gated", max_position_embeddings=2048),
}


class BiSpikCLMConfig(PretrainedConfig):
    """Configuration of a BiSpikCLM student.

    Shape fields follow OPT (``vocab_size, hidden_size, num_hidden_layers, num_attention_heads, ffn_dim,
    max_position_embeddings``), plus the Llama family's:

    * ``num_key_value_heads``: grouped-query SFSA, each group of ``num_attention_heads / num_key_value_heads``
      query heads shares one head of binary K and V spikes (``None``: as many as query heads).
    * ``head_dim``: width of a head (``None``: ``hidden_size / num_attention_heads``).
    * ``ffn_type``: ``"mlp"`` (OPT: ``SN(W2 · SN(W1 · B))``) or ``"gated"`` (the SwiGLU analogue, see
      :class:`bispikclm.modeling.GatedSFFN`), with ``ffn_gate`` ``"select"`` (a gate spike passes the up current
      into the hidden neuron) or ``"and"`` (hidden spike = gate spike AND up spike).

    Spiking fields:

    * ``time_steps``: T, the number of time steps each token is run for (direct encoding).
    * ``threshold``, ``beta``, ``surrogate``, ``surrogate_alpha``, ``detach_reset``: LIF defaults for every group
      (``beta = 1``: integrate-and-fire, no leak).
    * ``initial_membrane``: the membrane before the first step as a fraction of the threshold (0, the paper's;
      0.5 with ``beta = 1`` rounds instead of floors, as in QCFS); ``fire``: ``"step"`` (the paper's) or
      ``"count"`` (integrate the token's T steps, then fire; :mod:`bispikclm.neurons`).
    * ``per_channel_neurons``: one threshold and initial membrane per channel, in buffers that calibration
      (:mod:`bispikclm.distill.calibrate`) sets from the teacher; ``relative_surrogate``: the surrogate's width
      follows each threshold (``alpha / threshold``).
    * ``learn_threshold`` (``"none"``, ``"group"``: one per neuron module, ``"channel"``: one per channel; the
      attention map's neuron has no channels and learns one per module) and ``learn_beta`` (``"none"``,
      ``"group"``): thresholds and leaks trained with the weights, starting from ``threshold`` and ``beta``.
    * ``attn_scale``, ``attn_threshold``: the attention neuron sees ``attn_scale * (Q K^T)`` and fires at
      ``attn_threshold``. ``attn_scale=None`` means ``1 / head_dim`` (METHOD §8: ``1/sqrt(d)`` saturates).
    * ``neuron_overrides``: ``{group: {field: value}}`` for groups in :data:`NEURON_GROUPS`; ``signed: true`` makes a
      group of :data:`SIGNED_GROUPS` a signed neuron pair (:class:`~bispikclm.neurons.LIFNeuron`).
    * ``input_gain``: gain of the embedding current (``None``: ``1 / initializer_range``), decoupled from the
      scale of the tied head (METHOD §8).
    * ``residual_scale``: initial per-channel weight of the spikes each branch adds to the residual stream
      (``None``: ``min(1, 2 / num_hidden_layers)``); spikes are non-negative, so unweighted sums drift upwards
      with depth and saturate the block-input neurons of deep models.
    * ``weight_gain``: linear weights start with std ``weight_gain / sqrt(fan_in * input_rate)`` so that
      currents driven by spikes at rate ``input_rate`` have unit scale (``input_rate²`` for the down projection of
      a gated SFFN, whose inputs need two neurons to fire).
    * ``spiking_head``: logits = mean_t head(SN(X_L[t])) instead of head(LayerNorm(mean_t X_L[t])).
    * ``neuron_backend``: ``"lean"`` or ``"reference"`` (see :mod:`bispikclm.neurons`).
    * ``attn_chunk_size``: process queries in chunks of this size at inference (bounds attention memory).
    """

    model_type = "bispikclm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]   # the K/V cache's names from and before transformers 5.24

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    ffn_type: str = "mlp"
    ffn_gate: str = "select"
    time_steps: int = 2
    threshold: float = 1.0
    beta: float = 0.5
    surrogate: str = "arctan"
    surrogate_alpha: float | None = None
    detach_reset: bool = False
    initial_membrane: float = 0.0
    fire: str = "step"
    per_channel_neurons: bool = False
    relative_surrogate: bool = False
    learn_threshold: str = "none"
    learn_beta: str = "none"
    attn_scale: float | None = None
    attn_threshold: float = 0.05
    neuron_overrides: dict | None = None
    input_gain: float | None = None
    residual_scale: float | None = None
    weight_gain: float = 1.0
    input_rate: float = 0.25
    initializer_range: float = 0.02
    spiking_head: bool = False
    layer_norm_eps: float = 1e-5
    neuron_backend: str = "lean"
    attn_chunk_size: int | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self.neuron_overrides = dict(self.neuron_overrides or {})
        self._validate()
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        def need(cond: bool, field: str, what: str) -> None:
            if not cond:
                raise InvalidConfig(f"BiSpikCLMConfig.{field} {what}, got {getattr(self, field)!r}")

        own = BiSpikCLMConfig.__annotations__
        try:   # types first (strings, booleans for numbers, NaN), so that the range checks below can compare
            check_types("BiSpikCLMConfig", {name: getattr(self, name) for name in own}, own)
        except UserError as err:
            raise InvalidConfig(str(err)) from None
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                      "max_position_embeddings"):
            need(getattr(self, field) >= 1, field, "must be an integer >= 1")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                 f"must be divisible by num_attention_heads={self.num_attention_heads} (or set head_dim)")
        else:
            need(self.head_dim >= 1, "head_dim", "must be an integer >= 1 or None")
        if self.num_key_value_heads is not None:
            need(self.num_key_value_heads >= 1
                 and self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"must be an integer >= 1 dividing num_attention_heads={self.num_attention_heads}")
        need(self.ffn_type in FFN_TYPES, "ffn_type", f"must be one of {FFN_TYPES}")
        need(self.ffn_gate in FFN_GATES, "ffn_gate", f"must be one of {FFN_GATES}")
        need(self.time_steps >= 1, "time_steps", "must be an integer >= 1")
        need(0.0 < self.beta <= 1.0, "beta", "must be in (0, 1]")
        need(0.0 <= self.initial_membrane <= 1.0, "initial_membrane", "must be in [0, 1] (a fraction of the threshold)")
        need(self.fire in FIRE_MODES, "fire", f"must be one of {FIRE_MODES}")
        need(self.threshold > 0, "threshold", "must be > 0")
        need(self.attn_threshold > 0, "attn_threshold", "must be > 0")
        need(self.attn_scale is None or self.attn_scale > 0, "attn_scale", "must be > 0 or None")
        need(self.surrogate in SURROGATES, "surrogate", f"must be one of {SURROGATES}")
        need(self.learn_threshold in LEARNABLE, "learn_threshold", f"must be one of {LEARNABLE}")
        need(self.learn_beta in LEARNABLE[:2], "learn_beta", f"must be one of {LEARNABLE[:2]}")
        need(not (self.per_channel_neurons and self.learn_threshold != "none"), "per_channel_neurons",
             "needs learn_threshold='none' (per-channel thresholds are calibrated, not learned)")
        need(self.neuron_backend in ("lean", "reference"), "neuron_backend", "must be 'lean' or 'reference'")
        need(self.residual_scale is None or self.residual_scale > 0, "residual_scale", "must be > 0 or None")
        need(self.input_gain is None or self.input_gain > 0, "input_gain", "must be > 0 or None")
        need(0.0 < self.input_rate <= 1.0, "input_rate", "must be in (0, 1]")
        need(self.attn_chunk_size is None or self.attn_chunk_size >= 1, "attn_chunk_size", "must be >= 1 or None")
        for group, fields in self.neuron_overrides.items():
            need(group in NEURON_GROUPS, "neuron_overrides", f"has unknown group {group!r} (known: {NEURON_GROUPS})")
            unknown = set(fields) - set(NEURON_FIELDS)
            need(not unknown, "neuron_overrides", f"has unknown fields {sorted(unknown)} (known: {NEURON_FIELDS})")
            if fields.get("signed"):
                need(group in SIGNED_GROUPS, "neuron_overrides", f"asks for signed {group!r}; signed neuron pairs "
                     f"are for {SIGNED_GROUPS}")
                need(fields.get("fire", self.fire) == "count", "neuron_overrides",
                     f"asks for signed {group!r}, which needs fire='count'")
                attn_fire = self.neuron_overrides.get("attn", {}).get("fire", self.fire)
                need(group not in ("q", "k") or attn_fire == "count", "neuron_overrides",
                     f"asks for signed {group!r}, whose ternary scores need fire='count' for the attention map")

    @property
    def attention_head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads if self.head_dim is None else self.head_dim

    @property
    def key_value_heads(self) -> int:
        """Number of heads of binary K and V spikes (grouped-query attention when fewer than query heads)."""
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def effective_attn_scale(self) -> float:
        return 1.0 / self.attention_head_dim if self.attn_scale is None else self.attn_scale

    @property
    def effective_residual_scale(self) -> float:
        return min(1.0, 2.0 / self.num_hidden_layers) if self.residual_scale is None else self.residual_scale

    @property
    def effective_input_gain(self) -> float:
        return 1.0 / self.initializer_range if self.input_gain is None else self.input_gain

    def neuron_kwargs(self, group: str, channels: int | None = None) -> dict:
        """LIF arguments of one neuron group: the global defaults, updated by ``neuron_overrides[group]``;
        ``channels``: the width of the group's last axis (for per-channel learned thresholds)."""
        if group not in NEURON_GROUPS:
            raise ValueError(f"unknown neuron group {group!r} (known: {NEURON_GROUPS})")
        kwargs = dict(beta=self.beta, threshold=self.attn_threshold if group == "attn" else self.threshold,
                      surrogate=self.surrogate, alpha=self.surrogate_alpha, detach_reset=self.detach_reset,
                      learn_threshold=self.learn_threshold, learn_beta=self.learn_beta,
                      initial_membrane=self.initial_membrane, fire=self.fire,
                      per_channel=self.per_channel_neurons, relative_surrogate=self.relative_surrogate,
                      signed=False)
        kwargs.update(self.neuron_overrides.get(group, {}))
        if kwargs["learn_threshold"] == "channel" and (group == "attn" or channels is None):
            kwargs["learn_threshold"] = "group"       # the attention map has no channels
        kwargs["backend"], kwargs["channels"] = self.neuron_backend, channels
        return kwargs

    def signed(self, group: str) -> bool:
        """Whether neuron group ``group`` is a signed neuron pair (its output has twice its channels)."""
        return bool(self.neuron_overrides.get(group, {}).get("signed", False))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BiSpikCLMConfig":
        """A config from a named preset (:data:`PRESETS`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_teacher_config(cls, teacher, **overrides) -> "BiSpikCLMConfig":
        """A same-shape student for an OPT, Llama, GPT-2 (or similar) teacher config: the teacher's depth, widths,
        heads and key/value heads, a gated SFFN for gated-MLP families (:data:`GATED_FFN_MODEL_TYPES`), and its
        special tokens and weight tying.

        Positions: a teacher with a learned position table (OPT, GPT-2) gives its size; a teacher with rotary
        positions (Llama) has none to copy, and the student's learned table gets ``min(2048, teacher's
        positions)`` rows unless ``max_position_embeddings`` is given: size it to the training context
        (``bispikclm train`` does) and extend it later with
        :meth:`~bispikclm.modeling.BiSpikCLMForCausalLM.resize_position_embeddings`.

        ``overrides`` are BiSpikCLMConfig fields; any other key is an :class:`~bispikclm.errors.InvalidConfig`."""
        get = lambda *names: next((getattr(teacher, n) for n in names if getattr(teacher, n, None) is not None), None)  # noqa: E731
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        positions = max_positions(teacher)
        if positions is not None and has_rotary_positions(teacher):
            positions = min(2048, positions)
        head_dim = get("head_dim")
        shape = dict(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=get("num_hidden_layers", "n_layer"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads"),
            head_dim=None if head_dim is None or hidden is None or head_dim * heads == hidden else head_dim,
            ffn_dim=get("ffn_dim", "intermediate_size", "n_inner") or 4 * hidden,
            ffn_type="gated" if getattr(teacher, "model_type", None) in GATED_FFN_MODEL_TYPES else "mlp",
            max_position_embeddings=positions,
            tie_word_embeddings=bool(getattr(teacher, "tie_word_embeddings", True)),
            pad_token_id=get("pad_token_id"), bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        )
        unknown = sorted(set(overrides) - set(BiSpikCLMConfig.__annotations__))
        if unknown:     # PretrainedConfig would keep them as attributes that nothing reads
            raise InvalidConfig(f"BiSpikCLMConfig has unknown settings {unknown} (known: "
                                f"{sorted(BiSpikCLMConfig.__annotations__)})")
        missing = [k for k, v in shape.items()
                   if v is None and not k.endswith("token_id") and k not in ("num_key_value_heads", "head_dim")]
        if missing:
            raise ValueError(f"teacher config {type(teacher).__name__} lacks {missing}")
        return cls(**{**shape, **overrides})


def has_rotary_positions(config) -> bool:
    """Whether a Hugging Face config describes rotary position embeddings (no learned position table)."""
    return any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta", "rope_scaling"))


def max_positions(model) -> int | None:
    """The longest input a model (or its config) takes: ``max_position_embeddings``, or GPT-2's ``n_positions`` /
    ``n_ctx``; ``None`` when the config does not say."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    return None


AutoConfig.register(BiSpikCLMConfig.model_type, BiSpikCLMConfig, exist_ok=True)
