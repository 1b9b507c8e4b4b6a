"""Leaky integrate-and-fire neurons with soft reset, and their surrogate gradients.

Dynamics (METHOD §1), run over the leading time axis of the input current ``I`` of shape ``[T, *]``::

    U[t] = beta * U[t-1] + I[t] - threshold * S[t-1]
    S[t] = Heaviside(U[t] - threshold)            # S in {0, 1}

Two implementations with the same signature and the same outputs and gradients:

* :func:`lif_reference`: a plain loop; autograd keeps every intermediate of every step.
* :func:`lif_lean`: a custom autograd function that keeps one tensor, the membrane potential ``U``,
  and runs the backward recursion by hand (spikes are re-derived as ``U >= threshold``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

SURROGATES = ("arctan", "sigmoid", "triangle")
DEFAULT_ALPHA = {"arctan": 2.0, "sigmoid": 4.0, "triangle": 1.0}


def surrogate_grad(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """Derivative of the smooth stand-in for ``Heaviside(x)`` used in the backward pass.

    * arctan:   sg(x) = arctan(pi/2 * alpha * x) / pi + 1/2,    sg' = alpha/2 / (1 + (pi/2 * alpha * x)^2)
    * sigmoid:  sg(x) = sigmoid(alpha * x),                     sg' = alpha * sg * (1 - sg)
    * triangle: sg' = alpha * max(0, 1 - alpha * |x|)
    """
    if surrogate == "arctan":
        return (alpha / 2) / (1 + (math.pi / 2 * alpha * x).square())
    if surrogate == "sigmoid":
        s = torch.sigmoid(alpha * x)
        return alpha * s * (1 - s)
    if surrogate == "triangle":
        return alpha * (1 - alpha * x.abs()).clamp_min(0)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


class Heaviside(torch.autograd.Function):
    """``x >= 0`` as 0/1 in the forward pass, a surrogate derivative in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None


def lif_reference(current: torch.Tensor, beta: float, threshold: float, surrogate: str = "arctan",
                  alpha: float = 2.0, detach_reset: bool = False) -> torch.Tensor:
    """Plain multi-step LIF: ``current`` ``[T, *]`` -> spikes ``[T, *]`` (0/1, same dtype)."""
    u = torch.zeros_like(current[0])
    s = torch.zeros_like(current[0])
    spikes = []
    for t in range(current.shape[0]):
        reset = s.detach() if detach_reset else s
        u = beta * u + current[t] - threshold * reset
        s = Heaviside.apply(u - threshold, surrogate, alpha)
        spikes.append(s)
    return torch.stack(spikes)


@torch.no_grad()
def lif_membrane(current: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """Membrane potential ``U`` ``[T, *]`` of the LIF neuron (no autograd); spikes are ``U >= threshold``."""
    membrane = torch.empty_like(current)
    u = current[0]
    membrane[0] = u
    for t in range(1, current.shape[0]):
        # same operation order as lif_reference, so both give bit-identical potentials
        u = beta * u + current[t] - threshold * (u >= threshold).to(u.dtype)
        membrane[t] = u
    return membrane


def _lif_backward(membrane: torch.Tensor, grad_spikes: torch.Tensor, beta: float, threshold: float,
                  surrogate: str, alpha: float, detach_reset: bool) -> torch.Tensor:
    """Backpropagation through time of the LIF recursion, from the membrane potential alone."""
    grad_current = torch.empty_like(membrane)
    grad_u_next = None
    for t in reversed(range(membrane.shape[0])):
        grad_s = grad_spikes[t]
        if grad_u_next is not None and not detach_reset:
            grad_s = grad_s - threshold * grad_u_next
        grad_u = grad_s * surrogate_grad(membrane[t] - threshold, surrogate, alpha)
        if grad_u_next is not None:
            grad_u = grad_u + beta * grad_u_next
        grad_current[t] = grad_u
        grad_u_next = grad_u
    return grad_current


class _LeanLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, beta, threshold, surrogate, alpha, detach_reset):
        membrane = lif_membrane(current, beta, threshold)
        ctx.save_for_backward(membrane)
        ctx.params = (beta, threshold, surrogate, alpha, detach_reset)
        return (membrane >= threshold).to(current.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (membrane,) = ctx.saved_tensors
        return _lif_backward(membrane, grad_spikes, *ctx.params), None, None, None, None, None


class _LeanLIFLevels(torch.autograd.Function):
    """LIF driven by ``scale * levels`` with small integer ``levels``: keeps the levels as uint8/int16 and
    recomputes the membrane potential in backward (attention scores: integers in [0, head_dim])."""

    @staticmethod
    def forward(ctx, levels, scale, beta, threshold, surrogate, alpha, detach_reset):
        current = levels * scale
        membrane = lif_membrane(current, beta, threshold)
        small = torch.uint8 if float(levels.max()) <= 255 and float(levels.min()) >= 0 else torch.int16
        ctx.save_for_backward(levels.to(small))
        ctx.params = (beta, threshold, surrogate, alpha, detach_reset)
        ctx.scale, ctx.dtype = scale, levels.dtype
        return (membrane >= threshold).to(levels.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (levels,) = ctx.saved_tensors
        beta, threshold = ctx.params[:2]
        membrane = lif_membrane(levels.to(ctx.dtype) * ctx.scale, beta, threshold)
        grad_current = _lif_backward(membrane, grad_spikes, *ctx.params)
        return grad_current * ctx.scale, None, None, None, None, None, None


def lif_lean(current: torch.Tensor, beta: float, threshold: float, surrogate: str = "arctan",
             alpha: float = 2.0, detach_reset: bool = False) -> torch.Tensor:
    """Multi-step LIF with the same outputs and gradients as :func:`lif_reference`, run without autograd's
    per-step graph: it keeps one tensor, the membrane potential ``[T, *]``, and runs the backward recursion by
    hand (the reference keeps a graph of about five nodes per time step)."""
    if not torch.is_grad_enabled() or not current.requires_grad:
        return (lif_membrane(current, beta, threshold) >= threshold).to(current.dtype)
    return _LeanLIF.apply(current, beta, threshold, surrogate, alpha, detach_reset)


BACKENDS = {"reference": lif_reference, "lean": lif_lean}


class LIFNeuron(nn.Module):
    """Multi-step LIF neuron with soft reset. Input currents ``[T, *]`` -> binary spikes ``[T, *]``.

    Args:
        beta: leak, in (0, 1).
        threshold: firing threshold, > 0.
        surrogate: ``"arctan"`` (default), ``"sigmoid"`` or ``"triangle"``.
        alpha: sharpness of the surrogate; ``None`` takes the surrogate's default.
        detach_reset: stop gradients through the reset term.
        backend: ``"lean"`` (default) or ``"reference"``.

    When :attr:`record` is set, each call stores the firing rate (mean spike value over the valid entries)
    in :attr:`firing_rate` and the number of spikes and of neuron updates in :attr:`spike_count` and
    :attr:`update_count`.
    """

    def __init__(self, beta: float = 0.5, threshold: float = 1.0, surrogate: str = "arctan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "lean") -> None:
        super().__init__()
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
        self.beta, self.threshold, self.surrogate = float(beta), float(threshold), surrogate
        self.alpha = float(DEFAULT_ALPHA[surrogate] if alpha is None else alpha)
        self.detach_reset, self.backend = detach_reset, backend
        self.record = False
        self.firing_rate: torch.Tensor | None = None
        self.spike_count = 0.0
        self.update_count = 0.0

    def forward(self, current: torch.Tensor, valid: torch.Tensor | None = None,
                input_scale: float | None = None) -> torch.Tensor:
        """``current`` ``[T, *]``; ``valid`` (optional, broadcastable to ``current``) marks the entries
        that count towards the recorded firing rate (e.g. the causal part of an attention map).

        With ``input_scale``, ``current`` holds small non-negative integers (levels) and the neuron is driven
        by ``input_scale * current``; the lean backend then keeps the levels as uint8 instead of a float
        membrane."""
        args = (self.beta, self.threshold, self.surrogate, self.alpha, self.detach_reset)
        if input_scale is None:
            spikes = BACKENDS[self.backend](current, *args)
        elif self.backend == "lean" and torch.is_grad_enabled() and current.requires_grad:
            spikes = _LeanLIFLevels.apply(current, input_scale, *args)
        else:
            spikes = BACKENDS[self.backend](current * input_scale, *args)
        if self.record:
            with torch.no_grad():
                if valid is None:
                    fired, total = spikes.sum(), float(spikes.numel())
                else:
                    valid = valid.to(spikes.dtype).expand_as(spikes)
                    fired, total = (spikes * valid).sum(), float(valid.sum())
                self.spike_count += float(fired)
                self.update_count += total
                self.firing_rate = fired.float() / max(total, 1.0)
        return spikes

    def reset_stats(self) -> None:
        self.firing_rate, self.spike_count, self.update_count = None, 0.0, 0.0

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, threshold={self.threshold}, surrogate={self.surrogate}, alpha={self.alpha}, "
                f"detach_reset={self.detach_reset}, backend={self.backend}")
