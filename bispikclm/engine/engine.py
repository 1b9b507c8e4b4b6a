"""PackedEngine: BiSpikCLM inference on packed spikes, with no dense product on the activations of the blocks.

Per token and block (``[N, T, ...]`` arrays, spikes packed as in :mod:`bispikclm.engine.packing`)::

    A = LIF(X)                                  # block input spikes
    Q, K, V = LIF(A Wq + bq), ...               # event-driven: rows of the inputs that fired, summed
    O = P V,  P = LIF_attn(scale * popcount(Q AND K))   # against the packed binary K/V cache
    X += g1 * LIF(O Wo + bo)                    # each spike adds its channel's residual weight
    X += g2 * LIF(W2 LIF(W1 LIF(X) + b1) + b2)         # or the gated SFFN: gate and up in one pass
    logits = lm_head(LayerNorm(mean_t X))       # float head (or mean_t lm_head(LIF(X)) with spiking_head)

The embedding and the float head are the PyTorch model's own modules. With the Numba backend every block of a
forward pass runs in one compiled call (:func:`bispikclm.engine.kernels.blocks`); ``fused=False`` runs the same
kernels one call at a time, the reference the one call is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from numba.typed import List

from ..configuration import SIGNED_GROUPS
from ..errors import UserError
from ..modeling import NEURON_GROUP_OF, BiSpikCLMForCausalLM
from ..neurons import LIFNeuron
from ..spike_ops import SpikeLinear
from . import dense, kernels, reference
from .packing import head_nibbles, int_weights, pack_nibbles, quantize_, unpack, weight_bits, words

BACKENDS: dict[str, ModuleType] = {"numba": kernels, "reference": reference}
PREFILL = ("dense", "events")
DENSE_MIN_TOKENS = 8     # prompts this long run the dense prefill (below, the one-call path is faster)


@dataclass
class PackedLinear:
    """A linear layer for the engine: ``weight`` ``[in, out]`` (rows are inputs), ``bias`` ``[out]`` and
    ``scale`` ``[out]``; currents are ``(bias + sum of weight rows) * scale``. Float32 weights carry a float32
    bias and a scale of ones; integer weights (int8, or 4-bit rows packed two per byte, ``[in, ceil(out / 2)]``
    uint8) an int32 bias on the same power-of-two grid."""

    weight: np.ndarray
    bias: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_module(cls, linear: torch.nn.Linear, bits: int | None, name: str) -> "PackedLinear":
        """``bits``: None for float32 weights, 8 or 4 for the integers of :func:`quantize_` (4-bit values are
        held as int8 here; :meth:`nibbles` packs them)."""
        if bits is not None and isinstance(linear, SpikeLinear):
            layer = cls(*int_weights(linear, name, bits))
        else:
            weight = linear.weight.detach().float()
            bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
            layer = cls(weight.t().contiguous().numpy(), bias.numpy().copy(), np.ones(weight.shape[0], np.float32))
        if getattr(linear, "signed", False):     # inputs [S⁺, S⁻]: rows W, then -W (integers in [-127, 127])
            layer.weight = np.ascontiguousarray(np.concatenate([layer.weight, -layer.weight], axis=0))
        return layer

    @classmethod
    def concat(cls, layers: list["PackedLinear"]) -> "PackedLinear":
        """One layer whose outputs are those of ``layers`` side by side (same inputs): one pass over the spikes and
        longer contiguous runs along each weight row."""
        return cls(*(np.ascontiguousarray(np.concatenate(parts, axis=-1))
                     for parts in zip(*((x.weight, x.bias, x.scale) for x in layers))))

    def nibbles(self) -> "PackedLinear":
        """The same layer with its 4-bit values stored two per byte."""
        return PackedLinear(pack_nibbles(self.weight), self.bias, self.scale)

    @property
    def nbytes_per_row(self) -> int:
        return self.weight.shape[1] * self.weight.itemsize


class Neuron:
    """A LIF neuron as the engine runs it: ``beta`` one float32, ``threshold`` and ``initial`` (the membrane before
    the first step) float32 arrays, one value or one per channel, ``count`` the firing mode (``fire="count"``);
    learned thresholds and leaks are read from the module as the model uses them. Assigning ``threshold`` or
    ``initial`` writes into the arrays the engine holds (the one-call path reads them there)."""

    def __init__(self, beta: np.float32, threshold: np.ndarray, initial: np.ndarray, count: bool,
                 signed: bool = False) -> None:
        self.beta, self._threshold, self._initial, self.count = beta, threshold, initial, count
        self.signed = signed      # a signed pair: 2C neurons, thresholds [θ, θ], initials [U0, U0⁻], fed [I, -I]

    @property
    def threshold(self) -> np.ndarray:
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold[...] = value

    @property
    def initial(self) -> np.ndarray:
        return self._initial

    @initial.setter
    def initial(self, value) -> None:
        self._initial[...] = value

    @classmethod
    def of(cls, module: LIFNeuron, channels: int | None = None) -> "Neuron":
        """The neuron of ``module``; with ``channels``, the threshold is spread over them once here rather than
        at every call."""
        beta, threshold = module.parameters_now()
        initial = module.initial_now(threshold)
        as_array = lambda v: np.array(v.detach().float().numpy() if torch.is_tensor(v) else v, np.float32)  # noqa: E731
        threshold, initial = as_array(threshold), as_array(initial)
        if channels is not None:
            # copies: broadcast_to gives a read-only view, and a per-channel array would stay one
            threshold = np.broadcast_to(threshold, (channels,)).copy()
            initial = np.broadcast_to(initial, (channels,)).copy()
        if module.signed:
            negative = as_array(module.channel_initial_negative) if module.per_channel else initial
            initial = np.concatenate([initial, np.broadcast_to(negative, initial.shape)])
            threshold = np.concatenate([threshold, threshold])
        return cls(np.float32(as_array(beta)), threshold, initial, module.fire == "count", module.signed)


@dataclass
class PackedBlock:
    qkv: PackedLinear            # q_proj, k_proj, v_proj side by side
    out: PackedLinear
    ffn_in: PackedLinear         # fc1, or gate_proj and up_proj side by side (gated SFFN)
    ffn_out: PackedLinear        # fc2 or down_proj
    attn_residual_scale: np.ndarray
    ffn_residual_scale: np.ndarray
    neurons: dict[str, Neuron]   # by module path inside the block (keys of NEURON_GROUP_OF)


# neuron paths inside a block by slot of the one-call path (kernels.ATTN_IN ...)
SLOT_NAMES = {kernels.ATTN_IN: "attn_in_neuron", kernels.Q: "self_attn.q_neuron", kernels.K: "self_attn.k_neuron",
              kernels.V: "self_attn.v_neuron", kernels.ATTN: "self_attn.attn_neuron",
              kernels.OUT: "self_attn.out_neuron", kernels.FFN_IN: "ffn_in_neuron", kernels.GATE: "ffn.gate_neuron",
              kernels.HIDDEN: "ffn.hidden_neuron", kernels.FFN_OUT: "ffn.out_neuron"}


class FusedPlan:
    """Every block's weights and neurons laid out for :func:`bispikclm.engine.kernels.blocks`: typed lists with
    ``LINEARS`` weights (and biases, scales) per layer and ``NEURON_SLOTS`` thresholds (and initial membranes)
    per layer, which hold the blocks' own arrays (no copies), ``betas`` and ``counting`` ``[L, NEURON_SLOTS]``,
    two residual gains per layer, and the shape ``dims``: one compiled function serves any depth."""

    def __init__(self, blocks: list["PackedBlock"], config) -> None:
        self.weights, self.biases, self.scales = List(), List(), List()
        self.thresholds, self.initials, self.gains = List(), List(), List()
        self.betas = np.zeros((len(blocks), kernels.NEURON_SLOTS), np.float32)
        self.counting = np.zeros((len(blocks), kernels.NEURON_SLOTS), np.bool_)
        for i, block in enumerate(blocks):
            for layer in (block.qkv, block.out, block.ffn_in, block.ffn_out):
                self.weights.append(layer.weight)
                self.biases.append(layer.bias)
                self.scales.append(layer.scale)
            for slot, name in SLOT_NAMES.items():
                neuron = block.neurons.get(name)           # no gate neuron in an OPT-style SFFN
                if neuron is None:
                    self.thresholds.append(np.zeros(0, np.float32))
                    self.initials.append(np.zeros(0, np.float32))
                    continue
                self.thresholds.append(neuron.threshold.reshape(-1))      # a view: the same memory
                self.initials.append(neuron.initial.reshape(-1))
                self.betas[i, slot], self.counting[i, slot] = neuron.beta, neuron.count
            self.gains.append(block.attn_residual_scale)
            self.gains.append(block.ffn_residual_scale)
        head_dim = config.attention_head_dim
        self.dims = (config.num_attention_heads * head_dim, config.key_value_heads * head_dim, config.ffn_dim,
                     config.num_attention_heads, config.key_value_heads, head_dim, int(config.ffn_type == "gated"),
                     int(config.ffn_gate == "and"))
        self.attn_scale = np.float32(config.effective_attn_scale)
        self.words = words(max(config.hidden_size, self.dims[0], self.dims[1], config.ffn_dim))


class PackedCache:
    """Binary K and V spikes of every layer, packed: ``keys``, ``values`` ``[L, T, max_length, W]`` uint64, with
    ``W`` the words of the key/value heads (``num_key_value_heads * head_dim`` spikes, twice that for a signed
    pair: its positive half, then its negative half)."""

    def __init__(self, layers: int, time_steps: int, max_length: int, key_size: int,
                 value_size: int | None = None) -> None:
        self.keys = np.zeros((layers, time_steps, max_length, words(key_size)), np.uint64)
        self.values = np.zeros((layers, time_steps, max_length, words(value_size or key_size)), np.uint64)
        self.length = 0


class PackedEngine:
    """Event-driven inference of a :class:`BiSpikCLMForCausalLM` on spikes packed into 64-bit words.

    Runs every student the project trains: OPT-style (SFFN, one K/V head per query head) and Llama-style
    (grouped-query SFSA with a K/V cache of the key/value heads, gated SFFN with ``ffn_gate`` ``select`` or
    ``and``, any ``head_dim``), with fixed or learned thresholds and leaks, and the learned position table of
    any student (rotary-teacher students included).

    Args:
        model: the PyTorch model (its embedding and float head are used as they are).
        int8: run the linear layers of the blocks on integer weights; the model must have been quantized with
            :func:`bispikclm.engine.quantize_` (with the same ``bits``), and then both give the same spikes bit
            for bit. A head quantized with ``quantize_(model, head=True)`` runs on its integers too (float
            LayerNorm output times int8 rows, a quarter of the float head's bytes; or 4-bit rows with a scale
            per group of 32 inputs, an eighth).
        backend: ``"numba"`` (fast path) or ``"reference"`` (plain NumPy, same results).
        bits: with ``int8``, the width of the blocks' weights: 8 (int8 rows) or 4 (two 4-bit values per byte).
        fused: with the Numba backend, run every block of a forward pass in one compiled call (default); False
            runs one kernel call at a time (the reference of the one call; same bits).
        prefill: with integer weights and the Numba backend, how prompts of at least ``DENSE_MIN_TOKENS`` tokens
            run: ``"dense"`` (default), all tokens of a block at once, the linear layers as one dense integer
            product of the 0/1 spikes and the weights (:mod:`bispikclm.engine.dense`); ``"events"``, the
            event-driven path (its reference; same bits).
    """

    def __init__(self, model: BiSpikCLMForCausalLM, int8: bool = False, backend: str = "numba", bits: int = 8,
                 fused: bool = True, prefill: str = "dense") -> None:
        if backend not in BACKENDS:
            raise UserError(f"unknown engine backend {backend!r} (known: {sorted(BACKENDS)})")
        if prefill not in PREFILL:
            raise UserError(f"unknown prefill {prefill!r} (known: {', '.join(PREFILL)})")
        if bits not in (8, 4):
            raise UserError(f"the engine's weights are 8 or 4 bits wide, got bits={bits}")
        self.signed = any(model.config.signed(group) for group in SIGNED_GROUPS)
        self.model = model.eval()
        self.config = cfg = model.config
        self.ops = BACKENDS[backend]
        self.int8 = int8
        self.bits = bits if int8 else None
        self.gated = cfg.ffn_type == "gated"
        self.head_dim = cfg.attention_head_dim
        self.q_size = cfg.num_attention_heads * self.head_dim
        self.kv_size = cfg.key_value_heads * self.head_dim
        self.blocks = []
        for i, layer in enumerate(model.model.layers):
            attn, ffn, prefix = layer.self_attn, layer.ffn, f"model.layers.{i}"
            lin = lambda m, n: PackedLinear.from_module(m, self.bits, f"{prefix}.{n}")  # noqa: E731
            if self.gated:
                ffn_in = PackedLinear.concat([lin(ffn.gate_proj, "ffn.gate_proj"), lin(ffn.up_proj, "ffn.up_proj")])
                ffn_out = lin(ffn.down_proj, "ffn.down_proj")
            else:
                ffn_in, ffn_out = lin(ffn.fc1, "ffn.fc1"), lin(ffn.fc2, "ffn.fc2")
            self.blocks.append(PackedBlock(
                PackedLinear.concat([lin(attn.q_proj, "self_attn.q_proj"), lin(attn.k_proj, "self_attn.k_proj"),
                                     lin(attn.v_proj, "self_attn.v_proj")]),
                lin(attn.out_proj, "self_attn.out_proj"), ffn_in, ffn_out,
                layer.attn_residual_scale.detach().float().numpy().copy(),
                layer.ffn_residual_scale.detach().float().numpy().copy(),
                {name: Neuron.of(module, None if name == "self_attn.attn_neuron" else self._channels(name))
                 for name, module in layer.named_modules() if isinstance(module, LIFNeuron)}))
            if bits == 4 and int8:
                block = self.blocks[-1]
                block.qkv, block.out = block.qkv.nibbles(), block.out.nibbles()
                block.ffn_in, block.ffn_out = block.ffn_in.nibbles(), block.ffn_out.nibbles()
        self.head_neuron = Neuron.of(model.head_neuron, cfg.hidden_size) if cfg.spiking_head else None
        self.head = PackedLinear.from_module(model.lm_head, None, "lm_head") if cfg.spiking_head else None
        self.head_int8 = self.head_nibbles = None
        head_bits = weight_bits(model.lm_head, head=True) if int8 and not cfg.spiking_head else None
        if head_bits == 8:
            weight_t, _, scale = int_weights(model.lm_head, "lm_head")
            self.head_int8 = (weight_t, scale)
        elif head_bits == 4:
            self.head_nibbles = head_nibbles(model.lm_head)
        # the one-call kernel runs unsigned neurons only; signed pairs take the per-kernel path
        self.fused = FusedPlan(self.blocks, cfg) if fused and self.ops is kernels and not self.signed else None
        self.dense = int8 and prefill == "dense" and self.ops is kernels

    @classmethod
    def from_model(cls, model: BiSpikCLMForCausalLM, int8: bool = False, backend: str = "numba", bits: int = 8,
                   fused: bool = True, prefill: str = "dense") -> "PackedEngine":
        """An engine on ``model``'s weights (see the class for the arguments)."""
        return cls(model, int8=int8, backend=backend, bits=bits, fused=fused, prefill=prefill)

    @classmethod
    def from_pretrained(cls, path: str, int8: bool = False, int8_head: bool = False, backend: str = "numba",
                        bits: int = 8, fused: bool = True, prefill: str = "dense") -> "PackedEngine":
        """An engine for a saved checkpoint; with ``int8`` the model is quantized first to ``bits`` (its head too
        with ``int8_head``)."""
        model = BiSpikCLMForCausalLM.from_pretrained(path, dtype=torch.float32)
        return cls(quantize_(model, head=int8_head, bits=bits) if int8 else model, int8=int8, backend=backend,
                   bits=bits, fused=fused, prefill=prefill)

    def new_cache(self, max_length: int | None = None) -> PackedCache:
        """An empty cache for up to ``max_length`` positions (default: ``max_position_embeddings``)."""
        cfg = self.config
        return PackedCache(cfg.num_hidden_layers, cfg.time_steps, max_length or cfg.max_position_embeddings,
                           self._width("self_attn.k_neuron"), self._width("self_attn.v_neuron"))

    def _lif(self, current: np.ndarray, neuron: Neuron) -> np.ndarray:
        if neuron.signed:                        # the pair's neurons, one driven by I and one by -I
            current = np.concatenate([current, -current], axis=-1)
        spikes = np.empty(current.shape[:2] + (words(current.shape[2]),), np.uint64)
        self.ops.lif(current, neuron.beta, neuron.threshold, neuron.initial, neuron.count, spikes)
        return spikes

    def _current(self, inputs: np.ndarray, layer: PackedLinear, ops: ModuleType, counts: bool = False
                 ) -> np.ndarray:
        current = np.empty(inputs.shape[:2] + (layer.bias.shape[0],), np.float32)
        (ops.linear_counts if counts else ops.linear_spikes)(inputs, layer.weight, layer.bias, layer.scale, current)
        return current

    def _ffn(self, b: np.ndarray, block: PackedBlock, ops: ModuleType) -> dict[str, np.ndarray]:
        """The SFFN's spikes by neuron path (``ffn.out_neuron`` last) for its input spikes ``b``. Gated: the gate
        and up currents come from one pass over ``b``; ``select`` zeroes the up current where the gate did not
        fire before the hidden neuron, ``and`` ANDs the gate and hidden spikes (``ffn.hidden`` holds what the
        down projection receives)."""
        current, neurons, f = self._current(b, block.ffn_in, ops), block.neurons, self.config.ffn_dim
        if not self.gated:
            h = self._lif(current, neurons["ffn.hidden_neuron"])
            return {"ffn.hidden_neuron": h, "ffn.out_neuron": self._lif(self._current(h, block.ffn_out, ops),
                                                                        neurons["ffn.out_neuron"])}
        gate = self._lif(np.ascontiguousarray(current[..., :f]), neurons["ffn.gate_neuron"])
        up = np.ascontiguousarray(current[..., f:])
        if self.config.ffn_gate == "select":
            self.ops.gate_current(up, gate)
            h = hidden = self._lif(up, neurons["ffn.hidden_neuron"])
        else:
            h = self._lif(up, neurons["ffn.hidden_neuron"])
            hidden = gate & h
        out = self._lif(self._current(hidden, block.ffn_out, ops), neurons["ffn.out_neuron"])
        return {"ffn.gate_neuron": gate, "ffn.hidden_neuron": h, "ffn.hidden": hidden, "ffn.out_neuron": out}

    @torch.no_grad()
    def forward(self, input_ids, cache: PackedCache, all_logits: bool = False,
                record: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """Run ``input_ids`` ``[N]`` (one sequence) after the ``cache.length`` cached positions.

        Returns the logits of the last token ``[V]`` (``[N, V]`` with ``all_logits``). With ``record``, stores
        every neuron group's spikes ``[N, T, D]`` (bool) under the model's module path, and the attention
        output counts ``O = P V`` ``[N, T, D]`` under ``model.layers.<i>.self_attn.out_proj``."""
        cfg = self.config
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        n, past = ids.numel(), cache.length
        if past + n > cache.keys.shape[2]:
            raise UserError(f"{past + n} positions exceed the cache ({cache.keys.shape[2]}); "
                            f"the model has max_position_embeddings={cfg.max_position_embeddings}")
        positions = torch.arange(past, past + n)
        x0 = self.model.model.embed(ids[None], positions[None])[0].float().numpy()
        x = np.ascontiguousarray(np.broadcast_to(x0[:, None], (n, cfg.time_steps, cfg.hidden_size)))
        if self.dense and n >= DENSE_MIN_TOKENS:
            self._blocks(x, cache, past, record, dense)
        elif self.fused is not None:
            self._blocks_fused(x, cache, past, record)
        else:
            self._blocks(x, cache, past, record, self.ops)
        cache.length = past + n
        return self._head(x if all_logits else x[-1:], record)[slice(None) if all_logits else -1]

    def _blocks_fused(self, x: np.ndarray, cache: PackedCache, past: int, record: dict | None) -> None:
        """Every block in one compiled call (:func:`bispikclm.engine.kernels.blocks`); with ``record``, every
        layer's spikes and counts are kept and stored as :meth:`forward` says."""
        n, t_steps, _ = x.shape
        kept = len(self.blocks) if record is not None else 1
        spikes = np.empty((kept, kernels.SPIKE_SLOTS, n, t_steps, self.fused.words), np.uint64)
        counts = np.empty((kept, n, t_steps, self.q_size), np.int32)
        kernels.blocks(x, past, cache.keys, cache.values, self.fused, spikes, counts)
        if record is None:
            return
        for i in range(len(self.blocks)):
            for slot, name in SLOT_NAMES.items():
                if slot != kernels.ATTN and name in self.blocks[i].neurons:
                    record[f"model.layers.{i}.{name}"] = unpack(spikes[i, slot], self._width(name))
            record[f"model.layers.{i}.self_attn.out_proj"] = counts[i]

    def _blocks(self, x: np.ndarray, cache: PackedCache, past: int, record: dict | None, ops: ModuleType) -> None:
        """Every block, one kernel call at a time: the reference of :meth:`_blocks_fused` (``ops`` the engine's
        kernels), or the dense prefill (``ops`` :mod:`bispikclm.engine.dense`)."""
        cfg, n = self.config, x.shape[0]
        splits = np.cumsum([0, self.q_size, self.kv_size, self.kv_size])
        for i, block in enumerate(self.blocks):
            neurons = block.neurons
            a = self._lif(x.copy(), neurons["attn_in_neuron"])
            qkv = self._current(a, block.qkv, ops)
            q, k, v = (self._lif(np.ascontiguousarray(qkv[..., lo:hi]), neurons[f"self_attn.{name}_neuron"])
                       for lo, hi, name in zip(splits[:-1], splits[1:], "qkv"))
            cache.keys[i, :, past:past + n] = k.transpose(1, 0, 2)
            cache.values[i, :, past:past + n] = v.transpose(1, 0, 2)
            attn = neurons["self_attn.attn_neuron"]
            counts = np.empty((n, cfg.time_steps, self.q_size), np.int32)
            self.ops.sfsa(q, cache.keys[i], cache.values[i], past, cfg.num_attention_heads, cfg.key_value_heads,
                          self.head_dim, cfg.effective_attn_scale, attn.beta, attn.threshold, attn.initial,
                          attn.count, counts, tuple(cfg.signed(group) for group in "qkv"))
            y = self._lif(self._current(counts, block.out, ops, counts=True), neurons["self_attn.out_neuron"])
            self._residual(x, y, block.attn_residual_scale, neurons["self_attn.out_neuron"])
            b = self._lif(x.copy(), neurons["ffn_in_neuron"])
            ffn = self._ffn(b, block, ops)
            self._residual(x, ffn["ffn.out_neuron"], block.ffn_residual_scale, neurons["ffn.out_neuron"])
            if record is not None:
                spikes = {"attn_in_neuron": a, "self_attn.q_neuron": q, "self_attn.k_neuron": k,
                          "self_attn.v_neuron": v, "self_attn.out_neuron": y, "ffn_in_neuron": b, **ffn}
                for name, packed in spikes.items():
                    if name != "ffn.hidden":            # what fc2/down_proj reads: see weight_bytes
                        record[f"model.layers.{i}.{name}"] = unpack(packed, self._width(name))
                record[f"model.layers.{i}.self_attn.out_proj"] = counts

    def _residual(self, x: np.ndarray, spikes: np.ndarray, gain: np.ndarray, neuron: Neuron) -> None:
        """``x += spikes * gain``; for a signed pair ``x += S⁺ · gain - S⁻ · gain`` (each spike adds or
        subtracts its channel's weight)."""
        if not neuron.signed:
            self.ops.residual_add(x, spikes, gain)
            return
        fired, d = unpack(spikes, 2 * x.shape[-1]), x.shape[-1]
        x[fired[..., :d]] += np.broadcast_to(gain, x.shape)[fired[..., :d]]
        x[fired[..., d:]] -= np.broadcast_to(gain, x.shape)[fired[..., d:]]

    def _width(self, name: str) -> int:
        """Number of neurons of a block's neuron group by module path (twice the channels for a signed pair)."""
        group = NEURON_GROUP_OF.get(name)
        pair = 2 if group in SIGNED_GROUPS and self.config.signed(group) else 1
        return pair * self._channels(name)

    def _channels(self, name: str) -> int:
        if name.startswith("ffn."):
            return self.config.ffn_dim if name != "ffn.out_neuron" else self.config.hidden_size
        return {"self_attn.q_neuron": self.q_size, "self_attn.k_neuron": self.kv_size,
                "self_attn.v_neuron": self.kv_size}.get(name, self.config.hidden_size)

    def _head(self, x: np.ndarray, record: dict | None) -> torch.Tensor:
        """Logits ``[N, V]`` from the last residual stream ``x`` ``[N, T, D]``."""
        if self.head is None:
            h = self.model.final_layer_norm(torch.from_numpy(x).mean(1))
            if self.head_int8 is not None:
                weight, scale = self.head_int8
                logits = np.empty((h.shape[0], weight.shape[1]), np.float32)
                self.ops.head_int8(h.numpy(), weight, scale, logits)
            elif self.head_nibbles is not None:
                weight, scale = self.head_nibbles
                logits = np.empty((h.shape[0], scale.shape[1]), np.float32)
                self.ops.head_nibbles(h.numpy(), weight, scale, logits)
            else:
                return self.model.lm_head(h)
            return torch.from_numpy(logits)
        spikes = self._lif(x.copy(), self.head_neuron)
        if record is not None:
            record["head_neuron"] = unpack(spikes, x.shape[-1])
        current = np.empty(spikes.shape[:2] + (self.head.bias.shape[0],), np.float32)
        self.ops.linear_spikes(spikes, self.head.weight, self.head.bias, self.head.scale, current)
        return torch.from_numpy(current).mean(1)

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Iterator[int]:
        """Stream new token ids after the prompt ``input_ids`` ``[N]``: greedy with ``temperature=0``, otherwise
        sampled from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise UserError("the prompt is empty; give at least one token")
        limit = min(self.config.max_position_embeddings, ids.numel() + max_new_tokens)
        cache = self.new_cache(limit)
        logits = self.forward(ids, cache)
        for _ in range(limit - ids.numel()):
            token = self._pick(logits, temperature, top_k, generator)
            yield token
            if token == eos_token_id or cache.length == limit:
                return
            logits = self.forward([token], cache)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        if top_k:
            cut = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < cut, float("-inf"))
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    def weight_bytes(self, record: dict[str, np.ndarray]) -> dict[str, float]:
        """Bytes of weights read per token, from a ``record`` of :meth:`forward`: each linear layer reads the
        rows of the inputs that fired at any time step (every row with a non-zero count for ``out_proj``);
        a dense head reads its whole matrix. Returns ``{"blocks", "head", "dense_blocks"}``: bytes per token of
        the blocks, of the head, and of the blocks' weights in float32 (what a dense product reads)."""
        blocks = dense = 0.0
        for i, block in enumerate(self.blocks):
            prefix = f"model.layers.{i}"
            hidden = record[f"{prefix}.ffn.hidden_neuron"]
            if self.gated and self.config.ffn_gate == "and":
                hidden = hidden & record[f"{prefix}.ffn.gate_neuron"]
            inputs = [(record[f"{prefix}.attn_in_neuron"], block.qkv),
                      (record[f"{prefix}.self_attn.out_proj"] != 0, block.out),
                      (record[f"{prefix}.ffn_in_neuron"], block.ffn_in), (hidden, block.ffn_out)]
            for fired, layer in inputs:
                rows = fired.any(axis=1).sum(axis=1).mean()          # rows read per token
                blocks += rows * layer.nbytes_per_row
                dense += layer.weight.shape[0] * layer.bias.shape[0] * 4
        if self.head is not None:
            head = record["head_neuron"].any(axis=1).sum(axis=1).mean() * self.head.nbytes_per_row
        elif self.head_int8 is not None:
            head = self.head_int8[0].nbytes
        elif self.head_nibbles is not None:
            head = sum(part.nbytes for part in self.head_nibbles)
        else:
            head = self.model.lm_head.weight.numel() * 4
        return {"blocks": float(blocks), "head": float(head), "dense_blocks": float(dense)}


@torch.no_grad()
def model_spikes(model: BiSpikCLMForCausalLM, input_ids) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """The PyTorch model's spikes in the layout of :meth:`PackedEngine.forward`'s ``record``: every neuron group
    ``[N, T, D]`` (bool) and the attention counts ``O`` (int32) by module path, for one sequence ``[N]``
    (no cache). Returns ``(record, logits [N, V])``."""
    record, hooks = {}, []

    def keep(name: str, value: torch.Tensor, dtype) -> None:
        record[name] = value[:, 0].transpose(0, 1).numpy().astype(dtype)

    for name, module in model.named_modules():
        if isinstance(module, LIFNeuron) and not name.endswith("attn_neuron"):
            hooks.append(module.register_forward_hook(lambda m, i, out, name=name: keep(name, out, bool)))
        if name.endswith("out_proj"):
            hooks.append(module.register_forward_pre_hook(lambda m, i, name=name: keep(name, i[0], np.int32)))
    try:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
        logits = model(ids, use_cache=False).logits[0]
    finally:
        for hook in hooks:
            hook.remove()
    return record, logits


def spike_agreement(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    """Fraction of equal entries over every recorded spike tensor (and attention count) of two records."""
    if ours.keys() != theirs.keys():
        raise ValueError(f"records differ in keys: {sorted(set(ours) ^ set(theirs))}")
    same = sum(int((ours[k] == theirs[k]).sum()) for k in ours)
    return same / sum(v.size for v in ours.values())
