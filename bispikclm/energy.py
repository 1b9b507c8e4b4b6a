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
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from .ann import same_shape_ann
from .errors import UserError
from .modeling import NEURON_GROUP_OF, BiSpikCLMForCausalLM
from .neurons import FiringRateRecorder, LIFNeuron
from .tracing import blocks_prefix, place, sections, trace_ops

#: Energy of each kind of operation, in units of the table's ``mac_pj`` and ``ac_pj``.
KIND_COST = {
    "mac": (1, 0),              # multiply-accumulate with a real-valued input
    "ac": (0, 1),               # accumulate driven by a spike (or by one unit of an integer count)
    "bias_add": (0, 1),         # bias added to a product's output
    "neuron_update": (1, 1),    # U = β·U + I (one MAC), U >= θ (one comparison)
    "spike_reset": (0, 1),      # U -= θ after a spike
    "elementwise_add": (0, 1),  # residual additions, embedding sum, time sum
    "elementwise_mul": (1, 0),  # input gain, 1/T of the time average, LayerNorm (4 per element)
    "and_popcount": (0, 0),     # bit operations of Q·Kᵀ, charged through its AC line
    "gate": (0, 0),             # a binary gate routing a current or a spike (gated SFFN): a select or an AND
    "lookup": (0, 0),           # embedding rows read from memory
}
PARTS = ("embedding", "attention", "ffn", "neurons", "residual", "head")


@dataclass(frozen=True)
class EnergyTable:
    """Energy per 32-bit operation, in picojoules (default: 45 nm CMOS, Horowitz, ISSCC 2014)."""

    name: str = "45 nm CMOS, 32-bit float (Horowitz 2014)"
    mac_pj: float = 4.6
    ac_pj: float = 0.9

    def pj(self, kind: str) -> float:
        """Energy of one operation of ``kind`` (a key of :data:`KIND_COST`)."""
        macs, acs = KIND_COST[kind]
        return macs * self.mac_pj + acs * self.ac_pj


def load_energy_table(path: str | Path) -> EnergyTable:
    """An :class:`EnergyTable` from a YAML or JSON file with keys ``name``, ``mac_pj``, ``ac_pj``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read energy table {path}: {err}") from None
    if not isinstance(data, dict) or not {"mac_pj", "ac_pj"} <= set(data) or set(data) - {"name", "mac_pj", "ac_pj"}:
        raise UserError(f"energy table {path} must hold keys mac_pj, ac_pj (and optionally name), got {data!r}")
    return EnergyTable(name=str(data.get("name", Path(path).stem)), mac_pj=float(data["mac_pj"]),
                       ac_pj=float(data["ac_pj"]))


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
    if max_length is not None and seq_len > max_length:
        raise UserError(f"sequence length {seq_len} is beyond the model's {max_length} positions")
    path = Path(path) if path is not None else default_text_path()
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
    entries = lookup_entries + _product_entries(trace, modules, blocks) + neuron_entries
    if is_student:
        entries += _student_elementwise(model, tokens)
    rates = recorder.rates()
    overall = recorder.overall() if neurons else None
    return CostCount(model=name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
                     tokens=tokens, time_steps=getattr(model.config, "time_steps", None) if is_student else None,
                     entries=entries, firing_rates=rates, overall_firing_rate=overall)


def load_checkpoint(path: str | Path):
    """``(model, tokenizer)`` saved with ``save_pretrained`` in folder ``path`` (a BiSpikCLM or any HF causal LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a saved model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"no tokenizer saved beside the model in {path}: {str(err).splitlines()[0]}") from None
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), tokenizer


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
    }


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
    return "\n".join(rows)


def report_json(report: dict) -> str:
    """JSON text of a report (or of several), each cost line on one line of text."""
    text = json.dumps(report, indent=1)
    return re.sub(r'\{\n\s*("part": [^{}]*?)\n\s*\}', lambda m: "{" + re.sub(r"\n\s*", " ", m.group(1)) + "}", text)


def save_report(report: dict, path: str | Path) -> None:
    """Write the report as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(report_json(report) + "\n")
