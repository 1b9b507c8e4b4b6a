"""Spikes packed into 64-bit words, and int8 or 4-bit weights on a power-of-two grid.

Packed layout: a spike tensor ``[..., D]`` of 0/1 becomes ``[..., ceil(D / 64)]`` ``uint64``; spike ``d`` is bit
``d % 64`` of word ``d // 64``. The engine keeps every spike tensor of a token in this form, ``[N, T, W]``.

Quantized weights are integers times a power of two: int8 (``bits=8``, values in ``[-127, 127]``) or 4-bit
(``bits=4``, values in ``[-7, 7]``), one scale per output row for the blocks' linear layers. The LM head's 4-bit
form has one scale per output row and group of :data:`HEAD_GROUP` inputs, a bfloat16 number rather than a power
of two (its input is the float LayerNorm output, so no sum is exact anyway). 4-bit rows are stored two values per
byte (:func:`pack_nibbles`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..spike_ops import SpikeLinear

INT8_MAX = 127
LEVELS = {8: INT8_MAX, 4: 7}     # largest integer of each weight width (symmetric grids)
HEAD_GROUP = 32                  # inputs per scale of the 4-bit head


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


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit integers ``[..., C]`` in ``[-7, 7]`` -> ``[..., ceil(C / 2)]`` uint8: value ``c`` is stored as
    ``value + 8`` in the low nibble (even ``c``) or high nibble (odd ``c``) of byte ``c // 2``."""
    c = values.shape[-1]
    offset = np.full(values.shape[:-1] + (c + c % 2,), 8, np.uint8)
    offset[..., :c] = values.astype(np.int16) + 8
    return np.ascontiguousarray(offset[..., 0::2] | (offset[..., 1::2] << 4))


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``[..., ceil(count / 2)]`` uint8 -> int8 ``[..., count]``."""
    values = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.int8)
    values[..., 0::2] = (packed & 15).astype(np.int8) - 8
    values[..., 1::2] = (packed >> 4).astype(np.int8) - 8
    return np.ascontiguousarray(values[..., :count])


def power_of_two_scales(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-row scale ``2^ceil(log2(max|w| / L))`` of a weight ``[out, in]`` (1 for an all-zero row), with
    ``L`` the largest integer of the grid (127 for int8, 7 for 4 bits): the smallest power of two that puts
    every weight of the row on the grid without clipping.

    With a power-of-two scale every sum of up to ``2^24 / L`` weights is exact in float32, in any order, so an
    event-driven sum and a dense float32 product of the quantized weights give the same bits."""
    peak = weight.detach().abs().amax(dim=1).double()
    scale = torch.exp2(torch.ceil(torch.log2(peak / LEVELS[bits])))
    return torch.where(peak > 0, scale, torch.ones_like(scale)).float()


def _on_grid(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    limit = LEVELS[bits]
    return torch.round(weight / scale).clamp_(-limit, limit) * scale


def head_group_scales(grouped: torch.Tensor) -> torch.Tensor:
    """Scale ``[G, 1]`` of each group of a 4-bit head (``grouped`` ``[G, HEAD_GROUP]``): ``max|w| / 7`` rounded to
    bfloat16 (1 for an all-zero group). With 8 significant bits, ``7 * scale`` is exact in float32, so the scale
    of a quantized group is found again from its weights: quantizing is idempotent and the engine reads the
    model's exact values. (Measured on the quickstart student: a power-of-two scale here cost 2.4% perplexity,
    this one 0.2%.)"""
    scale = (grouped.detach().abs().amax(dim=1, keepdim=True) / LEVELS[4]).to(torch.bfloat16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _grouped(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> ``[out * in / HEAD_GROUP, HEAD_GROUP]``: one row per scale of the 4-bit head."""
    if weight.shape[1] % HEAD_GROUP:
        raise UserError(f"a 4-bit head needs a hidden size that is a multiple of {HEAD_GROUP}, "
                        f"got {weight.shape[1]}")
    return weight.reshape(-1, HEAD_GROUP)


def _check_bits(bits: int) -> None:
    if bits not in LEVELS:
        raise UserError(f"weights are quantized to {sorted(LEVELS)} bits, got bits={bits}")


@torch.no_grad()
def quantize_(model: torch.nn.Module, head: bool = False, bits: int = 8, head_bits: int | None = None
              ) -> torch.nn.Module:
    """Quantize every :class:`SpikeLinear` of ``model`` in place to ``bits``-bit integers (8 or 4) times a
    power-of-two scale per output row (the bias is rounded to the same grid), so that the PyTorch model and the
    packed engine compute the same currents bit for bit. With ``head``, the LM head is quantized too (and with it
    the tied token embedding) to ``head_bits`` (default ``bits``): int8 with a scale per row; 4 bits with a
    scale per row and group of :data:`HEAD_GROUP` inputs. Otherwise the embedding, LayerNorm and
    head stay float (a 4-bit head: see :func:`head_group_scales`). Idempotent: quantizing a quantized model
    changes nothing. Returns ``model``."""
    head_bits = bits if head_bits is None else head_bits
    _check_bits(bits)
    _check_bits(head_bits)
    lm_head = model.get_output_embeddings() if head else None
    for module in model.modules():
        if module is lm_head and head_bits == 4:
            grouped = _grouped(module.weight)
            module.weight.copy_(_on_grid(grouped, head_group_scales(grouped), 4).reshape(module.weight.shape))
        elif isinstance(module, SpikeLinear) or module is lm_head:
            width = bits if isinstance(module, SpikeLinear) else head_bits
            scale = power_of_two_scales(module.weight, width)[:, None]
            module.weight.copy_(_on_grid(module.weight, scale, width))
            if module.bias is not None:
                module.bias.copy_(torch.round(module.bias / scale[:, 0]) * scale[:, 0])
    return model


def weight_bits(linear: torch.nn.Linear, head: bool = False) -> int | None:
    """The narrowest grid of :func:`quantize_` that holds the weights of ``linear`` exactly (4, then 8), or None
    when they are on neither; ``head``: the LM head's grids (4 bits in groups of :data:`HEAD_GROUP`)."""
    weight = linear.weight.detach()
    for bits in (4, 8):
        if head and bits == 4:
            if weight.shape[1] % HEAD_GROUP:
                continue
            grouped = weight.reshape(-1, HEAD_GROUP)
            if torch.equal(_on_grid(grouped, head_group_scales(grouped), 4), grouped):
                return 4
        elif torch.equal(_on_grid(weight, power_of_two_scales(weight, bits)[:, None], bits), weight):
            return bits
    return None


def int_weights(linear: torch.nn.Linear, name: str, bits: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact integer form of a quantized linear layer: ``(weight_t [in, out] int8, bias [out] int32,
    scale [out] float32)`` with ``linear.weight == weight_t.T * scale`` and ``linear.bias == bias * scale``, the
    integers in ``[-127, 127]`` (``bits=8``) or ``[-7, 7]`` (``bits=4``).

    Raises :class:`UserError` when the weights are not on that grid of :func:`quantize_`."""
    weight = linear.weight.detach().float()
    bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
    scale = power_of_two_scales(weight, bits)
    q = torch.round(weight / scale[:, None])
    qb = torch.round(bias / scale)
    if (q.abs().max() > LEVELS[bits] or not torch.equal(q * scale[:, None], weight)
            or not torch.equal(qb * scale, bias) or qb.abs().max() >= 2 ** 24):
        raise UserError(f"{name} is not {'int8' if bits == 8 else '4-bit'}-quantized; call "
                        f"bispikclm.engine.quantize_(model{'' if bits == 8 else ', bits=4'}) first "
                        f"(or load the engine with int8=False)")
    return (q.t().contiguous().to(torch.int8).numpy(), qb.to(torch.int32).numpy(), scale.numpy())


def head_nibbles(linear: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    """Exact form of a head quantized with ``head_bits=4``: ``(weight_t [D, ceil(V/2)] uint8`` (inputs as rows,
    vocabulary packed by :func:`pack_nibbles`), ``scale [D / HEAD_GROUP, V] float32)`` with ``linear.weight[v, i]
    == value[i, v] * scale[i // HEAD_GROUP, v]``."""
    weight = linear.weight.detach().float()
    grouped = _grouped(weight)
    scale = head_group_scales(grouped)
    q = torch.round(grouped / scale).reshape(weight.shape)
    return (pack_nibbles(q.t().contiguous().to(torch.int8).numpy()),
            scale.reshape(weight.shape[0], -1).t().contiguous().numpy())
