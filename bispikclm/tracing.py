"""Record the operators a forward pass actually runs, with the module that ran them and what their operands hold.

This is how the library checks its own claims ("every matrix product is fed by spikes", "no softmax, exp or
division in the blocks"): it intercepts the ATen operators under a ``TorchDispatchMode`` instead of trusting the
Python source. Each record names the operator, the innermost module path, and for each tensor operand whether it
is ``binary`` (only 0/1), ``count`` (non-negative integers), ``signed`` (integers, some negative: the net spikes
``S⁺ - S⁻`` of signed neuron pairs, or sums of them), ``scalar`` (a Python number or a 0-d tensor) or ``float``;
for the operands of matrix products that hold spikes (:data:`SPIKE_KINDS`) it also keeps their sum of absolute
values, the number of spikes actually fired, from which the cost model counts accumulates.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

MATMUL_OPS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.matmul.default,
              aten.linear.default, aten._scaled_mm.default, aten.dot.default, aten.mv.default}
BIAS_MATMUL_OPS = {aten.addmm.default, aten.baddbmm.default}
#: Fused attention kernels: each runs a softmax inside.
FUSED_ATTENTION_OPS = {aten._scaled_dot_product_flash_attention.default,
                       aten._scaled_dot_product_flash_attention_for_cpu.default,
                       aten._scaled_dot_product_efficient_attention.default,
                       aten._scaled_dot_product_cudnn_attention.default}
#: Operators that have no place inside the spiking blocks at inference.
FORBIDDEN_OPS = {
    "softmax": {aten._softmax.default, aten._log_softmax.default, aten._safe_softmax.default, *FUSED_ATTENTION_OPS},
    "exp": {aten.exp.default, aten.exp2.default, aten.expm1.default, aten.sigmoid.default, aten.tanh.default,
            aten.log.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.erf.default, aten.gelu.default,
            aten.silu.default},
    "division": {aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.reciprocal.default,
                 aten.rsqrt.default, aten.sqrt.default},
    "normalization": {aten.native_layer_norm.default, aten.native_batch_norm.default,
                      aten._native_batch_norm_legit_no_training.default, aten.native_group_norm.default,
                      aten.var_mean.correction, aten.var.correction},
}
MUL_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar}
#: Operand kinds that hold spikes: 0/1, non-negative integer counts, or integers of either sign.
SPIKE_KINDS = ("binary", "count", "signed")


def operand_kind(x) -> str:
    """``binary``, ``count``, ``signed``, ``scalar`` or ``float`` for one operand (``other`` for non-numeric
    values)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return "scalar"
    if not isinstance(x, torch.Tensor):
        return "other"
    if x.dim() == 0:
        return "scalar"
    if x.dtype == torch.bool or x.numel() == 0:
        return "binary"
    if x.dtype.is_floating_point and not bool((x == torch.round(x)).all()):
        return "float"
    if bool(((x == 0) | (x == 1)).all()):
        return "binary"
    if bool((x >= 0).all()):
        return "count"
    return "signed" if float(x.abs().max()) <= 2 ** 16 else "float"    # not a mask of -inf or finfo.min


@dataclass
class OpRecord:
    """One operator call: name, module path, operand kinds (tensor and scalar operands in order), shapes.

    For matrix products, ``sums`` holds each operand's sum of absolute values when it holds spikes
    (:data:`SPIKE_KINDS`; ``None`` otherwise)
    and ``bias`` says whether the operator also added a bias (``addmm``, ``baddbmm``)."""

    op: str
    module: str
    kinds: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    is_matmul: bool = False
    forbidden: str | None = None
    is_mul: bool = False
    sums: tuple[float | None, ...] = ()
    bias: bool = False


@dataclass
class OpTrace:
    """All operator calls of one traced run."""

    records: list[OpRecord] = field(default_factory=list)

    def within(self, prefix: str) -> list[OpRecord]:
        return [r for r in self.records if r.module == prefix or r.module.startswith(prefix + ".")]

    def matmuls(self, prefix: str = "") -> list[OpRecord]:
        return [r for r in (self.within(prefix) if prefix else self.records) if r.is_matmul]

    def forbidden(self, prefix: str = "") -> list[OpRecord]:
        return [r for r in (self.within(prefix) if prefix else self.records) if r.forbidden]

    def multiplications(self, prefix: str = "") -> list[OpRecord]:
        return [r for r in (self.within(prefix) if prefix else self.records) if r.is_mul]

    def summary(self, prefix: str = "") -> Counter:
        recs = self.within(prefix) if prefix else self.records
        return Counter((r.module, r.op, r.kinds) for r in recs)


def _matmul_operands(func, args) -> list:
    """The two multiplied operands of a matrix-product operator (bias terms of addmm/baddbmm dropped)."""
    if func in (aten.addmm.default, aten.baddbmm.default):
        return [args[1], args[2]]
    return list(args[:2])


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: OpTrace, stack: list[str]) -> None:
        super().__init__()
        self.trace, self.stack = trace, stack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        forbidden = next((name for name, ops in FORBIDDEN_OPS.items() if func in ops), None)
        is_matmul, is_mul = func in MATMUL_OPS, func in MUL_OPS
        if is_matmul or forbidden or is_mul:
            operands = _matmul_operands(func, args) if is_matmul else tree_flatten((args, kwargs))[0]
            operands = [a for a in operands if isinstance(a, (torch.Tensor, int, float)) and not isinstance(a, bool)]
            kinds = tuple(operand_kind(a) for a in operands)
            sums = tuple(float(a.abs().sum()) if is_matmul and kind in SPIKE_KINDS else None
                         for a, kind in zip(operands, kinds))
            self.trace.records.append(OpRecord(
                op=str(func.overloadpacket.__name__), module=self.stack[-1] if self.stack else "", kinds=kinds,
                shapes=tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else () for a in operands),
                is_matmul=is_matmul, forbidden=forbidden, is_mul=is_mul, sums=sums, bias=func in BIAS_MATMUL_OPS))
        return out


def blocks_prefix(model: nn.Module) -> str:
    """Path of the model's list of blocks (``model.layers``, ``model.decoder.layers``, ``transformer.h``...):
    the ``ModuleList`` holding the most parameters."""
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of blocks")
    return max(lists)[1]


def place(path: str, blocks: str) -> tuple[int | None, str]:
    """``(block index, path inside the block)`` for a module path; ``(None, path)`` outside the blocks."""
    if path.startswith(blocks + "."):
        index, _, rest = path[len(blocks) + 1:].partition(".")
        return int(index), rest
    return None, path


def sections(records: list[OpRecord], blocks: str):
    """Yield ``(record, section, layer, name)`` with section ``embedding`` (before the first block), ``blocks``
    or ``head`` (after), ``layer`` the block index (``None`` outside) and ``name`` the path inside the block."""
    seen_block = False
    for record in records:
        layer, name = place(record.module, blocks)
        seen_block |= layer is not None
        yield record, ("blocks" if layer is not None else "head" if seen_block else "embedding"), layer, name


class trace_ops:
    """Context manager recording the matrix products, multiplications and forbidden operators run inside it.

    Example::

        with trace_ops(model) as trace:
            model(input_ids)
        bad = [r for r in trace.matmuls("model.layers") if "float" in r.kinds]
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.trace, self._stack, self._handles = model, OpTrace(), [], []

    def __enter__(self) -> OpTrace:
        def enter(name: str):
            return lambda module, args: self._stack.append(name)

        def leave(module, args, output) -> None:
            self._stack.pop()

        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(enter(name)))
            self._handles.append(module.register_forward_hook(leave))
        self._mode = _Recorder(self.trace, self._stack)
        self._mode.__enter__()
        return self.trace

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
