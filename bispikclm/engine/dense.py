"""Batched prefill: the event-driven linear layers' integer sums as one dense integer matrix product.

For ``N`` prompt tokens at once, :func:`linear_spikes` multiplies the 0/1 spikes ``[N * T, in]`` (int8) by the
integer weight rows ``[in, out]`` (int8; 4-bit rows widened to int8) with ``torch._int_mm`` (int32 sums), adds
the bias and scales: every sum is the same integer the event-driven kernel forms by adding the rows of the
inputs that fired, so the currents are the same bits. A product of 0/1 spikes with integer weights performs
no multiplication the model needs: each output is still the accumulation of the weight rows its spikes select;
the dense product is one way for a CPU to run that accumulation for many tokens at once (its integer SIMD units
read each weight once per block of tokens). :func:`linear_counts` does the same for the attention counts, split
into base-128 digits (of either sign: signed V makes them signed) so each factor fits int8. The other kernels are :mod:`bispikclm.engine.kernels`' own, so
this module is a drop-in kernel set for the engine's per-kernel path.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import gate_current, head_int8, head_nibbles, lif, residual_add, sfsa  # noqa: F401 (kernel set)
from .packing import unpack, unpack_nibbles

DIGIT = 128          # counts are split into digits 0..127 (int8) of this base


def _int8_rows(weight: np.ndarray, n_out: int) -> torch.Tensor:
    """The weight rows ``[in, n_out]`` as an int8 tensor (4-bit rows unpacked)."""
    return torch.from_numpy(unpack_nibbles(weight, n_out) if weight.dtype == np.uint8 else weight)


def _finish(acc: torch.Tensor, bias: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out = float32(acc + bias) * scale`` with the int32 sums ``acc`` ``[N * T, out]``, as the kernels finish."""
    total = (acc + torch.from_numpy(bias)).numpy()
    out[...] = (total.astype(np.float32) * scale).reshape(out.shape)


def linear_spikes(spikes: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """:func:`bispikclm.engine.reference.linear_spikes` for integer weights (int8, or 4-bit rows as uint8) by one
    dense int8 product; the same bits."""
    n_in = weight.shape[0]
    fired = unpack(spikes, n_in).reshape(-1, n_in).view(np.int8)
    _finish(torch._int_mm(torch.from_numpy(fired), _int8_rows(weight, bias.shape[0])), bias, scale, out)


def linear_counts(counts: np.ndarray, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                  out: np.ndarray) -> None:
    """:func:`bispikclm.engine.reference.linear_counts` for integer weights by dense int8 products, one per
    base-128 digit of the counts (``sum_j 128^j (digit_j W)``, in int32 arithmetic like the kernels' sums). The
    digits of a negative count are negative (remainder and quotient truncate towards zero), in [-127, 127]."""
    rows = _int8_rows(weight, bias.shape[0])
    rest = torch.from_numpy(counts.reshape(-1, counts.shape[-1]))
    acc, place = torch.zeros((rest.shape[0], bias.shape[0]), dtype=torch.int32), 1
    while True:
        acc += place * torch._int_mm(torch.fmod(rest, DIGIT).to(torch.int8), rows)
        rest = torch.div(rest, DIGIT, rounding_mode="trunc")
        if not bool(rest.any()):
            break
        place *= DIGIT
    _finish(acc, bias, scale, out)
