"""Calibrate a spiking student from its teacher before training: per-channel thresholds that make each neuron an
MSE-optimal quantizer of what the teacher computes there, and linear layers refitted to the teacher's
pre-activations (a conversion, in the sense of ANN-to-SNN conversion, done once at step 0).

With ``fire="count"`` (or the IF neuron, ``beta = 1``, driven by a current constant over the T steps) a neuron
with threshold ``θ`` and initial membrane ``U0`` turns a token's mean current ``I`` into
``k = clip(floor((T·I + U0) / θ), 0, T)`` spikes. Setting ``θ = hi - lo`` and ``U0 = θ/2 - T·lo`` makes ``k`` the
index of the level of ``lo + k·(hi - lo)/T`` nearest to ``I``: a uniform ``T + 1``-level quantizer of the
interval ``[lo, hi]`` (QCFS's half-threshold shift, arXiv 2303.04347, with the interval per channel).

:func:`calibrate` walks the student block by block on N calibration sequences, with the student's own spikes as
inputs (so errors of earlier blocks are seen and compensated by later fits):

1. each neuron's ``[lo, hi]`` per channel by :func:`fit_levels` (the interval, chosen among quantile pairs, with
   the smallest quantization MSE of its own input);
2. each linear layer by :func:`ridge_fit`: the least-squares map from the student's mean spikes (or attention
   counts) to the teacher's pre-activation at the same place (``q/k/v/out_proj``, ``fc1``, ``fc2``);
3. the attention neuron's single threshold from a grid, the one whose attention output lets ``out_proj`` fit the
   teacher best (R²);
4. the residual weights ``g`` of each branch set to the output neuron's ``θ``, so that a branch adds
   ``k·θ/T ≈ u - lo`` (the teacher's update, up to a per-channel constant that the next fits absorb);
5. the final LayerNorm's weight and bias refitted per channel to the teacher's.

Least-squares weights are small (they absorb the thresholds); :func:`calibrate` finally rescales each linear
layer to the spread of the student's initialization and its neuron's ``θ`` and ``U0`` by the same factor, which
leaves every spike as it was and gives the optimizer steps of the usual relative size.

A signed neuron pair (``neuron_overrides: {group: {signed: true}}``) is calibrated as the ``2T + 1``-level quantizer
of its interval (:func:`set_neuron_levels`), and the layers after it are fitted to its net spikes ``S⁺ - S⁻``.

OPT-family teachers (LayerNorm, ReLU MLP) with a same-shape student whose neurons are ``per_channel``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import causal_mask
from ..modeling import BiSpikCLMForCausalLM
from ..spike_ops import net_spikes as pair_difference, spike_scale
from .losses import layer_map

QUANTILES_LOW = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
QUANTILES_HIGH = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7)
ATTN_THRESHOLDS = (0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.45)


def quantize(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int) -> torch.Tensor:
    """The ``steps + 1``-level uniform quantizer of ``[lo, hi]`` (per channel, last axis) applied to ``values``
    (halves round up, as the neuron does)."""
    width = (hi - lo).clamp_min(1e-12)
    return lo + width * (torch.floor((values - lo) / width * steps + 0.5).clamp(0, steps) / steps)


@torch.no_grad()
def fit_levels(values: torch.Tensor, steps: int, sample: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of ``values`` ``[M, C]``: the interval ``(lo, hi)`` among pairs of quantiles
    (:data:`QUANTILES_LOW` × :data:`QUANTILES_HIGH`) whose ``steps + 1``-level quantizer has the smallest mean
    squared error on ``values``. At most ``sample`` rows (evenly spaced) are used."""
    values = values.reshape(-1, values.shape[-1]).float()
    if values.shape[0] > sample:
        values = values[torch.linspace(0, values.shape[0] - 1, sample).long()]
    qs = sorted(set(QUANTILES_LOW) | set(QUANTILES_HIGH))
    table = dict(zip(qs, torch.quantile(values, torch.tensor(qs, dtype=values.dtype), dim=0)))   # q -> [C]
    best_err = torch.full((values.shape[1],), float("inf"))
    best_lo, best_hi = table[0.0].clone(), table[1.0].clone()
    for ql in QUANTILES_LOW:
        for qh in QUANTILES_HIGH:
            lo, hi = table[ql], torch.maximum(table[qh], table[ql] + 1e-6)
            err = (quantize(values, lo, hi, steps) - values).square().mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def levels(neuron: nn.Module, steps: int) -> int:
    """The number of quantization steps of a neuron run for ``steps`` time steps: T, or 2T for a signed pair."""
    return 2 * steps if neuron.signed else steps


@torch.no_grad()
def set_neuron_levels(neuron: nn.Module, lo: torch.Tensor, hi: torch.Tensor, steps: int) -> None:
    """Make a ``per_channel`` neuron the quantizer of ``[lo, hi]``: ``θ = hi - lo``, ``U0 = θ/2 - T·lo``. A signed
    pair becomes the ``2T + 1``-level quantizer of ``[lo, hi]``: with centre ``c = (lo + hi)/2``, ``θ = (hi - lo)/2``,
    ``U0 = θ/2 - T·c`` and ``U0⁻ = θ/2 + T·c``, it fires ``k⁺ - k⁻ = round(T·(I - c)/θ)`` in ``[-T, T]``."""
    if not getattr(neuron, "per_channel", False):
        raise ValueError("calibration needs per-channel neurons (BiSpikCLMConfig.per_channel_neurons=True)")
    if neuron.signed:
        theta, centre = ((hi - lo) / 2).clamp_min(1e-6), (lo + hi) / 2
        neuron.channel_threshold.copy_(theta.reshape(neuron.channel_threshold.shape))
        neuron.channel_initial.copy_((theta / 2 - steps * centre).reshape(neuron.channel_initial.shape))
        neuron.channel_initial_negative.copy_((theta / 2 + steps * centre).reshape(neuron.channel_initial.shape))
        return
    theta = (hi - lo).clamp_min(1e-6)
    neuron.channel_threshold.copy_(theta.reshape(neuron.channel_threshold.shape))
    neuron.channel_initial.copy_((theta / 2 - steps * lo).reshape(neuron.channel_initial.shape))


def net_spikes(spikes: torch.Tensor, neuron: nn.Module) -> torch.Tensor:
    """What the layers after ``neuron`` read of its ``spikes``: a signed pair's ``S⁺ - S⁻``
    (:func:`~bispikclm.spike_ops.net_spikes`), other spikes as they are."""
    return pair_difference(spikes) if neuron.signed else spikes


@torch.no_grad()
def ridge_fit(inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``targets ≈ inputs @ W.T + b`` (``inputs`` ``[M, I]``, ``targets`` ``[M, O]``) with a ridge
    of ``ridge`` times the mean input energy on ``W`` (not on ``b``); returns ``(W [O, I], b [O])``, in float64."""
    x, y = inputs.reshape(-1, inputs.shape[-1]).double(), targets.reshape(-1, targets.shape[-1]).double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.T @ xc
    gram += torch.eye(gram.shape[0], dtype=gram.dtype) * (ridge * float(gram.diagonal().mean()) + 1e-12)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    return weight, mean_y - weight @ mean_x


def _r2(prediction: torch.Tensor, target: torch.Tensor) -> float:
    target = target.reshape(-1, target.shape[-1]).double()
    residual = (prediction.reshape(target.shape).double() - target).square().sum()
    return 1.0 - float(residual / (target - target.mean(0)).square().sum().clamp_min(1e-30))


@torch.no_grad()
def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear.weight.copy_(weight.to(linear.weight.dtype))
    linear.bias.copy_(bias.to(linear.bias.dtype))


def _fit_linear_and_neuron(linear: nn.Linear, neuron: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                           steps: int, rectify: bool = False) -> None:
    """Fit ``linear`` from mean spikes ``inputs`` ``[M, I]`` (a signed pair's ``S⁺ - S⁻``) to ``target`` ``[M, O]``,
    then its neuron's levels to the fitted current (to ``max(current, 0)`` with ``rectify``: the neuron stands for
    a ReLU)."""
    _set_linear(linear, *ridge_fit(inputs, target))
    current = nn.functional.linear(inputs.to(linear.weight.dtype), linear.weight, linear.bias)
    values = current.clamp_min(0) if rectify else current
    set_neuron_levels(neuron, *fit_levels(values, levels(neuron, steps)), steps)


def _teacher_activations(teacher: nn.Module, sequences: torch.Tensor, batch_size: int) -> dict:
    """``{name: [S, N, D]}``: the outputs of the teacher's q/k/v/out_proj, fc1, fc2 in each layer and of its
    final LayerNorm, on ``sequences`` (OPT module names)."""
    decoder = teacher.model.decoder
    wanted = {f"{i}.{name}": getattr(layer.self_attn, name) for i, layer in enumerate(decoder.layers)
              for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    wanted.update({f"{i}.{name}": getattr(layer, name) for i, layer in enumerate(decoder.layers)
                   for name in ("fc1", "fc2")})
    wanted["final_layer_norm"] = decoder.final_layer_norm
    found: dict[str, list] = {name: [] for name in wanted}
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: found[name].append(out.float()))
             for name, module in wanted.items()]
    try:
        for start in range(0, sequences.shape[0], batch_size):
            teacher(input_ids=sequences[start:start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in found.items()}


def _attention_counts(attn: nn.Module, a: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """The integer attention output ``O = P V`` ``[T, S, N, H·dh]`` of an SFSA module for block-input spikes
    ``a`` ``[T, S, N, D]`` (its forward without ``out_proj``), ``batch_size`` sequences at a time."""
    if a.shape[1] > batch_size:
        return torch.cat([_attention_counts(attn, a[:, s:s + batch_size], batch_size)
                          for s in range(0, a.shape[1], batch_size)], dim=1)
    t, s, n, _ = a.shape
    q, k, v = attn.read_qkv(*attn.qkv(a), a.dtype)
    _, out = attn.attend(q, k, v, causal_mask(n, n, None, a.device))
    return out.transpose(2, 3).reshape(t, s, n, -1)


@torch.no_grad()
def _calibrate_block(block: nn.Module, x: torch.Tensor, acts: dict, layer: int, steps: int) -> dict:
    """Calibrate one student block on its input ``x`` ``[T, S, N, D]`` against teacher layer ``layer``; returns
    what was chosen (attention threshold and the fits' R²)."""
    attn, ffn = block.self_attn, block.ffn
    flat = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
    set_neuron_levels(block.attn_in_neuron, *fit_levels(flat(x.mean(0)), levels(block.attn_in_neuron, steps)),
                      steps)
    a = block.attn_in_neuron(x)
    a_mean = flat(net_spikes(a, block.attn_in_neuron).mean(0))
    for name in ("q_proj", "k_proj", "v_proj"):
        _fit_linear_and_neuron(getattr(attn, name), getattr(attn, name[0] + "_neuron"), a_mean,
                               flat(acts[f"{layer}.{name}"]), steps)
    target = flat(acts[f"{layer}.out_proj"])
    best = None
    for threshold in ATTN_THRESHOLDS:
        attn.attn_neuron.channel_threshold.fill_(threshold)
        attn.attn_neuron.channel_initial.fill_(attn.attn_neuron.initial_membrane * threshold)
        counts = flat(_attention_counts(attn, a).mean(0))
        weight, bias = ridge_fit(counts, target)
        r2 = _r2(counts.double() @ weight.T + bias, target)
        if best is None or r2 > best[0]:
            best = (r2, threshold)
    attn.attn_neuron.channel_threshold.fill_(best[1])
    attn.attn_neuron.channel_initial.fill_(attn.attn_neuron.initial_membrane * best[1])
    counts = _attention_counts(attn, a)
    _fit_linear_and_neuron(attn.out_proj, attn.out_neuron, flat(counts.mean(0)), target, steps)
    block.attn_residual_scale.copy_(attn.out_neuron.channel_threshold)
    y = attn.out_neuron(attn.out_proj(counts))
    x = x + spike_scale(y, block.attn_residual_scale, attn.out_neuron.signed)

    set_neuron_levels(block.ffn_in_neuron, *fit_levels(flat(x.mean(0)), levels(block.ffn_in_neuron, steps)), steps)
    b = block.ffn_in_neuron(x)
    _fit_linear_and_neuron(ffn.fc1, ffn.hidden_neuron, flat(net_spikes(b, block.ffn_in_neuron).mean(0)),
                           flat(acts[f"{layer}.fc1"]), steps, rectify=True)
    h = ffn.hidden_neuron(ffn.fc1(b))
    _fit_linear_and_neuron(ffn.fc2, ffn.out_neuron, flat(h.mean(0)), flat(acts[f"{layer}.fc2"]), steps)
    block.ffn_residual_scale.copy_(ffn.out_neuron.channel_threshold)
    return {"attn_threshold": best[1], "out_proj_r2": round(best[0], 4)}


@torch.no_grad()
def _rescale_linears(student: BiSpikCLMForCausalLM) -> None:
    """Scale each linear layer to its initialization's spread and its neuron's ``θ``, ``U0`` alike (spikes
    unchanged: ``floor((c·U0 + c·ΣI) / (c·θ))`` is the same count)."""
    cfg = student.config
    for block in student.model.layers:
        attn, ffn = block.self_attn, block.ffn
        pairs = [(attn.q_proj, attn.q_neuron), (attn.k_proj, attn.k_neuron), (attn.v_proj, attn.v_neuron),
                 (attn.out_proj, attn.out_neuron), (ffn.fc1, ffn.hidden_neuron), (ffn.fc2, ffn.out_neuron)]
        for linear, neuron in pairs:
            want = cfg.weight_gain / math.sqrt(linear.in_features * cfg.input_rate)
            scale = want / max(float(linear.weight.std()), 1e-12)
            linear.weight.mul_(scale)
            linear.bias.mul_(scale)
            neuron.channel_threshold.mul_(scale)
            neuron.channel_initial.mul_(scale)
            if neuron.signed:
                neuron.channel_initial_negative.mul_(scale)


@torch.no_grad()
def calibrate(student: BiSpikCLMForCausalLM, teacher: nn.Module, sequences: torch.Tensor,
              batch_size: int = 16) -> dict:
    """Calibrate ``student`` (same shape as ``teacher``, ``per_channel_neurons``) on ``sequences`` ``[S, N]``
    of token ids, as the module docstring says; returns a summary per block. The student's embeddings must hold
    the teacher's (:func:`~bispikclm.distill.init.init_from_teacher` with ``"calibrated"`` copies them, then
    calls this); the input gain is set to 1, so the residual stream is in the teacher's units."""
    cfg = student.config
    if "model.decoder" not in dict(teacher.named_modules()) or cfg.ffn_type != "mlp":
        raise ValueError("calibration supports OPT-family teachers (LayerNorm, ReLU MLP) and an mlp student")
    if not cfg.per_channel_neurons:
        raise ValueError("calibration needs BiSpikCLMConfig.per_channel_neurons=True")
    if cfg.spiking_head:
        raise ValueError("calibration needs the LayerNorm head (spiking_head=False)")
    was_training, teacher_training = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        cfg.input_gain = student.model.input_gain = 1.0
        acts = _teacher_activations(teacher, sequences, batch_size)
        steps, ls = cfg.time_steps, cfg.num_hidden_layers
        lt = len(teacher.model.decoder.layers)
        positions = torch.arange(sequences.shape[1])[None].expand_as(sequences)
        x0 = student.model.embed(sequences, positions)
        x = x0.unsqueeze(0).expand(steps, *x0.shape).contiguous()
        summary = []
        for block, layer in zip(student.model.layers, layer_map(ls, lt)):
            summary.append(_calibrate_block(block, x, acts, layer - 1, steps))
            x = torch.cat([block(x[:, s:s + batch_size])[0] for s in range(0, x.shape[1], batch_size)], dim=1)
        norm = student.final_layer_norm
        normed = nn.functional.layer_norm(x.mean(0), (cfg.hidden_size,), eps=norm.eps).reshape(-1, cfg.hidden_size)
        target = acts["final_layer_norm"].reshape(-1, cfg.hidden_size).double()
        z = normed.double()
        zc, tc = z - z.mean(0), target - target.mean(0)
        weight = (zc * tc).sum(0) / zc.square().sum(0).clamp_min(1e-12)
        norm.weight.copy_(weight.float())
        norm.bias.copy_((target.mean(0) - weight * z.mean(0)).float())
        _rescale_linears(student)
    finally:
        student.train(was_training)
        teacher.train(teacher_training)
    return {"blocks": summary, "sequences": int(sequences.shape[0])}


@torch.no_grad()
def set_time_steps(student: BiSpikCLMForCausalLM, steps: int) -> None:
    """Change a calibrated student's T (progressive precision: train at T = 4, then go on at T = 2) keeping each
    per-channel neuron the quantizer of the same interval: ``lo = (θ/2 - U0) / T`` is kept and
    ``U0' = θ/2 - T'·lo``. The residual weights (``θ``) add ``k·θ/T`` per token whatever T is."""
    if steps < 1:
        raise ValueError(f"time steps must be >= 1, got {steps}")
    old = student.config.time_steps
    for neuron in student.neurons().values():
        if neuron.per_channel and neuron.channel_threshold.dim():      # not the attention map's single neuron
            theta = neuron.channel_threshold
            lo = (theta / 2 - neuron.channel_initial) / old          # a signed pair's centre c alike
            neuron.channel_initial.copy_(theta / 2 - steps * lo)
            if neuron.signed:
                neuron.channel_initial_negative.copy_(theta / 2 + steps * lo)
    student.config.time_steps = steps
