"""Operation counts and energy of one forward pass on real text, for a BiSpikCLM student and any Hugging Face ANN.

Everything is counted from what runs (METHOD §6), not from a formula:

* every matrix product is intercepted (:mod:`bispikclm.tracing`). A product with a spike operand (0/1, or the
  integer counts ``O = P V``) costs accumulates, ``AC = (spikes actually fired) x fan-out``; a product of two
  real-valued operands costs ``MAC = m x k x n``. ``addmm``/``baddbmm`` also add a bias: one AC per output.
* the spike-by-spike product ``Q Kᵀ`` of an attention module is also listed as AND/popcount bit operations
  (``N x Nk x d_head`` per head and step, informational: its energy is charged through its AC line).
* every LIF neuron call costs one update per neuron and step (``β·U + I``: one MAC; the threshold comparison:
  one AC) and one AC per spike (the soft reset).
* the student's remaining element-wise work is added from its structure: the embedding sum and input gain,
  the two residual additions per block and step, the time average and the head's LayerNorm.
* embedding lookups are listed as memory reads at zero energy.

The ANN is counted the same way (its products as executed; attention is switched to ``eager`` so that ``Q Kᵀ``
and ``P V`` are visible products). Its LayerNorms, softmax, activations and residual additions are **not**
counted, which favours the ANN.

**Honest cost** (:func:`cost_table`). The report above is the paper's convention: 32-bit float arithmetic only.
:func:`cost_table` also prices the same counts

* at int8 arithmetic (both models on int8 weights, as ``quantize_`` and an int8 ANN build run them), and
* with the memory traffic of batch-1 decoding: every token reads the weight rows its products use (the student
  only the rows of inputs that fired at any of the T steps, the ANN all of them), the embedding rows, and the
  K/V cache of all earlier positions (one bit per key/value spike for the student, one weight-sized number per
  entry for the ANN), at a cited energy per byte of on-chip SRAM or off-chip DRAM (:class:`MemoryTable`).

Every table lists both conventions: the paper's (the blocks, arithmetic only) and everything counted.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .ann import same_shape_ann
from .checkpoints import check_finite_weights, check_tokenizer_fits, load_checked
from .cost_tables import (BYTES_PER_WEIGHT, KIND_COST, PARTS, PRECISIONS, EnergyTable, MemoryTable,
                          load_energy_table)
from .errors import UserError
from .modeling import NEURON_GROUP_OF, BiSpikCLMForCausalLM
from .neurons import FiringRateRecorder, LIFNeuron
from .spike_ops import SpikeLinear
from .tracing import blocks_prefix, place, sections, trace_ops
from .validation import check_text_file

@dataclass
class CostEntry:
    """Operations of one kind at one place: ``part`` (see :data:`PARTS`), block index ``layer`` (``None``
    outside the blocks), ``name`` (module path inside the block or the model), ``kind`` (:data:`KIND_COST`).

    For an ``ac`` entry of a product, ``dense`` is the MACs a product of the same shapes with real-valued inputs
    would do, and ``operand`` the kind of its spike operand (``binary`` or ``count``): ``count / dense`` is the
    operand's firing rate (for integer counts, its mean count)."""

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


def default_text_path() -> Path:
    """WikiText-2 test text in the data folder (:func:`bispikclm.data.default_data_dir`)."""
    from .data import default_data_dir

    return default_data_dir() / "wikitext-2" / "test.txt"


def text_token_ids(tokenizer, path: str | Path | None = None, seq_len: int = 512, num_sequences: int = 1,
                   max_length: int | None = None) -> torch.LongTensor:
    """The first ``num_sequences x seq_len`` tokens of a text file (default: WikiText-2 test) as ``[S, seq_len]``;
    ``max_length``: the model's number of positions, which ``seq_len`` may not exceed."""
    if seq_len < 1 or num_sequences < 1:
        raise UserError(f"the number of tokens and of sequences must be >= 1, got {seq_len} and {num_sequences}")
    if max_length is not None and seq_len > max_length:
        raise UserError(f"sequence length {seq_len} is beyond the model's {max_length} positions")
    path = check_text_file(Path(path) if path is not None else default_text_path(),
                           "text file" if path is not None else "text file (set BISPIKCLM_DATA or pass --text)")
    needed, ids = seq_len * num_sequences, []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
                if len(ids) >= needed:
                    break
    except OSError as err:
        raise UserError(f"cannot read text {path}: {err} (set BISPIKCLM_DATA or pass --text)") from None
    if len(ids) < needed:
        raise UserError(f"{path} holds {len(ids)} tokens, fewer than {num_sequences} x {seq_len}")
    return torch.tensor(ids[:needed]).view(num_sequences, seq_len)


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
        if kind_l in ("binary", "count"):
            entries.append(CostEntry(part, layer, name, "ac", r.sums[0] * n, dense, kind_l))
        elif kind_r in ("binary", "count"):
            entries.append(CostEntry(part, layer, name, "ac", r.sums[1] * left[-2], dense, kind_r))  # fan-out: rows
        else:
            entries.append(CostEntry(part, layer, name, "mac", dense))
        if name.endswith("Q·Kᵀ") and kind_l == kind_r == "binary":
            entries.append(CostEntry(part, layer, name, "and_popcount", dense))
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
                entries.append(CostEntry(part, layer, name, "neuron_update", args[0].numel()))
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


def load_checkpoint(path: str | Path):
    """``(model, tokenizer)`` saved with ``save_pretrained`` in folder ``path`` (a BiSpikCLM or any HF causal LM)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a saved model folder (no config.json)")
    load_checked(AutoConfig.from_pretrained, path)   # a bad config.json fails here, not as a tokenizer error
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"no tokenizer saved beside the model in {path}: {str(err).splitlines()[0]}") from None
    model = load_checked(AutoModelForCausalLM.from_pretrained, path, weights=True).eval()
    check_finite_weights(model, path)
    check_tokenizer_fits(model, tokenizer, path)
    return model, tokenizer


def firing_rates_by_layer(rates: dict[str, float], blocks: str = "model.layers") -> dict[str, dict[str, float]]:
    """``{layer ("0", "1", ... or "head"): {neuron group: firing rate}}`` from ``{neuron path: rate}``."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for path, rate in rates.items():
        layer, name = place(path, blocks)
        table["head" if layer is None else str(layer)][NEURON_GROUP_OF.get(name, name)] = rate
    return dict(table)


def _summary(count: CostCount, table: EnergyTable) -> dict:
    """Per-token operations and energy of one model, by part and by (layer, name, kind)."""
    per_token = 1.0 / count.tokens
    total_pj = count.energy_pj(table)
    parts = {}
    for part in PARTS:
        ops = {k: count.total(k, part) * per_token for k in KIND_COST if count.total(k, part)}
        if ops:
            parts[part] = {"mj_per_token": count.energy_pj(table, part) * per_token * 1e-9,
                           "percent_of_total": 100 * count.energy_pj(table, part) / total_pj, "ops_per_token": ops}
    lines = [{"part": e.part, "layer": e.layer, "name": e.name, "kind": e.kind, "per_token": e.count * per_token,
              "mj_per_token": e.count * table.pj(e.kind) * per_token * 1e-9,
              **({"operand_rate": e.count / e.dense} if e.kind == "ac" and e.dense else {})}
             for e in count.grouped()]
    return {"model": count.model, "tokens": count.tokens, "time_steps": count.time_steps,
            "energy_mj_per_token": total_pj * per_token * 1e-9, "parts": parts, "lines": lines}


def energy_report(student: CostCount, ann: CostCount, table: EnergyTable = EnergyTable()) -> dict:
    """Energy of ``student`` against ``ann`` on the same tokens, with the approximate formula beside the count.

    ``formula.ratio`` is ``(E_AC / E_MAC) · T · rate`` (METHOD §6; 0.196·T·rate at 45 nm) with ``rate`` the
    firing rate of the spike operands of all products, weighted by their sizes. It covers only the products
    the student drives by spikes, i.e. ``formula.coverage`` of the ANN's energy; ``formula.terms_outside`` lists
    the rest of the student's energy as fractions of the ANN's (neurons, embedding, biases, residual additions,
    the head's time average and, without ``spiking_head``, its LayerNorm and real-valued product), so that
    ``ratio == formula.ratio · formula.coverage + Σ formula.terms_outside``."""
    if student.tokens != ann.tokens:
        raise ValueError(f"student ran on {student.tokens} tokens, the ANN on {ann.tokens}")
    e_student, e_ann = student.energy_pj(table), ann.energy_pj(table)
    t, rate = student.time_steps, student.product_spike_rate()
    dense_per_step = sum(e.dense for e in student.entries if e.kind == "ac") / t
    outside: dict[str, float] = defaultdict(float)
    for e in student.entries:
        if not (e.kind == "ac" and e.dense) and table.pj(e.kind):
            label = "bias" if e.kind == "bias_add" else ("head" if e.part == "head" else e.part)
            outside[label] += e.count * table.pj(e.kind) / e_ann
    return {
        "energy_table": asdict(table),
        "tokens": student.tokens,
        "time_steps": t,
        "student": _summary(student, table),
        "ann": _summary(ann, table),
        "ratio": e_student / e_ann,
        "formula": {"rate": rate, "binary_operand_rate": student.product_spike_rate("binary"),
                    "ratio": table.ac_pj / table.mac_pj * t * rate,
                    "coverage": dense_per_step * table.mac_pj / e_ann, "terms_outside": dict(outside)},
        "firing_rates": {"overall": student.overall_firing_rate,
                         "by_layer": firing_rates_by_layer(student.firing_rates)},
        "cost_table": cost_table(student, ann),
    }


BLOCK_PARTS = ("attention", "ffn", "neurons", "residual")


def bytes_read(count: CostCount, precision: str, part: str | None = None,
               bytes_per_weight: float | None = None) -> float:
    """Bytes a batch-1 decode reads over the pass (or in one part) with weights of ``precision``: weight elements
    times the weight's size, and K/V cache entries at one bit each for binary spikes, one weight's size for real
    numbers. ``bytes_per_weight`` overrides the size of ``precision`` (e.g. 0.5 for 4-bit weights, or a
    block format's bytes including its scales)."""
    size = BYTES_PER_WEIGHT[precision] if bytes_per_weight is None else bytes_per_weight
    total = 0.0
    for e in count.entries:
        if part not in (None, e.part):
            continue
        if e.kind == "weight_read":
            total += e.count * size
        elif e.kind == "cache_read":
            total += e.count / 8 if e.operand == "binary" else e.count * size
    return total


CONVENTIONS = {"paper": "paper: blocks, arithmetic only", "arithmetic": "everything, arithmetic only",
               "sram": "everything + memory at SRAM", "dram": "everything + memory at DRAM"}


def energy_per_token(count: CostCount, precision: str, convention: str, memory: MemoryTable = MemoryTable(),
                     bytes_per_weight: float | None = None) -> float:
    """Energy per token in millijoules of one model's ``count`` at the arithmetic of ``precision`` (a key of
    :data:`~bispikclm.cost_tables.PRECISIONS`) under ``convention`` (a key of :data:`CONVENTIONS`): ``paper``
    the blocks' arithmetic only; ``arithmetic`` every part's; ``sram`` / ``dram`` every part's plus the bytes
    read per token (:func:`bytes_read`, with ``bytes_per_weight`` overriding the precision's weight size) at
    the SRAM or DRAM energy per byte."""
    if precision not in PRECISIONS or convention not in CONVENTIONS:
        raise UserError(f"unknown precision {precision!r} or convention {convention!r} (known: "
                        f"{', '.join(PRECISIONS)}; {', '.join(CONVENTIONS)})")
    table = PRECISIONS[precision]
    if convention == "paper":
        pj = sum(count.energy_pj(table, part) for part in BLOCK_PARTS)
    else:
        pj_per_byte = {"arithmetic": 0.0, "sram": memory.sram_pj_per_byte, "dram": memory.dram_pj_per_byte}
        pj = count.energy_pj(table) + bytes_read(count, precision, bytes_per_weight=bytes_per_weight) * pj_per_byte[
            convention]
    return pj / count.tokens * 1e-9


def cost_table(student: CostCount, ann: CostCount, memory: MemoryTable = MemoryTable()) -> dict:
    """Energy per token of ``student`` and ``ann`` under both conventions, at float32 and int8 arithmetic:

    * ``paper``: the blocks only (attention, FFN, neurons, residual), arithmetic only (the paper's convention);
    * ``arithmetic``: every part, arithmetic only;
    * ``sram`` / ``dram``: every part, arithmetic plus the bytes read per token at the SRAM or DRAM energy.

    Returns ``{"memory_table", "bytes_per_token": {precision: {student, ann}}, "rows": [...]}``, one row per
    (precision, convention) with ``student_mj``, ``ann_mj`` per token and ``ratio``."""
    if student.tokens != ann.tokens:
        raise ValueError(f"student ran on {student.tokens} tokens, the ANN on {ann.tokens}")
    per_token = 1.0 / student.tokens
    rows, traffic = [], {}
    for precision in PRECISIONS:
        traffic[precision] = {"student": bytes_read(student, precision) * per_token,
                              "ann": bytes_read(ann, precision) * per_token}
        for convention in CONVENTIONS:
            s, a = (energy_per_token(student, precision, convention, memory),
                    energy_per_token(ann, precision, convention, memory))
            rows.append({"precision": precision, "convention": convention, "student_mj": s, "ann_mj": a,
                         "ratio": s / a})
    return {"memory_table": asdict(memory), "tables": {k: asdict(v) for k, v in PRECISIONS.items()},
            "bytes_per_token": traffic, "rows": rows}


def format_cost_table(table: dict) -> str:
    """A :func:`cost_table` as a Markdown table (energy per token, student / ANN), with the bytes per token."""
    memory = table["memory_table"]
    lines = ["| arithmetic | convention | student mJ/token | ANN mJ/token | student / ANN |", "|---|---|---|---|---|"]
    for row in table["rows"]:
        lines.append(f"| {row['precision']} | {CONVENTIONS[row['convention']]} | {row['student_mj']:.3e} | "
                     f"{row['ann_mj']:.3e} | {100 * row['ratio']:.2f}% |")
    reads = "; ".join(f"{p} weights: student {b['student'] / 1e6:.2f} MB, ANN {b['ann'] / 1e6:.2f} MB"
                      for p, b in table["bytes_per_token"].items())
    lines.append(f"\nBytes read per token ({reads}); SRAM {memory['sram_pj_per_byte']} pJ/byte, DRAM "
                 f"{memory['dram_pj_per_byte']} pJ/byte (Horowitz, ISSCC 2014); arithmetic: float32 MAC 4.6 / add 0.9 "
                 f"pJ, int8 MAC 0.23 / add 0.03 pJ (same source).")
    return "\n".join(lines)


def honest_cost(student: nn.Module, input_ids: torch.LongTensor, ann: nn.Module | None = None,
                memory: MemoryTable = MemoryTable()) -> dict:
    """:func:`cost_table` of a student against ``ann`` (default: the ANN of the student's exact shape,
    :func:`~bispikclm.ann.same_shape_ann`) on ``input_ids`` ``[B, N]``; ``format_cost_table`` prints it."""
    ann = same_shape_ann(student.config) if ann is None else ann
    return cost_table(count_operations(student, input_ids, name="student"),
                      count_operations(ann, input_ids, name="ANN"), memory)


def format_report(report: dict) -> str:
    """The report as a short plain-text table: energy per token by part, ratio and formula."""
    s, a = report["student"], report["ann"]
    rows = [f"{'part':<10} {'student mJ/token':>17} {'ANN mJ/token':>13}"]
    for part in PARTS:
        if part in s["parts"] or part in a["parts"]:
            rows.append(f"{part:<10} {s['parts'].get(part, {}).get('mj_per_token', 0):17.3e} "
                        f"{a['parts'].get(part, {}).get('mj_per_token', 0):13.3e}")
    rows.append(f"{'total':<10} {s['energy_mj_per_token']:17.3e} {a['energy_mj_per_token']:13.3e}")
    f = report["formula"]
    outside = ", ".join(f"{k} {100 * v:.2f}%" for k, v in sorted(f["terms_outside"].items(), key=lambda kv: -kv[1]))
    table = report["energy_table"]
    rows += [f"student / ANN = {100 * report['ratio']:.2f}%  (T = {report['time_steps']}, {report['tokens']} tokens, "
             f"{table['name']}: MAC {table['mac_pj']} pJ, AC {table['ac_pj']} pJ)",
             f"formula (E_AC/E_MAC)·T·rate = {100 * f['ratio']:.2f}% at rate {f['rate']:.3f} (binary operands "
             f"alone: {f['binary_operand_rate']:.3f}; integer counts of P·V raise it), covering "
             f"{100 * f['coverage']:.1f}% of the ANN; outside it: {outside}",
             f"mean firing rate of all neurons: {report['firing_rates']['overall']:.3f}"]
    if "cost_table" in report:
        rows += ["", "Both conventions, float32 and int8 arithmetic, with memory traffic:",
                 format_cost_table(report["cost_table"])]
    return "\n".join(rows)


def report_json(report: dict) -> str:
    """JSON text of a report (or of several), each cost line on one line of text."""
    text = json.dumps(report, indent=1)
    return re.sub(r'\{\n\s*("part": [^{}]*?)\n\s*\}', lambda m: "{" + re.sub(r"\n\s*", " ", m.group(1)) + "}", text)


def save_report(report: dict, path: str | Path) -> None:
    """Write the report as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(report_json(report) + "\n")
