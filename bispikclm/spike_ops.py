"""Products whose left operand is spikes, stored compactly for backward.

``torch.nn.functional.linear`` and ``torch.matmul`` keep their float inputs for the backward pass; a spike
tensor holds only 0/1 (or small integer counts), so these functions keep it as ``bool`` (or ``int16``) and
cast it back when the gradient is needed. Forward results are the plain dense products.
"""

from __future__ import annotations

import torch
from torch import nn


def _compact(x: torch.Tensor, binary: bool) -> torch.Tensor:
    return x.to(torch.bool) if binary else x.to(torch.int16)


class _SpikeLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, binary):
        ctx.save_for_backward(_compact(x, binary), weight)
        ctx.has_bias, ctx.dtype = bias is not None, x.dtype
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        x = x.to(grad.dtype)
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w.to(weight.dtype), grad_b, None


class _SpikeMatmul(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a, b, a_binary, b_binary):
        ctx.save_for_backward(_compact(a, a_binary), _compact(b, b_binary))
        return torch.matmul(a, b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = grad @ b.to(grad.dtype).transpose(-1, -2) if ctx.needs_input_grad[0] else None
        grad_b = a.to(grad.dtype).transpose(-1, -2) @ grad if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None


def spike_matmul(a: torch.Tensor, b: torch.Tensor, a_binary: bool = True, b_binary: bool = True) -> torch.Tensor:
    """``a @ b`` for spike tensors (0/1, or integer counts when ``*_binary`` is False)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _SpikeMatmul.apply(a, b, a_binary, b_binary)
    return torch.matmul(a, b)


class _SpikeScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spikes, weight):
        ctx.save_for_backward(spikes.to(torch.bool), weight)
        return spikes * weight

    @staticmethod
    def backward(ctx, grad):
        spikes, weight = ctx.saved_tensors
        grad_spikes = grad * weight if ctx.needs_input_grad[0] else None
        grad_weight = (grad * spikes).reshape(-1, weight.shape[-1]).sum(0)
        return grad_spikes, grad_weight


def spike_scale(spikes: torch.Tensor, weight: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """``spikes * weight`` (per-channel weight over the last axis): a spike selects its weight. With ``signed``,
    ``spikes`` is a signed pair's ``[S⁺, S⁻]`` and the result ``S⁺ · weight - S⁻ · weight`` has ``weight``'s width."""
    if signed:
        half = weight.shape[-1]
        scaled = spike_scale(spikes, signed_weight(weight))
        return scaled[..., :half] + scaled[..., half:]
    if torch.is_grad_enabled() and (spikes.requires_grad or weight.requires_grad):
        return _SpikeScale.apply(spikes, weight)
    return spikes * weight


def signed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[W, -W]`` along the input axis: the weight a signed neuron pair's spikes ``[S⁺, S⁻]`` read, so that
    ``[W, -W] · [S⁺, S⁻] = W·S⁺ - W·S⁻`` (each spike adds or subtracts one weight)."""
    return torch.cat([weight, -weight], dim=-1)


def net_spikes(spikes: torch.Tensor) -> torch.Tensor:
    """A signed pair's ``[S⁺, S⁻]`` (last axis) as ``S⁺ - S⁻``: what the layers after it read, per channel."""
    half = spikes.shape[-1] // 2
    return spikes[..., :half] - spikes[..., half:]


class SpikeLinear(nn.Linear):
    """``nn.Linear`` fed by spikes (``binary=True``) or integer spike counts (``binary=False``).

    Same forward as ``nn.Linear``; the input is kept for backward as bool / int16 instead of float. With
    ``signed=True`` the input is a signed neuron pair's ``[S⁺, S⁻]`` (``2 · in_features`` binary channels) and the
    layer computes ``W·S⁺ - W·S⁻`` with its one weight ``W`` (:func:`signed_weight`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, binary: bool = True,
                 signed: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.binary, self.signed = binary, bool(signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = signed_weight(self.weight) if self.signed else self.weight
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _SpikeLinear.apply(x, weight, self.bias, self.binary)
        return nn.functional.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binary={self.binary}" + (", signed=True" if self.signed else "")
