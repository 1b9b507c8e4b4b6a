"""Leaky integrate-and-fire neurons with soft reset, and their surrogate gradients.

Dynamics (METHOD §1), run over the leading time axis of the input current ``I`` of shape ``[T, *]``::

    U[-1] = initial                               # 0 in the paper; threshold / 2 turns floor into round (QCFS)
    U[t]  = beta * U[t-1] + I[t] - threshold * S[t-1]
    S[t]  = Heaviside(U[t] - threshold)           # S in {0, 1}

``beta = 1`` is the integrate-and-fire (IF) neuron. Driven by a constant current ``I`` for ``T`` steps, an IF
neuron starting at ``initial`` in ``[0, threshold)`` fires ``clip(floor((T·I + initial) / threshold), 0, T)``
times: a ``T + 1``-level quantizer of ``I``.

Two implementations with the same signature and the same outputs and gradients:

* :func:`lif_reference`: a plain loop; autograd keeps every intermediate of every step.
* :func:`lif_lean`: a custom autograd function that keeps one tensor, the membrane potential ``U``,
  and runs the backward recursion by hand (spikes are re-derived as ``U >= threshold``).

A second firing mode, ``"count"`` (:func:`count_reference`, :func:`count_lean`), integrates a token's whole
T-step input first and then fires: ``A = initial + I[0] + ... + I[T-1]``, ``S[t] = Heaviside(A - (t + 1) ·
threshold)``, i.e. ``k = clip(floor(A / threshold), 0, T)`` binary spikes in the first ``k`` steps. It is the exact
``T + 1``-level quantizer of the token's summed input whether or not the input is constant over the steps (the
step-by-step neuron is exact only for constant input); the leak plays no part.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

SURROGATES = ("arctan", "sigmoid", "triangle")
FIRE_MODES = ("step", "count")
LEARNABLE = ("none", "group", "channel")
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


def lif_reference(current: torch.Tensor, beta, threshold, surrogate: str = "arctan",
                  alpha: float = 2.0, detach_reset: bool = False, initial=0.0) -> torch.Tensor:
    """Plain multi-step LIF: ``current`` ``[T, *]`` -> spikes ``[T, *]`` (0/1, same dtype). ``beta``,
    ``threshold`` and ``initial`` (the membrane before the first step) are floats, or tensors broadcast over
    ``current[t]`` (learned leak and thresholds)."""
    u = torch.zeros_like(current[0]) + initial
    s = torch.zeros_like(current[0])
    spikes = []
    for t in range(current.shape[0]):
        reset = s.detach() if detach_reset else s
        u = beta * u + current[t] - threshold * reset
        s = Heaviside.apply(u - threshold, surrogate, alpha)
        spikes.append(s)
    return torch.stack(spikes)


def _is_zero(value) -> bool:
    return not isinstance(value, torch.Tensor) and value == 0


@torch.no_grad()
def lif_membrane(current: torch.Tensor, beta, threshold, initial=0.0) -> torch.Tensor:
    """Membrane potential ``U`` ``[T, *]`` of the LIF neuron (no autograd); spikes are ``U >= threshold``."""
    membrane = torch.empty_like(current)
    # same operation order as lif_reference (beta * initial + I[0] - threshold * 0), so the bits agree
    u = current[0] if _is_zero(initial) else beta * initial + current[0]
    membrane[0] = u
    for t in range(1, current.shape[0]):
        # same operation order as lif_reference, so both give bit-identical potentials
        u = beta * u + current[t] - threshold * (u >= threshold).to(u.dtype)
        membrane[t] = u
    return membrane


def _lif_backward(membrane: torch.Tensor, grad_spikes: torch.Tensor, beta, threshold, surrogate: str, alpha: float,
                  detach_reset: bool, param_grads: bool = False, initial=0.0):
    """Backpropagation through time of the LIF recursion, from the membrane potential alone.

    Returns the gradient of the current ``[T, *]``; with ``param_grads``, also those of ``beta``, ``threshold``
    and ``initial`` (tensors broadcast over the current), unreduced ``[*]``::

        dL/dθ  = Σ_t -dL/dh[t] - S[t] · dL/dU[t+1]     (h = U - θ; the reset subtracts θ·S)
        dL/dβ  = Σ_t dL/dU[t] · U[t-1]                 (U[-1] = initial)
        dL/dU0 = β · dL/dU[0]
    """
    grad_current = torch.empty_like(membrane)
    grad_u_next = None
    grad_beta = grad_threshold = None
    if param_grads:
        grad_beta, grad_threshold = torch.zeros_like(membrane[0]), torch.zeros_like(membrane[0])
    for t in reversed(range(membrane.shape[0])):
        grad_s = grad_spikes[t]
        if grad_u_next is not None and not detach_reset:
            grad_s = grad_s - threshold * grad_u_next
        grad_h = grad_s * surrogate_grad(membrane[t] - threshold, surrogate, alpha)
        grad_u = grad_h if grad_u_next is None else grad_h + beta * grad_u_next
        if param_grads:
            grad_threshold -= grad_h
            if grad_u_next is not None:
                grad_threshold -= (membrane[t] >= threshold).to(membrane.dtype) * grad_u_next
            if t > 0:
                grad_beta += grad_u * membrane[t - 1]
            elif not _is_zero(initial):
                grad_beta += grad_u * initial
        grad_current[t] = grad_u
        grad_u_next = grad_u
    if param_grads:
        return grad_current, grad_beta, grad_threshold, beta * grad_current[0]
    return grad_current


def _reduce_to(grad: torch.Tensor, like) -> torch.Tensor | None:
    """Sum a gradient ``[*]`` down to the shape of the parameter ``like`` broadcast against it (None for floats)."""
    if not isinstance(like, torch.Tensor) or not like.requires_grad:
        return None
    if like.dim() == 0:
        return grad.sum().reshape(())
    return grad.reshape(-1, like.shape[-1]).sum(0)


def _learned(*values) -> bool:
    return any(isinstance(p, torch.Tensor) and p.requires_grad for p in values)


class _LeanLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, beta, threshold, surrogate, alpha, detach_reset, initial):
        membrane = lif_membrane(current, beta, threshold, initial)
        ctx.save_for_backward(membrane)
        ctx.params = (beta, threshold, surrogate, alpha, detach_reset)
        ctx.initial = initial
        return (membrane >= threshold).to(current.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        membrane = ctx.saved_tensors[0]
        beta, threshold = ctx.params[:2]
        if not _learned(beta, threshold, ctx.initial):
            return _lif_backward(membrane, grad_spikes, *ctx.params, initial=ctx.initial), *[None] * 6
        grad_current, grad_beta, grad_threshold, grad_initial = _lif_backward(
            membrane, grad_spikes, *ctx.params, param_grads=True, initial=ctx.initial)
        return (grad_current, _reduce_to(grad_beta, beta), _reduce_to(grad_threshold, threshold), None, None, None,
                _reduce_to(grad_initial, ctx.initial))


class _LeanLIFLevels(torch.autograd.Function):
    """LIF driven by ``scale * levels`` with small integer ``levels``: keeps the levels as uint8/int16 and
    recomputes the membrane potential in backward (attention scores: integers in [0, head_dim])."""

    @staticmethod
    def forward(ctx, levels, scale, beta, threshold, surrogate, alpha, detach_reset, initial):
        current = levels * scale
        membrane = lif_membrane(current, beta, threshold, initial)
        small = torch.uint8 if float(levels.max()) <= 255 and float(levels.min()) >= 0 else torch.int16
        ctx.save_for_backward(levels.to(small))
        ctx.params = (beta, threshold, surrogate, alpha, detach_reset)
        ctx.scale, ctx.dtype, ctx.initial = scale, levels.dtype, initial
        return (membrane >= threshold).to(levels.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (levels,) = ctx.saved_tensors
        beta, threshold = ctx.params[:2]
        membrane = lif_membrane(levels.to(ctx.dtype) * ctx.scale, beta, threshold, ctx.initial)
        if not _learned(beta, threshold, ctx.initial):
            grads = _lif_backward(membrane, grad_spikes, *ctx.params, initial=ctx.initial)
            return grads * ctx.scale, *[None] * 7
        grad_current, grad_beta, grad_threshold, grad_initial = _lif_backward(
            membrane, grad_spikes, *ctx.params, param_grads=True, initial=ctx.initial)
        return (grad_current * ctx.scale, None, _reduce_to(grad_beta, beta), _reduce_to(grad_threshold, threshold),
                None, None, None, _reduce_to(grad_initial, ctx.initial))


def lif_lean(current: torch.Tensor, beta, threshold, surrogate: str = "arctan",
             alpha: float = 2.0, detach_reset: bool = False, initial=0.0) -> torch.Tensor:
    """Multi-step LIF with the same outputs and gradients as :func:`lif_reference`, run without autograd's
    per-step graph: it keeps one tensor, the membrane potential ``[T, *]``, and runs the backward recursion by
    hand (the reference keeps a graph of about five nodes per time step)."""
    if not torch.is_grad_enabled() or not (current.requires_grad or _learned(beta, threshold, initial)):
        return (lif_membrane(current, beta, threshold, initial) >= threshold).to(current.dtype)
    return _LeanLIF.apply(current, beta, threshold, surrogate, alpha, detach_reset, initial)


# ---- "count" firing: integrate the token's T steps, then fire ----------------------------------------------------
@torch.no_grad()
def count_total(current: torch.Tensor, initial=0.0) -> torch.Tensor:
    """``A = initial + I[0] + I[1] + ... + I[T-1]`` ``[*]``, summed in this order (the engine sums alike)."""
    total = current[0] if _is_zero(initial) else initial + current[0]
    for t in range(1, current.shape[0]):
        total = total + current[t]
    return total


def _step_thresholds(threshold, total: torch.Tensor, steps: int) -> list:
    """``(t + 1) · threshold`` for each step, computed in the dtype of ``total`` (as the engine does)."""
    threshold = torch.as_tensor(threshold, dtype=total.dtype, device=total.device)
    return [(t + 1) * threshold for t in range(steps)]


def _count_spikes(total: torch.Tensor, threshold, steps: int, dtype) -> torch.Tensor:
    return torch.stack([total >= level for level in _step_thresholds(threshold, total, steps)]).to(dtype)


def count_reference(current: torch.Tensor, beta, threshold, surrogate: str = "arctan", alpha: float = 2.0,
                    detach_reset: bool = False, initial=0.0) -> torch.Tensor:
    """Plain "count" firing (module docstring): ``S[t] = Heaviside(A - (t + 1) · threshold)`` with
    ``A = initial + Σ_t I[t]``; ``beta`` and ``detach_reset`` are accepted for a common signature and unused."""
    total = current[0] + initial
    for t in range(1, current.shape[0]):
        total = total + current[t]
    return torch.stack([Heaviside.apply(total - level, surrogate, alpha)
                        for level in _step_thresholds(threshold, total, current.shape[0])])


class _LeanCount(torch.autograd.Function):
    """Count firing that keeps only ``A`` ``[*]`` for backward::

        dL/dA = Σ_t dL/dS[t] · sg'(A - (t+1)θ);   dL/dI[t] = dL/dinitial = dL/dA;   dL/dθ = -Σ_t (t+1) dL/dS[t] sg'
    """

    @staticmethod
    def forward(ctx, current, threshold, surrogate, alpha, initial):
        total = count_total(current, initial)
        ctx.save_for_backward(total)
        ctx.threshold, ctx.surrogate, ctx.alpha, ctx.initial, ctx.steps = threshold, surrogate, alpha, initial,             current.shape[0]
        return _count_spikes(total, threshold, current.shape[0], current.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (total,) = ctx.saved_tensors
        grad_total = torch.zeros_like(total)
        grad_threshold = torch.zeros_like(total) if _learned(ctx.threshold) else None
        for t, level in enumerate(_step_thresholds(ctx.threshold, total, ctx.steps)):
            g = grad_spikes[t] * surrogate_grad(total - level, ctx.surrogate, ctx.alpha)
            grad_total += g
            if grad_threshold is not None:
                grad_threshold -= (t + 1) * g
        grad_current = grad_total.unsqueeze(0).expand(ctx.steps, *total.shape)
        return (grad_current, _reduce_to(grad_threshold, ctx.threshold) if grad_threshold is not None else None,
                None, None, _reduce_to(grad_total, ctx.initial))


def count_lean(current: torch.Tensor, beta, threshold, surrogate: str = "arctan", alpha: float = 2.0,
               detach_reset: bool = False, initial=0.0) -> torch.Tensor:
    """:func:`count_reference` with the same outputs and gradients, keeping one tensor ``A`` ``[*]``."""
    if not torch.is_grad_enabled() or not (current.requires_grad or _learned(threshold, initial)):
        return _count_spikes(count_total(current, initial), threshold, current.shape[0], current.dtype)
    return _LeanCount.apply(current, threshold, surrogate, alpha, initial)


BACKENDS = {"reference": lif_reference, "lean": lif_lean}
COUNT_BACKENDS = {"reference": count_reference, "lean": count_lean}


class LIFNeuron(nn.Module):
    """Multi-step LIF neuron with soft reset. Input currents ``[T, *]`` -> binary spikes ``[T, *]``.

    Args:
        beta: leak, in (0, 1]; 1 is the integrate-and-fire (IF) neuron.
        threshold: firing threshold, > 0.
        surrogate: ``"arctan"`` (default), ``"sigmoid"`` or ``"triangle"``.
        alpha: sharpness of the surrogate; ``None`` takes the surrogate's default.
        detach_reset: stop gradients through the reset term.
        backend: ``"lean"`` (default) or ``"reference"``.
        learn_threshold: ``"none"`` (default), ``"group"`` (one learned threshold for the neuron module) or
            ``"channel"`` (one per channel of the last axis; needs ``channels``). Learned thresholds stay >= 0.01.
        learn_beta: ``"none"`` (default) or ``"group"`` (one learned leak, kept in [0.01, 0.99]). The leak stays
            one number per module, so ``beta · U`` remains a multiplication by a constant.
        channels: size of the last axis of the current, for ``learn_threshold="channel"``.
        initial_membrane: the membrane before the first step, as a fraction of the threshold (0: the paper's;
            0.5 with ``beta=1`` makes the neuron round instead of floor its input, as QCFS does).
        fire: ``"step"`` (the paper's: fire as the membrane crosses the threshold, step by step) or ``"count"``
            (integrate the token's T steps, then fire ``clip(floor(A / threshold), 0, T)`` spikes in the first steps;
            see the module docstring).
        per_channel: thresholds and initial membranes one per channel, held in the buffers ``channel_threshold``
            and ``channel_initial`` (the initial membrane as a value, not a fraction). They start at ``threshold``
            and ``initial_membrane · threshold`` and are set by calibration (:mod:`bispikclm.distill.calibrate`),
            not by the optimizer. Without ``channels`` (the attention map) they are single numbers.
        relative_surrogate: the surrogate is taken of ``(U - θ) / θ`` and divided by ``θ``, so that its width
            follows the threshold (``sg'_α((U - θ)/θ) / θ = sg'_{α/θ}(U - θ)`` for all three surrogates); with a
            fixed threshold of 1, as by default, it changes nothing.
        signed: a pair of ``fire="count"`` neurons per channel, one driven by ``I`` and one by ``-I``, sharing the
            threshold; the output ``[T, *, 2C]`` holds the positive neuron's binary spikes, then the negative's.
            With initial membranes ``U0`` and ``U0⁻`` (``initial_membrane · θ`` both, or with ``per_channel`` the
            buffers ``channel_initial`` and ``channel_initial_negative``) the pair fires ``k⁺ - k⁻`` spikes that
            make it a ``2T + 1``-level quantizer: a value near the centre costs no spike at all, where one neuron
            must fire about T/2 times for it. A consumer of the pair reads ``W·S⁺ - W·S⁻`` (one weight per channel,
            added or subtracted; :class:`~bispikclm.spike_ops.SpikeLinear` with ``signed=True``).

    The membrane always runs in float32 (at least): under a bf16/fp16 autocast the current is cast up first, since
    half-precision membranes lose small steps and the spikes would depend on the precision. Spikes (0 or 1, exact in
    any dtype) come out in the dtype of the current. The neuron keeps no state between calls; :class:`FiringRateRecorder` counts its spikes.
    """

    def __init__(self, beta: float = 0.5, threshold: float = 1.0, surrogate: str = "arctan",
                 alpha: float | None = None, detach_reset: bool = False, backend: str = "lean",
                 learn_threshold: str = "none", learn_beta: str = "none", channels: int | None = None,
                 initial_membrane: float = 0.0, fire: str = "step", per_channel: bool = False,
                 relative_surrogate: bool = False, signed: bool = False) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
        if learn_threshold not in LEARNABLE or learn_beta not in LEARNABLE[:2]:
            raise ValueError(f"learn_threshold must be one of {LEARNABLE} and learn_beta one of {LEARNABLE[:2]}, got "
                             f"{learn_threshold!r}, {learn_beta!r}")
        if learn_threshold == "channel" and not channels:
            raise ValueError("learn_threshold='channel' needs the number of channels")
        if not 0.0 <= initial_membrane <= 1.0:
            raise ValueError(f"initial_membrane must be in [0, 1] (a fraction of the threshold), got {initial_membrane}")
        if fire not in FIRE_MODES:
            raise ValueError(f"fire must be one of {FIRE_MODES}, got {fire!r}")
        if per_channel and learn_threshold != "none":
            raise ValueError("per_channel thresholds are calibrated, not learned: use learn_threshold='none' with them")
        if signed and fire != "count":
            raise ValueError("signed neuron pairs need fire='count'")
        self.beta, self.threshold, self.surrogate = float(beta), float(threshold), surrogate
        self.alpha = float(DEFAULT_ALPHA[surrogate] if alpha is None else alpha)
        self.detach_reset, self.backend = detach_reset, backend
        self.learn_threshold, self.learn_beta = learn_threshold, learn_beta
        self.initial_membrane, self.fire = float(initial_membrane), fire
        shape = {"group": (), "channel": (channels,)}
        self.threshold_param = (nn.Parameter(torch.full(shape[learn_threshold], float(threshold)))
                                if learn_threshold != "none" else None)
        self.beta_param = nn.Parameter(torch.tensor(float(beta))) if learn_beta != "none" else None
        self.per_channel, self.relative_surrogate = bool(per_channel), bool(relative_surrogate)
        if self.per_channel:
            size = (channels,) if channels else ()
            self.register_buffer("channel_threshold", torch.full(size, float(threshold)))
            self.register_buffer("channel_initial", torch.full(size, float(initial_membrane) * float(threshold)))
        self.signed = bool(signed)
        if self.signed and self.per_channel:
            self.register_buffer("channel_initial_negative", self.channel_initial.clone())

    def parameters_now(self) -> tuple:
        """``(beta, threshold)`` as used in the forward pass: floats, or the learned tensors within their bounds."""
        beta = self.beta if self.beta_param is None else self.beta_param.clamp(0.01, 0.99)
        if self.per_channel:
            return beta, self.channel_threshold
        threshold = self.threshold if self.threshold_param is None else self.threshold_param.clamp_min(0.01)
        return beta, threshold

    def initial_now(self, threshold=None):
        """The membrane before the first step, ``initial_membrane · threshold`` (a float, or a tensor that follows
        a learned threshold); with ``per_channel``, the buffer ``channel_initial``."""
        if self.per_channel:
            return self.channel_initial
        if threshold is None:
            threshold = self.parameters_now()[1]
        return self.initial_membrane * threshold if self.initial_membrane else 0.0

    def alpha_now(self, threshold):
        """The surrogate's sharpness: ``alpha``, or ``alpha / threshold`` with ``relative_surrogate``."""
        return self.alpha / threshold if self.relative_surrogate else self.alpha

    def forward(self, current: torch.Tensor, valid: torch.Tensor | None = None,
                input_scale: float | None = None) -> torch.Tensor:
        """``current`` ``[T, *]``; ``valid`` (optional, broadcastable to ``current``) marks the entries that count
        towards a recorded firing rate (e.g. the causal part of an attention map; see :class:`FiringRateRecorder`).

        With ``input_scale``, ``current`` holds small non-negative integers (levels) and the neuron is driven
        by ``input_scale * current``; the lean backend then keeps the levels as uint8 instead of a float
        membrane."""
        dtype = current.dtype
        if dtype in (torch.float16, torch.bfloat16):
            current = current.float()
        beta, threshold = self.parameters_now()
        alpha = self.alpha_now(threshold) if torch.is_grad_enabled() else self.alpha     # used by backward only
        args = (beta, threshold, self.surrogate, alpha, self.detach_reset, self.initial_now(threshold))
        if self.fire == "count":
            current = current if input_scale is None else current * input_scale
            spikes = COUNT_BACKENDS[self.backend](current, *args)
            if self.signed:
                negative = self.channel_initial_negative if self.per_channel else args[-1]
                spikes = torch.cat([spikes, COUNT_BACKENDS[self.backend](-current, *args[:-1], negative)], dim=-1)
        elif input_scale is None:
            spikes = BACKENDS[self.backend](current, *args)
        elif self.backend == "lean" and torch.is_grad_enabled() and (current.requires_grad or self.learned):
            spikes = _LeanLIFLevels.apply(current, input_scale, *args)
        else:
            spikes = BACKENDS[self.backend](current * input_scale, *args)
        return spikes.to(dtype)

    @property
    def learned(self) -> bool:
        return self.threshold_param is not None or self.beta_param is not None

    def extra_repr(self) -> str:
        learned = (f", learn_threshold={self.learn_threshold}, learn_beta={self.learn_beta}" if self.learned else "")
        options = (f", initial_membrane={self.initial_membrane}" if self.initial_membrane else "") + (
            f", fire={self.fire}" if self.fire != "step" else "") + (
            ", per_channel=True" if self.per_channel else "") + (
            ", relative_surrogate=True" if self.relative_surrogate else "") + (", signed=True" if self.signed else "")
        return (f"beta={self.beta}, threshold={self.threshold}, surrogate={self.surrogate}, alpha={self.alpha}, "
                f"detach_reset={self.detach_reset}, backend={self.backend}" + learned + options)


class FiringRateRecorder:
    """Counts the spikes and neuron updates of LIF neurons while active, through forward hooks::

        with FiringRateRecorder(model.neurons()) as recorder:
            model(input_ids)
        recorder.rates()        # {path: spikes / updates}
        recorder.overall()      # all spikes / all updates

    Entries outside a call's ``valid`` mask (non-causal attention entries, padding) are not counted. Calls that
    activation checkpointing replays during the backward pass are not counted twice."""

    def __init__(self, neurons: dict[str, LIFNeuron]) -> None:
        self.neurons = dict(neurons)
        self.counts: dict[str, list[float]] = {name: [0.0, 0.0] for name in self.neurons}
        self._handles: list = []

    def __enter__(self) -> "FiringRateRecorder":
        for name, neuron in self.neurons.items():
            hook = functools.partial(self._count, name)
            self._handles.append(neuron.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _count(self, name: str, module: LIFNeuron, args: tuple, kwargs: dict, spikes: torch.Tensor) -> None:
        if torch._C._current_graph_task_id() != -1:     # replayed inside backward (activation checkpointing)
            return
        valid = kwargs.get("valid", args[1] if len(args) > 1 else None)
        if valid is None:
            fired, total = float(spikes.sum()), float(spikes.numel())
        else:
            valid = valid.to(spikes.dtype).expand_as(spikes)
            fired, total = float((spikes * valid).sum()), float(valid.sum())
        self.counts[name][0] += fired
        self.counts[name][1] += total

    def rates(self) -> dict[str, float]:
        """Firing rate of each neuron: spikes over neuron updates (0 for a neuron that never ran)."""
        return {name: spikes / max(updates, 1.0) for name, (spikes, updates) in self.counts.items()}

    def overall(self) -> float:
        """All spikes over all neuron updates."""
        spikes = sum(c[0] for c in self.counts.values())
        return spikes / max(sum(c[1] for c in self.counts.values()), 1.0)
