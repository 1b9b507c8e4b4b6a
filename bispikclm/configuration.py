"""BiSpikCLMConfig: OPT's field names plus the spiking options (METHOD §1–3)."""

from __future__ import annotations

from transformers import PretrainedConfig

from .neurons import SURROGATES

# Neuron groups; each can override beta / threshold / surrogate / alpha / detach_reset via `neuron_overrides`.
NEURON_GROUPS = ("block_in", "q", "k", "v", "attn", "attn_out", "ffn_in", "ffn_hidden", "ffn_out", "head")
NEURON_FIELDS = ("beta", "threshold", "surrogate", "alpha", "detach_reset")

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512,
                 max_position_embeddings=512),
    "opt-125m": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     max_position_embeddings=2048),
    "opt-350m": dict(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     max_position_embeddings=2048),
    "opt-1.3b": dict(vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     max_position_embeddings=2048),
}


class BiSpikCLMConfig(PretrainedConfig):
    """Configuration of a BiSpikCLM student.

    Shape fields follow OPT (``vocab_size, hidden_size, num_hidden_layers, num_attention_heads, ffn_dim,
    max_position_embeddings``). Spiking fields:

    * ``time_steps``: T, the number of time steps each token is run for (direct encoding).
    * ``threshold``, ``beta``, ``surrogate``, ``surrogate_alpha``, ``detach_reset``: LIF defaults for every group.
    * ``attn_scale``, ``attn_threshold``: the attention neuron sees ``attn_scale * (Q K^T)`` and fires at
      ``attn_threshold``. ``attn_scale=None`` means ``1 / head_dim`` (METHOD §8: ``1/sqrt(d)`` saturates).
    * ``neuron_overrides``: ``{group: {field: value}}`` for groups in :data:`NEURON_GROUPS`.
    * ``input_gain``: gain of the embedding current (``None``: ``1 / initializer_range``), decoupled from the
      scale of the tied head (METHOD §8).
    * ``residual_scale``: initial per-channel weight of the spikes each branch adds to the residual stream
      (``None``: ``min(1, 2 / num_hidden_layers)``); spikes are non-negative, so unweighted sums drift upwards
      with depth and saturate the block-input neurons of deep models.
    * ``weight_gain``: linear weights start with std ``weight_gain / sqrt(fan_in * input_rate)`` so that
      currents driven by spikes at rate ``input_rate`` have unit scale.
    * ``spiking_head``: logits = mean_t head(SN(X_L[t])) instead of head(LayerNorm(mean_t X_L[t])).
    * ``neuron_backend``: ``"lean"`` or ``"reference"`` (see :mod:`bispikclm.neurons`).
    * ``attn_chunk_size``: process queries in chunks of this size at inference (bounds attention memory).
    """

    model_type = "bispikclm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    time_steps: int = 2
    threshold: float = 1.0
    beta: float = 0.5
    surrogate: str = "arctan"
    surrogate_alpha: float | None = None
    detach_reset: bool = False
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
                raise ValueError(f"BiSpikCLMConfig.{field} {what}, got {getattr(self, field)!r}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                      "max_position_embeddings"):
            need(isinstance(getattr(self, field), int) and getattr(self, field) >= 1, field, "must be an integer >= 1")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be divisible by num_attention_heads={self.num_attention_heads}")
        need(isinstance(self.time_steps, int) and self.time_steps >= 1, "time_steps", "must be an integer >= 1")
        need(0.0 < self.beta < 1.0, "beta", "must be in (0, 1)")
        need(self.threshold > 0, "threshold", "must be > 0")
        need(self.attn_threshold > 0, "attn_threshold", "must be > 0")
        need(self.attn_scale is None or self.attn_scale > 0, "attn_scale", "must be > 0 or None")
        need(self.surrogate in SURROGATES, "surrogate", f"must be one of {SURROGATES}")
        need(self.neuron_backend in ("lean", "reference"), "neuron_backend", "must be 'lean' or 'reference'")
        need(self.residual_scale is None or self.residual_scale > 0, "residual_scale", "must be > 0 or None")
        need(self.input_gain is None or self.input_gain > 0, "input_gain", "must be > 0 or None")
        need(0.0 < self.input_rate <= 1.0, "input_rate", "must be in (0, 1]")
        need(self.attn_chunk_size is None or self.attn_chunk_size >= 1, "attn_chunk_size", "must be >= 1 or None")
        for group, fields in self.neuron_overrides.items():
            need(group in NEURON_GROUPS, "neuron_overrides", f"has unknown group {group!r} (known: {NEURON_GROUPS})")
            unknown = set(fields) - set(NEURON_FIELDS)
            need(not unknown, "neuron_overrides", f"has unknown fields {sorted(unknown)} (known: {NEURON_FIELDS})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def effective_attn_scale(self) -> float:
        return 1.0 / self.head_dim if self.attn_scale is None else self.attn_scale

    @property
    def effective_residual_scale(self) -> float:
        return min(1.0, 2.0 / self.num_hidden_layers) if self.residual_scale is None else self.residual_scale

    @property
    def effective_input_gain(self) -> float:
        return 1.0 / self.initializer_range if self.input_gain is None else self.input_gain

    def neuron_kwargs(self, group: str) -> dict:
        """LIF arguments of one neuron group: the global defaults, updated by ``neuron_overrides[group]``."""
        if group not in NEURON_GROUPS:
            raise ValueError(f"unknown neuron group {group!r} (known: {NEURON_GROUPS})")
        kwargs = dict(beta=self.beta, threshold=self.attn_threshold if group == "attn" else self.threshold,
                      surrogate=self.surrogate, alpha=self.surrogate_alpha, detach_reset=self.detach_reset)
        kwargs.update(self.neuron_overrides.get(group, {}))
        kwargs["backend"] = self.neuron_backend
        return kwargs

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BiSpikCLMConfig":
        """A config from a named preset (:data:`PRESETS`), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {sorted(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_teacher_config(cls, teacher, **overrides) -> "BiSpikCLMConfig":
        """A same-shape student for an OPT, Llama, GPT-2 (or similar) teacher config."""
        get = lambda *names: next((getattr(teacher, n) for n in names if getattr(teacher, n, None) is not None), None)  # noqa: E731
        hidden = get("hidden_size", "n_embd", "d_model")
        shape = dict(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=get("num_hidden_layers", "n_layer"),
            num_attention_heads=get("num_attention_heads", "n_head"),
            ffn_dim=get("ffn_dim", "intermediate_size", "n_inner") or 4 * hidden,
            max_position_embeddings=get("max_position_embeddings", "n_positions", "n_ctx"),
            pad_token_id=get("pad_token_id"), bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        )
        missing = [k for k, v in shape.items() if v is None and not k.endswith("token_id")]
        if missing:
            raise ValueError(f"teacher config {type(teacher).__name__} lacks {missing}")
        return cls(**{**shape, **overrides})
