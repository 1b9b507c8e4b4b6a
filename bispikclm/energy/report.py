"""Energy reports of operation counts (:mod:`.counting`): energy per token by part against an ANN, the approximate
formula beside the count, and the cost table of both conventions; as plain text, Markdown or JSON.

**Honest cost** (:func:`cost_table`). :func:`energy_report` follows the paper's convention: 32-bit float
arithmetic only. :func:`cost_table` also prices the same counts

* at int8 arithmetic (both models on int8 weights, as ``quantize_`` and an int8 ANN build run them), and
* with the memory traffic of batch-1 decoding: every token reads the weight rows its products use (the student
  only the rows of inputs that fired at any of the T steps, the ANN all of them), the embedding rows, and the
  K/V cache of all earlier positions (one bit per key/value spike for the student, one weight-sized number per
  entry for the ANN), at a cited energy per byte of on-chip SRAM or off-chip DRAM (:class:`MemoryTable`).

Every table lists both conventions: the paper's (the blocks, arithmetic only) and everything counted.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..ann import same_shape_ann
from ..cost_tables import BYTES_PER_WEIGHT, KIND_COST, PARTS, PRECISIONS, EnergyTable, MemoryTable
from ..errors import UserError
from .counting import CostCount, count_operations, firing_rates_by_layer


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
