"""Spikes packed into 64-bit words, and int8 weights on a power-of-two grid.

Packed layout: a spike tensor ``[..., D]`` of 0/1 becomes ``[..., ceil(D / 64)]`` ``uint64``; spike ``d`` is bit
``d % 64`` of word ``d // 64``. The engine keeps every spike tensor of a token in this form, ``[N, T, W]``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..spike_ops import SpikeLinear

INT8_MAX = 127


def words(features: int) -> int:
    """Number of 64-bit words that hold ``features`` spikes."""
    return (features + 63) // 64


def pack(spikes: np.ndarray) -> np.ndarray:
    """0/1 spikes ``[..., D]`` (any dtype) -> packed ``[..., ceil(D/64)]`` uint64."""
    d = spikes.shape[-1]
    padded = np.zeros(spikes.shape[:-1] + (words(d) * 64,), dtype=np.uint8)
    padded[..., :d] = spikes != 0
    return np.ascontiguousarray(np.packbits(padded, axis=-1, bitorder="little")).view("<u8")


def unpack(packed: np.ndarray, features: int) -> np.ndarray:
    """Packed ``[..., W]`` uint64 -> bool spikes ``[..., features]``."""
    bits = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :features].astype(bool)


def power_of_two_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-row scale ``2^ceil(log2(max|w| / 127))`` of a weight ``[out, in]`` (1 for an all-zero row).

    With a power-of-two scale every sum of up to ``2^24 / 127`` weights is exact in float32, in any order, so an
    event-driven sum and a dense float32 product of the quantized weights give the same bits."""
    peak = weight.detach().abs().amax(dim=1).double()
    scale = torch.exp2(torch.ceil(torch.log2(peak / INT8_MAX)))
    return torch.where(peak > 0, scale, torch.ones_like(scale)).float()


@torch.no_grad()
def quantize_(model: torch.nn.Module, head: bool = False) -> torch.nn.Module:
    """Quantize every :class:`SpikeLinear` of ``model`` in place to int8 values times a power-of-two scale per
    output row (the bias is rounded to the same grid), so that the PyTorch model and the packed engine with
    ``int8=True`` compute the same currents bit for bit. With ``head``, the LM head is quantized too (and with
    it the tied token embedding); otherwise the embedding, LayerNorm and head stay float.
    Idempotent: quantizing a quantized model changes nothing. Returns ``model``."""
    lm_head = model.get_output_embeddings() if head else None
    for module in model.modules():
        if isinstance(module, SpikeLinear) or module is lm_head:
            scale = power_of_two_scales(module.weight)[:, None]
            module.weight.copy_(torch.round(module.weight / scale).clamp_(-INT8_MAX, INT8_MAX) * scale)
            if module.bias is not None:
                module.bias.copy_(torch.round(module.bias / scale[:, 0]) * scale[:, 0])
    return model


def is_int8(linear: torch.nn.Linear) -> bool:
    """Whether the weights of ``linear`` are on the int8 grid of :func:`quantize_`."""
    weight = linear.weight.detach()
    scale = power_of_two_scales(weight)[:, None]
    return bool(torch.equal(torch.round(weight / scale).clamp(-INT8_MAX, INT8_MAX) * scale, weight))


def int8_weights(linear: torch.nn.Linear, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact int8 form of a quantized linear layer: ``(weight_t [in, out] int8, bias [out] int32,
    scale [out] float32)`` with ``linear.weight == weight_t.T * scale`` and ``linear.bias == bias * scale``.

    Raises :class:`UserError` when the weights are not on the grid of :func:`quantize_`."""
    weight = linear.weight.detach().float()
    bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
    scale = power_of_two_scales(weight)
    q = torch.round(weight / scale[:, None])
    qb = torch.round(bias / scale)
    if (q.abs().max() > INT8_MAX or not torch.equal(q * scale[:, None], weight)
            or not torch.equal(qb * scale, bias) or qb.abs().max() >= 2 ** 24):
        raise UserError(f"{name} is not int8-quantized; call bispikclm.engine.quantize_(model) first "
                        f"(or load the engine with int8=False)")
    return (q.t().contiguous().to(torch.int8).numpy(), qb.to(torch.int32).numpy(), scale.numpy())
