"""Spike-Aware Alignment Distillation, SpAD (METHOD §4)::

    L = λ1·L_emb + λ2·L_attn + λ3·L_feat + λ4·L_soft + λ5·L_hard,    default λ = (0.2, 0.1, 0.1, 0.3, 0.3)

Each term is a small module. Chosen details where the method is silent:

* Hidden states of the teacher and (projected) student are compared after a LayerNorm without parameters on
  both sides: the student's residual stream carries ``input_gain`` times the embedding plus spike sums, the
  teacher's its own scale, so only their directions are comparable.
* Rate-MSE: the teacher's value is fed as a constant current for ``T`` steps into a LIF neuron with the
  student's parameters for that place; the student's firing rate is matched to that neuron's rate. Where widths
  differ, per-token mean rates are compared. What "the teacher's value" is, is a choice (``rate_targets``):

  - ``"paper"``: attention maps: the teacher's softmax probabilities as they are (both the map MSE and the
    Rate-MSE); hidden states: the layer-normed teacher state (unit scale, as the student's block input at init).
  - ``"matched"``: each target is first put on the scale of what the student's neuron sees. Attention: a binary
    map cannot express a distribution that sums to one over ``n`` keys, only which keys count; the probability
    ``p`` of a key among ``n`` visible ones becomes ``min(1, n·p)`` (uniform attention: every key on; a peak:
    that key on, the rest in proportion), compared with mean_t P and fed to the attention neuron. Hidden states:
    the layer-normed teacher state is rescaled to the mean and spread, per token, of the student's own
    block-input state before it drives the neuron, so both sides are normalized the same way.
* The weights of the active terms are normalized to sum to one, so that variants with terms switched off are
  compared at the same total weight (the defaults already sum to one).
* Attention maps are compared over the causal entries; head counts that differ are averaged over heads.
* Layers are mapped uniformly: student layer ``i`` of ``Ls`` takes teacher layer ``round(i · Lt / Ls)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..attention import SFSA
from ..configuration import BiSpikCLMConfig
from ..cost_tables import EnergyTable
from ..modeling import neuron_group
from ..neurons import lif_lean
from ..spike_ops import SpikeLinear
from .teacher import TeacherOutput

TERMS = ("emb", "attn", "feat", "soft", "hard")
RATE_TARGETS = ("paper", "matched")
DEFAULT_WEIGHTS = {"emb": 0.2, "attn": 0.1, "feat": 0.1, "soft": 0.3, "hard": 0.3}


@torch.no_grad()
def rate_target(value: torch.Tensor, beta: float, threshold: float, time_steps: int) -> torch.Tensor:
    """Firing rate (same shape as ``value``) of a LIF neuron fed ``value`` as a constant current for
    ``time_steps`` steps: the rate a spiking copy of the teacher would have there."""
    current = value.float().unsqueeze(0).expand(time_steps, *value.shape)
    return lif_lean(current, beta, threshold).mean(0)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) aligned with each student layer ``1..student_layers``, spread uniformly."""
    return [round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)]


def projector(student_dim: int, teacher_dim: int) -> nn.Module:
    """Maps student states to the teacher's width: identity when widths agree, else an identity-initialized
    linear layer (the first ``min`` channels pass through)."""
    if student_dim == teacher_dim:
        return nn.Identity()
    proj = nn.Linear(student_dim, teacher_dim)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(teacher_dim, student_dim))
        proj.bias.zero_()
    return proj


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between layer-normed ``student`` and ``teacher`` states ``[B, N, D]`` (no affine parameters)."""
    d = teacher.shape[-1]
    return F.mse_loss(F.layer_norm(student.float(), (d,)), F.layer_norm(teacher.float(), (d,)))


class EmbeddingLoss(nn.Module):
    """L_emb: the student's (time-averaged) embedding output against the teacher's, ``[B, N, D]`` each."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = projector(student_dim, teacher_dim)

    def forward(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
        return normalized_mse(self.proj(student_embedding), teacher_embedding)


class AttentionLoss(nn.Module):
    """L_attn: MSE of the student's mean_t P against the teacher's softmax map, plus Rate-MSE against the rate
    of the student's attention neuron fed the teacher's probabilities. Maps ``[B, H, N, N]``.

    Without neuron parameters (``beta=None``: an ANN student, whose maps are softmax probabilities) the loss is
    the MSE of the maps alone."""

    def __init__(self, beta: float | None, threshold: float | None, time_steps: int | None,
                 targets: str = "paper") -> None:
        super().__init__()
        if targets not in RATE_TARGETS:
            raise ValueError(f"rate targets must be one of {RATE_TARGETS}, got {targets!r}")
        self.beta, self.threshold, self.time_steps, self.targets = beta, threshold, time_steps, targets

    def forward(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for s, t in zip(student_maps, teacher_maps):
            s, t = s.float(), t.float()
            if s.shape[1] != t.shape[1]:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
            if self.targets == "matched":           # p of a key among n visible -> min(1, n p)
                visible = torch.arange(1, t.shape[-2] + 1, device=t.device, dtype=t.dtype)[:, None]
                t = (t * visible).clamp(max=1.0)
            s, t = s[..., causal], t[..., causal]
            total = total + F.mse_loss(s, t)
            if self.beta is not None:
                total = total + F.mse_loss(s, rate_target(t, self.beta, self.threshold, self.time_steps))
        return total / len(student_maps)


class FeatureLoss(nn.Module):
    """L_feat: per aligned layer, MSE between LayerNorm(proj(mean_t H_student)) and the teacher's hidden state,
    plus Rate-MSE of the student's block-input spike rate against the block-input neuron fed the teacher's
    (layer-normed) state. States ``[B, N, D]``."""

    def __init__(self, student_dim: int, teacher_dim: int, num_layers: int, beta: float | None,
                 threshold: float | None, time_steps: int | None, targets: str = "paper") -> None:
        super().__init__()
        if targets not in RATE_TARGETS:
            raise ValueError(f"rate targets must be one of {RATE_TARGETS}, got {targets!r}")
        self.projs = nn.ModuleList(projector(student_dim, teacher_dim) for _ in range(num_layers))
        self.beta, self.threshold, self.time_steps, self.targets = beta, threshold, time_steps, targets

    def forward(self, student_hidden: list[torch.Tensor], student_rates: list[torch.Tensor] | None,
                teacher_hidden: list[torch.Tensor], teacher_inputs: list[torch.Tensor],
                student_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``student_hidden[i]``/``teacher_hidden[i]``: outputs of aligned layers; ``student_rates[i]``: the
        block-input spike rate of student layer ``i`` (``None`` for an ANN student: no Rate-MSE), whose teacher
        counterpart is ``teacher_inputs[i]``; ``student_inputs[i]``: that block's (time-averaged) input state,
        whose per-token scale the ``"matched"`` targets take."""
        total = 0.0
        for proj, s, t in zip(self.projs, student_hidden, teacher_hidden):
            total = total + normalized_mse(proj(s), t)
        for i, (rate, t) in enumerate(zip(student_rates or (), teacher_inputs)):
            current = F.layer_norm(t.float(), t.shape[-1:])
            if self.targets == "matched":
                own = student_inputs[i].detach().float()
                current = current * own.std(-1, keepdim=True) + own.mean(-1, keepdim=True)
            target = rate_target(current, self.beta, self.threshold, self.time_steps)
            rate = rate.float()
            if rate.shape[-1] != target.shape[-1]:
                rate, target = rate.mean(-1), target.mean(-1)
            total = total + F.mse_loss(rate, target)
        return total / len(self.projs)


def _scaled(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """A fresh copy of ``logits / tau`` in at least float32 (safe to modify in place)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True).div_(tau)


def _chunked_logsumexp(logits: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
    parts = [torch.logsumexp(_scaled(logits[:, i:i + chunk], tau), dim=-1) for i in range(0, logits.shape[-1], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class _ChunkedKL(torch.autograd.Function):
    """τ²·mean over rows of KL(softmax(t/τ) ‖ softmax(s/τ)) for logits ``[M, V]``; float32 log-probabilities
    exist for one chunk of the vocabulary at a time, in forward and in backward."""

    @staticmethod
    def forward(ctx, student, teacher, tau, chunk):
        lse_s, lse_t = _chunked_logsumexp(student, tau, chunk), _chunked_logsumexp(teacher, tau, chunk)
        kl = torch.zeros_like(lse_s)
        for i in range(0, student.shape[-1], chunk):
            log_t = _scaled(teacher[:, i:i + chunk], tau).sub_(lse_t[:, None])
            log_ratio = log_t - _scaled(student[:, i:i + chunk], tau).sub_(lse_s[:, None])
            kl += torch.linalg.vecdot(log_t.exp_(), log_ratio)
        ctx.save_for_backward(student, teacher, lse_s, lse_t)
        ctx.tau, ctx.chunk = tau, chunk
        return kl.mean() * tau**2

    @staticmethod
    def backward(ctx, grad):
        student, teacher, lse_s, lse_t = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        scale = grad * tau / student.shape[0]          # d(τ² KL)/dz_s = τ (p_s - p_t)
        grad_student = torch.empty_like(student)
        for i in range(0, student.shape[-1], chunk):
            p_s = _scaled(student[:, i:i + chunk], tau).sub_(lse_s[:, None]).exp_()
            p_t = _scaled(teacher[:, i:i + chunk], tau).sub_(lse_t[:, None]).exp_()
            grad_student[:, i:i + chunk] = p_s.sub_(p_t).mul_(scale).to(student.dtype)
        return grad_student, None, None, None


@dataclass
class TopKLogits:
    """The teacher's ``k`` largest logits per position: ``values`` ``[B, N, k]`` and their token ``indices``
    (what :mod:`bispikclm.distill.teacher_cache` keeps instead of the whole vocabulary)."""

    values: torch.Tensor
    indices: torch.Tensor


def topk_kl(student_logits: torch.Tensor, teacher: TopKLogits, tau: float, chunk: int = 8192) -> torch.Tensor:
    """τ²·mean over positions of KL(p_t ‖ p_s), where ``p_t`` is the teacher's tempered distribution restricted to
    its top ``k`` tokens (renormalized over them) and ``p_s`` the student's tempered distribution over the whole
    vocabulary, read at those tokens. ``student_logits`` ``[B, N, V]``."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    lse = _chunked_logsumexp_grad(s, tau, chunk)
    log_s = s.gather(-1, teacher.indices.reshape(s.shape[0], -1)).float() / tau - lse[:, None]
    log_t = torch.log_softmax(teacher.values.reshape(s.shape[0], -1).float() / tau, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * tau**2


def _chunked_logsumexp_grad(logits: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
    """``logsumexp(logits / τ)`` over the last dimension in float32, one vocabulary chunk at a time, with autograd."""
    parts = [torch.logsumexp(logits[:, i:i + chunk].float() / tau, dim=-1) for i in range(0, logits.shape[-1], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


class SoftTargetLoss(nn.Module):
    """L_soft: τ²·KL(softmax(z_teacher/τ) ‖ softmax(z_student/τ)), averaged over positions, computed in chunks
    of ``chunk_size`` vocabulary entries. Logits ``[B, N, V]``; the teacher's may be :class:`TopKLogits` (then
    :func:`topk_kl`)."""

    def __init__(self, tau: float = 2.0, chunk_size: int = 8192) -> None:
        super().__init__()
        self.tau, self.chunk_size = tau, chunk_size

    def forward(self, student_logits: torch.Tensor, teacher_logits) -> torch.Tensor:
        if isinstance(teacher_logits, TopKLogits):
            return topk_kl(student_logits, teacher_logits, self.tau, self.chunk_size)
        v = student_logits.shape[-1]
        return _ChunkedKL.apply(student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v),
                                self.tau, self.chunk_size)


class HardTargetLoss(nn.Module):
    """L_hard: next-token cross-entropy of logits ``[B, N, V]`` on ``input_ids`` ``[B, N]`` (float32)."""

    def forward(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


class SpADLoss(nn.Module):
    """The weighted sum of the SpAD terms; a term with weight 0 is switched off and not computed.

    ``student_config`` is a :class:`BiSpikCLMConfig`, or the Hugging Face config of an ANN student (the same-shape
    baseline of :mod:`bispikclm.ann`), which gets the same terms without their Rate-MSE parts.

    ``forward`` returns ``(loss, {term: value})`` with every active term's unweighted value (detached)."""

    def __init__(self, student_config, teacher_config=None, weights: dict | None = None,
                 tau: float = 2.0, vocab_chunk_size: int = 8192, rate_targets: str = "paper") -> None:
        super().__init__()
        weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown SpAD terms {sorted(unknown)} (known: {TERMS})")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"SpAD weights must be >= 0 with at least one > 0, got {weights}")
        total = sum(weights.values())
        self.weights = {name: w / total for name, w in weights.items()}      # active terms sum to one
        self.active = [name for name in TERMS if self.weights[name] > 0]
        self.spiking = isinstance(student_config, BiSpikCLMConfig)
        if self.needs_teacher and teacher_config is None:
            raise ValueError(f"SpAD terms {self.active} need a teacher")
        self.hard = HardTargetLoss()
        if not self.needs_teacher:
            return
        # Hugging Face configs map these names for every architecture (GPT-2: n_embd, n_layer)
        d_s, d_t = student_config.hidden_size, teacher_config.hidden_size
        l_s = student_config.num_hidden_layers
        self.map = layer_map(l_s, teacher_config.num_hidden_layers)
        if self.spiking and "feat" in self.active and student_config.signed("block_in"):
            raise ValueError("the feature term's Rate-MSE targets are rates of unsigned block-input neurons; with "
                             "signed block_in pairs set train.weights.feat to 0")
        if self.spiking:
            t_steps = student_config.time_steps
            attn, block = student_config.neuron_kwargs("attn"), student_config.neuron_kwargs("block_in")
            attn_rate, block_rate = (attn["beta"], attn["threshold"], t_steps), (block["beta"], block["threshold"], t_steps)
        else:
            attn_rate = block_rate = (None, None, None)
        self.emb = EmbeddingLoss(d_s, d_t)
        self.attn = AttentionLoss(*attn_rate, targets=rate_targets)
        self.feat = FeatureLoss(d_s, d_t, l_s, *block_rate, targets=rate_targets)
        self.soft = SoftTargetLoss(tau, vocab_chunk_size)

    @property
    def needs_teacher(self) -> bool:
        return any(name != "hard" for name in self.active)

    def student_outputs(self) -> dict[str, bool]:
        """Keyword arguments the student's forward needs for the active terms."""
        wanted = dict(output_hidden_states="emb" in self.active or "feat" in self.active,
                      output_attentions="attn" in self.active)
        if self.spiking:
            wanted["output_spike_rates"] = "feat" in self.active
        return wanted

    def forward(self, student_out, teacher_out: TeacherOutput | None, input_ids: torch.Tensor):
        terms: dict[str, torch.Tensor] = {}
        if "hard" in self.active:
            terms["hard"] = self.hard(student_out.logits, input_ids)
        if "soft" in self.active:
            terms["soft"] = self.soft(student_out.logits, teacher_out.logits)
        if "emb" in self.active:
            terms["emb"] = self.emb(student_out.hidden_states[0], teacher_out.hidden_states[0])
        if "attn" in self.active:
            terms["attn"] = self.attn(student_out.attentions, [teacher_out.attentions[j - 1] for j in self.map])
        if "feat" in self.active:
            terms["feat"] = self.feat(
                student_out.hidden_states[1:], getattr(student_out, "spike_rates", None),
                [teacher_out.hidden_states[j] for j in self.map],
                [teacher_out.hidden_states[0]] + [teacher_out.hidden_states[j] for j in self.map[:-1]],
                student_out.hidden_states[:-1])
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return loss, {name: value.detach() for name, value in terms.items()}


class _Recorded:
    """Sums that forward hooks collect while :meth:`recording` is active (``self._sums``; ``None`` outside), and
    the hooks' removal."""

    _sums: list | None
    handles: list

    @contextlib.contextmanager
    def recording(self):
        self._sums = []
        try:
            yield
        finally:
            self._sums = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class FiringRateLoss(_Recorded):
    """The student's mean firing rate, kept differentiable: every spike of every LIF neuron over every neuron
    update (the rate :meth:`bispikclm.neurons.FiringRateRecorder.overall` reports; entries outside a call's
    ``valid`` mask, such as non-causal attention entries, are not counted). Weighting it in the loss
    (``TrainConfig.rate_cost``) trains towards fewer spikes everywhere, including the neurons whose spikes only
    enter the residual stream, which :class:`SpikeCostLoss` does not charge (they read no weights). Its gradient
    flows through the neurons' surrogate gradients. Forward hooks collect the sums while :meth:`recording` is
    active.

    ``exempt``: neuron groups (:data:`~bispikclm.configuration.NEURON_GROUPS`, e.g. ``("attn",)`` for the
    attention map) left out of the rate, which is then the mean over the other neurons
    (``TrainConfig.rate_exempt``)."""

    def __init__(self, model, exempt: tuple[str, ...] | list[str] = ()) -> None:
        self._sums: list | None = None
        neurons = [n for name, n in model.neurons().items() if neuron_group(name)[1] not in exempt]
        if not neurons:
            raise ValueError(f"every neuron group is exempt ({sorted(exempt)}): the rate cost has nothing to charge")
        self.handles = [n.register_forward_hook(self._hook, with_kwargs=True) for n in neurons]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, spikes: torch.Tensor) -> None:
        if self._sums is None or torch._C._current_graph_task_id() != -1:   # not recording, or a replay in backward
            return
        valid = kwargs.get("valid", args[1] if len(args) > 1 else None)
        if valid is None:
            self._sums.append((spikes.sum(dtype=torch.float32), spikes.numel()))
        else:
            valid = valid.to(spikes.dtype).expand_as(spikes)
            self._sums.append(((spikes * valid).sum(dtype=torch.float32), valid.sum()))

    def value(self) -> torch.Tensor:
        """Spikes over neuron updates of the forward passes recorded so far in :meth:`recording`."""
        if not self._sums:
            raise RuntimeError("no neuron ran while recording")
        return torch.stack([f for f, _ in self._sums]).sum() / sum(float(n) for _, n in self._sums)


class SpikeCostLoss(_Recorded):
    """Differentiable estimate of what the student's linear layers cost per token, as a fraction of what the
    same-shape ANN's linear layers (head included) cost::

        L_cost = (E_AC / E_MAC) · Σ_linear Σ_t Σ_inputs x · fan_out  /  (tokens · Σ_linear in · out)

    ``x`` are the spikes (or integer spike counts, P·V into ``out_proj``) entering every :class:`SpikeLinear`,
    and the head when ``spiking_head`` is set: the accumulate count the energy report counts for those layers.
    Its gradient flows through the neurons' surrogate gradients, so weighting it in the loss
    (``TrainConfig.spike_cost``) trains the student towards fewer spikes where spikes are expensive. A float
    head costs what the ANN's does and does not depend on the spikes; it stays in the denominator only.

    Forward hooks on the linear layers collect the sums while :meth:`recording` is active."""

    def __init__(self, model, ac_over_mac: float | None = None) -> None:
        if ac_over_mac is None:   # the energy report's default table (45 nm)
            ac_over_mac = EnergyTable().ac_pj / EnergyTable().mac_pj
        self.ac_over_mac, self._sums = ac_over_mac, None
        layers = [m for m in model.modules() if isinstance(m, SpikeLinear)]
        if model.config.spiking_head:
            layers.append(model.lm_head)
        self.ann_macs = sum(m.in_features * m.out_features for m in layers) + (
            0 if model.config.spiking_head else model.lm_head.in_features * model.lm_head.out_features)
        # out_proj of attention with signed V reads P (V⁺ - V⁻), counts of either sign: each costs |x| ACs
        self.signed_inputs = {id(m.out_proj) for m in model.modules() if isinstance(m, SFSA) and m.signed[2]}
        self.handles = [m.register_forward_hook(self._hook) for m in layers]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        if id(module) in self.signed_inputs:
            # |x| keeps x for its backward; it runs whenever autograd records, so that a block recomputed by
            # gradient checkpointing saves what its forward saved
            if self._sums is None and not (torch.is_grad_enabled() and x.requires_grad):
                return
            total = x.abs().sum(dtype=torch.float32)
        elif self._sums is None:
            return
        else:
            total = x.sum(dtype=torch.float32)
        if self._sums is not None:
            self._sums.append(total * module.out_features)

    def value(self, tokens: int) -> torch.Tensor:
        """The estimate for the forward passes recorded so far in :meth:`recording`, over ``tokens`` tokens."""
        if not self._sums:
            raise RuntimeError("no spiking linear layer ran while recording")
        return self.ac_over_mac * torch.stack(self._sums).sum() / (tokens * self.ann_macs)
