"""The MatMul-free audit: run inference and list every operation a fully binary spiking path must not contain.

An operation is reported when it is a product (matrix product or element-wise multiplication) of two tensors that
are neither binary nor integer counts, a softmax (fused attention kernels included), an exponential-like function
(exp, log, pow, sigmoid, tanh, erf/GELU, SiLU), a division (or square root) or a normalization. Each finding
carries its section (``embedding``, ``blocks``, ``head``), module path, operator, operand kinds and count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .tracing import OpRecord, blocks_prefix, sections, trace_ops

SECTIONS = ("embedding", "blocks", "head")


@dataclass
class Finding:
    """Calls of one offending operator at one module path."""

    section: str
    module: str
    op: str
    problem: str
    kinds: tuple[str, ...]
    count: int


@dataclass
class AuditResult:
    """All findings of one audited forward pass."""

    model: str
    tokens: int
    findings: list[Finding]

    def in_section(self, section: str) -> list[Finding]:
        return [f for f in self.findings if f.section == section]

    @property
    def blocks_clean(self) -> bool:
        return not self.in_section("blocks")

    def to_dict(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "blocks_clean": self.blocks_clean,
                "clean": {s: not self.in_section(s) for s in SECTIONS},
                "findings": [asdict(f) for f in self.findings]}


def problem(record: OpRecord) -> str | None:
    """Why ``record`` has no place on a binary spiking path, or ``None`` if it has one."""
    if record.forbidden:
        return record.forbidden
    if (record.is_matmul or record.is_mul) and record.kinds.count("float") >= 2:
        return "float product"
    return None


@torch.no_grad()
def audit(model: nn.Module, input_ids: torch.LongTensor, name: str | None = None) -> AuditResult:
    """Run ``model`` on ``input_ids`` ``[B, N]`` and collect every offending operation (see module doc)."""
    model.eval()
    with trace_ops(model) as trace:
        model(input_ids=input_ids, use_cache=False)
    counts = Counter()
    for record, section, _, _ in sections(trace.records, blocks_prefix(model)):
        why = problem(record)
        if why:
            counts[(section, record.module, record.op, why, record.kinds)] += 1
    findings = [Finding(*key, count=n) for key, n in counts.items()]
    return AuditResult(model=name or type(model).__name__, tokens=input_ids.numel(), findings=findings)


def format_audit(result: AuditResult, head_hint: str = "") -> str:
    """Findings as a table, then one verdict line per section (the head on its own line)."""
    lines = [f"audit of {result.model} on {result.tokens} tokens"]
    if result.findings:
        lines.append(f"{'section':<10} {'count':>5}  {'problem':<14} {'operator':<28} {'module':<44} operands")
        for f in result.findings:
            lines.append(f"{f.section:<10} {f.count:>5}  {f.problem:<14} {f.op:<28} {f.module:<44} "
                         f"{' x '.join(f.kinds)}")
    for section in SECTIONS:
        found = result.in_section(section)
        verdict = "clean" if not found else (f"{sum(f.count for f in found)} offending calls: "
                                            + ", ".join(sorted({f.problem for f in found})))
        hint = f" ({head_hint})" if section == "head" and found and head_hint else ""
        lines.append(f"{section}: {verdict}{hint}")
    return "\n".join(lines)
