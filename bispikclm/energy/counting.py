"""Operation counts of one forward pass on real text, for a BiSpikCLM student and any Hugging Face ANN.

Everything is counted from what runs (METHOD §6), not from a formula:

* every matrix product is intercepted (:mod:`bispikclm.tracing`). A product with a spike operand (0/1, the
  integer counts ``O = P V``, or a signed pair's ``S⁺ - S⁻``) costs accumulates, ``AC = (spikes actually fired)
  x fan-out``; a product of two
  real-valued operands costs ``MAC = m x k x n``. ``addmm``/``baddbmm`` also add a bias: one AC per output.
* the spike-by-spike product ``Q Kᵀ`` of an attention module is also listed as AND/popcount bit operations
  (``N x Nk x d_head`` per head and step, twice that per signed operand: informational, its energy is charged
  through its AC line).
* every LIF neuron call costs one update per neuron and step (``β·U + I``: one MAC; the threshold comparison:
  one AC) and one AC per spike (the soft reset).
* the student's remaining element-wise work is added from its structure: the embedding sum and input gain,
  the two residual additions per block and step, the time average and the head's LayerNorm.
* embedding lookups are listed as memory reads at zero energy.

The ANN is counted the same way (its products as executed; attention is switched to ``eager`` so that ``Q Kᵀ``
and ``P V`` are visible products). Its LayerNorms, softmax, activations and residual additions are **not**
counted, which favours the ANN.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..cost_tables import EnergyTable
from ..modeling import NEURON_GROUP_OF, BiSpikCLMForCausalLM
from ..neurons import FiringRateRecorder, LIFNeuron
from ..spike_ops import SpikeLinear
from ..tracing import SPIKE_KINDS, blocks_prefix, place, sections, trace_ops


@dataclass
class CostEntry:
    """Operations of one kind at one place: ``part`` (see :data:`PARTS`), block index ``layer`` (``None``
    outside the blocks), ``name`` (module path inside the block or the model), ``kind`` (:data:`KIND_COST`).

    For an ``ac`` entry of a product, ``dense`` is the MACs a product of the same shapes with real-valued inputs
    would do, and ``operand`` the kind of its spike operand (``binary``, ``count`` or ``signed``): ``count / dense``
    is the operand's firing rate (for integer counts, its mean magnitude)."""

    part: str
    layer: int | None
    name: str
    kind: str
    count: float
    dense: float = 0.0
    operand: str = ""


@dataclass
class CostCount:
    """All operations of one forward pass over ``tokens`` tokens (batch x length)."""

    model: str
    tokens: int
    time_steps: int | None
    entries: list[CostEntry] = field(default_factory=list)
    firing_rates: dict[str, float] = field(default_factory=dict)
    overall_firing_rate: float | None = None

    def total(self, kind: str | None = None, part: str | None = None) -> float:
        """Number of operations, optionally of one kind and/or in one part."""
        return sum(e.count for e in self.entries if kind in (None, e.kind) and part in (None, e.part))

    def energy_pj(self, table: EnergyTable, part: str | None = None) -> float:
        """Energy of the whole pass (or of one part) in picojoules."""
        return sum(e.count * table.pj(e.kind) for e in self.entries if part in (None, e.part))

    def product_spike_rate(self, operand: str | None = None) -> float:
        """Firing rate of the spike operands of all products (or of those of one ``operand`` kind), weighted by
        the products' sizes: ``ΣAC / ΣMAC-equivalent``."""
        chosen = [e for e in self.entries if e.kind == "ac" and e.dense and operand in (None, e.operand)]
        dense = sum(e.dense for e in chosen)
        return sum(e.count for e in chosen) / dense if dense else 0.0

    def grouped(self) -> list[CostEntry]:
        """Entries summed over repeated calls (same part, layer, name and kind), in order of first appearance."""
        sums: dict[tuple, CostEntry] = {}
        for e in self.entries:
            key = (e.part, e.layer, e.name, e.kind)
            if key in sums:
                sums[key].count += e.count
                sums[key].dense += e.dense
            else:
                sums[key] = CostEntry(**asdict(e))
        return list(sums.values())

def _is_attention(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return "attn" in leaf or "attention" in leaf


def _product_entries(trace, modules: dict[str, nn.Module], blocks: str) -> list[CostEntry]:
    """MAC / AC / bias / AND entries of every matrix product in ``trace``."""
    entries, calls = [], defaultdict(int)
    for r, section, layer, name in sections(trace.records, blocks):
        if not r.is_matmul:
            continue
        if section == "blocks":
            part = "attention" if any(_is_attention(p) for p in name.split(".")) else "ffn"
        else:
            part = section
        module = modules.get(r.module)
        if _is_attention(name) and module is not None and not any(True for _ in module.parameters(recurse=False)):
            name += " Q·Kᵀ" if calls[r.module] % 2 == 0 else " P·V"   # attention runs Q·Kᵀ, then P·V
            calls[r.module] += 1
        (left, right), (kind_l, kind_r) = r.shapes[:2], r.kinds[:2]
        left, right = (left if len(left) > 1 else (1, *left)), (right if len(right) > 1 else (*right, 1))  # mv, dot
        m, n = math.prod(left[:-1]), right[-1]                         # left [..., m, k] @ right [..., k, n]
        dense = math.prod(left) * n
        if kind_l in SPIKE_KINDS:
            entries.append(CostEntry(part, layer, name, "ac", r.sums[0] * n, dense, kind_l))
        elif kind_r in SPIKE_KINDS:
            entries.append(CostEntry(part, layer, name, "ac", r.sums[1] * left[-2], dense, kind_r))  # fan-out: rows
        else:
            entries.append(CostEntry(part, layer, name, "mac", dense))
        if name.endswith("Q·Kᵀ") and kind_l in ("binary", "signed") and kind_r in ("binary", "signed"):
            pairs = (2 if kind_l == "signed" else 1) * (2 if kind_r == "signed" else 1)   # S⁺ and S⁻ halves
            entries.append(CostEntry(part, layer, name, "and_popcount", dense * pairs))
        if r.bias:
            entries.append(CostEntry(part, layer, name, "bias_add", m * n))
    return entries


def _neuron_entries(model: nn.Module, blocks: str):
    """Forward hooks on every LIF neuron, adding its updates and resets to a list of entries."""
    entries, handles = [], []
    for path, module in model.named_modules():
        if isinstance(module, LIFNeuron):
            layer, name = place(path, blocks)
            part = "neurons" if layer is not None else "head"

            def hook(module, args, spikes, layer=layer, name=name, part=part):
                updates = args[0].numel() * (2 if module.signed else 1)      # a signed pair: two neurons
                entries.append(CostEntry(part, layer, name, "neuron_update", updates))
                entries.append(CostEntry(part, layer, name, "spike_reset", float(spikes.sum())))
            handles.append(module.register_forward_hook(hook))
    return entries, handles


def _lookup_entries(model: nn.Module):
    """Forward hooks on every embedding table, adding its lookups to a list of entries."""
    entries, handles = [], []
    for path, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            hook = lambda module, args, out, path=path: entries.append(  # noqa: E731
                CostEntry("embedding", None, path, "lookup", args[0].numel()))
            handles.append(module.register_forward_hook(hook))
    return entries, handles


def _read_entries(model: nn.Module, blocks: str):
    """Forward hooks on every linear layer and embedding, adding the weight elements a batch-1 decode reads per
    token: a product fed by spikes (the student's ``SpikeLinear``, and its head with ``spiking_head``) reads the
    rows of the inputs that fired at any time step, any other product all its weights; an embedding one row."""
    entries, handles = [], []
    spiking = {m for m in model.modules() if isinstance(m, SpikeLinear)}
    if isinstance(model, BiSpikCLMForCausalLM) and model.config.spiking_head:
        spiking.add(model.lm_head)
    for path, module in model.named_modules():
        layer, name = place(path, blocks)
        if layer is None:
            part = "embedding" if isinstance(module, nn.Embedding) else "head"
        else:
            part = "attention" if any(_is_attention(p) for p in name.split(".")) else "ffn"
        if isinstance(module, nn.Embedding):
            def hook(module, args, out, name=name, part=part, layer=layer):
                entries.append(CostEntry(part, layer, name, "weight_read", args[0].numel() * module.embedding_dim))
        elif module in spiking:                       # input [T, B, N, in]: a row per input fired at any step
            def hook(module, args, out, name=name, part=part, layer=layer):
                rows = float((args[0] != 0).any(0).sum())
                entries.append(CostEntry(part, layer, name, "weight_read", rows * module.out_features))
        elif isinstance(module, nn.Linear):
            def hook(module, args, out, name=name, part=part, layer=layer):
                tokens = args[0].numel() // module.in_features
                entries.append(CostEntry(part, layer, name, "weight_read", tokens * module.weight.numel()))
        else:
            continue
        handles.append(module.register_forward_hook(hook))
    return entries, handles


def _cache_entries(model: nn.Module, input_ids: torch.LongTensor) -> list[CostEntry]:
    """K/V cache entries a batch-1 decode reads: position ``i`` reads the keys and values of positions ``0..i``,
    ``2 x kv_heads x head_dim`` entries each (x T binary spikes for the student)."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    batch, n = input_ids.shape
    keys_seen = batch * n * (n + 1) // 2
    is_student = isinstance(model, BiSpikCLMForCausalLM)
    per_key = 2 * kv_heads * head_dim * (cfg.time_steps if is_student else 1)
    return [CostEntry("attention", layer, "K/V cache", "cache_read", keys_seen * per_key, operand="binary" if
                      is_student else "") for layer in range(cfg.num_hidden_layers)]


def _student_elementwise(model: nn.Module, tokens: int) -> list[CostEntry]:
    """Element-wise work of a BiSpikCLM outside products and neurons, from its structure (see module doc)."""
    cfg = model.config
    t, d, v = cfg.time_steps, cfg.hidden_size, cfg.vocab_size
    entries = [CostEntry("embedding", None, "tok_emb + pos_emb", "elementwise_add", tokens * d),
               CostEntry("embedding", None, "x input_gain", "elementwise_mul", tokens * d)]
    entries += [CostEntry("residual", layer, "x + SFSA, x + SFFN", "elementwise_add", 2 * t * tokens * d)
                for layer in range(cfg.num_hidden_layers)]
    if cfg.ffn_type == "gated":
        entries += [CostEntry("ffn", layer, f"ffn gate ({cfg.ffn_gate})", "gate", t * tokens * cfg.ffn_dim)
                    for layer in range(cfg.num_hidden_layers)]
    if cfg.spiking_head:
        entries += [CostEntry("head", None, "mean_t logits", "elementwise_add", (t - 1) * tokens * v),
                    CostEntry("head", None, "mean_t logits", "elementwise_mul", tokens * v)]
    else:
        entries += [CostEntry("head", None, "mean_t X_L", "elementwise_add", (t - 1) * tokens * d),
                    CostEntry("head", None, "mean_t X_L", "elementwise_mul", tokens * d),
                    CostEntry("head", None, "final_layer_norm", "elementwise_mul", 4 * tokens * d)]
    return entries


@torch.no_grad()
def count_operations(model: nn.Module, input_ids: torch.LongTensor, name: str | None = None) -> CostCount:
    """Count every operation of one forward pass of ``model`` on ``input_ids`` ``[B, N]``.

    Works for a :class:`~bispikclm.BiSpikCLMForCausalLM` and for any Hugging Face causal LM (whose attention
    is switched to ``eager`` for the pass, so that its attention products are counted)."""
    model.eval()
    is_student = isinstance(model, BiSpikCLMForCausalLM)
    blocks = blocks_prefix(model)
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if not is_student and attn_impl not in (None, "eager"):
        model.set_attn_implementation("eager")
    neurons = {p: m for p, m in model.named_modules() if isinstance(m, LIFNeuron)}
    neuron_entries, handles = _neuron_entries(model, blocks)
    lookup_entries, more_handles = _lookup_entries(model)
    read_entries, read_handles = _read_entries(model, blocks)
    more_handles += read_handles
    modules = dict(model.named_modules())
    try:
        with trace_ops(model) as trace, FiringRateRecorder(neurons) as recorder:
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles + more_handles:
            handle.remove()
        if not is_student and attn_impl not in (None, "eager"):
            model.set_attn_implementation(attn_impl)
    tokens = input_ids.numel()
    entries = (lookup_entries + _product_entries(trace, modules, blocks) + neuron_entries + read_entries
               + _cache_entries(model, input_ids))
    if is_student:
        entries += _student_elementwise(model, tokens)
    rates = recorder.rates()
    overall = recorder.overall() if neurons else None
    return CostCount(model=name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
                     tokens=tokens, time_steps=getattr(model.config, "time_steps", None) if is_student else None,
                     entries=entries, firing_rates=rates, overall_firing_rate=overall)

def firing_rates_by_layer(rates: dict[str, float], blocks: str = "model.layers") -> dict[str, dict[str, float]]:
    """``{layer ("0", "1", ... or "head"): {neuron group: firing rate}}`` from ``{neuron path: rate}``."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for path, rate in rates.items():
        layer, name = place(path, blocks)
        table["head" if layer is None else str(layer)][NEURON_GROUP_OF.get(name, name)] = rate
    return dict(table)
