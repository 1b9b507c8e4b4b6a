"""Signed neuron pairs: two binary count neurons per channel, driven by I and -I, that together quantize to 2T + 1
levels. Each claim against a hand computation: the spike counts of a constant current, the quantizer that
calibration sets, the least-squares fits of the net spikes, the layers that read ``W·S⁺ - W·S⁻``, and the places
that must refuse the option."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import OPTConfig

from bispikclm import BiSpikCLMConfig
from bispikclm.distill.calibrate import net_spikes, quantize, ridge_fit, set_neuron_levels, set_time_steps
from bispikclm.energy import count_operations
from bispikclm.engine import PackedEngine, quantize_, spike_agreement
from bispikclm.configuration import SIGNED_GROUPS
from bispikclm.errors import InvalidConfig
from bispikclm.neurons import FiringRateRecorder, LIFNeuron
from bispikclm.spike_ops import SpikeLinear, spike_scale
from helpers import calibrated_opt, engine_and_model, first_block_spikes_and_teacher_q

T = 2
SIGNED = {group: {"signed": True} for group in SIGNED_GROUPS}


def constant(values: torch.Tensor, steps: int) -> torch.Tensor:
    return values.unsqueeze(0).expand(steps, *values.shape).contiguous()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_constant_current_gives_the_pair_the_counts_of_the_formula(steps):
    """k⁺ = clip(floor((T·I + U0) / θ), 0, T) and k⁻ = clip(floor((-T·I + U0⁻) / θ), 0, T), binary spikes in
    [S⁺, S⁻] order, never both in one channel when U0 + U0⁻ = θ."""
    theta = torch.tensor([0.5, 1.0, 2.0])
    initial = torch.tensor([0.25, 0.9, -1.0])
    neuron = LIFNeuron(beta=1.0, fire="count", per_channel=True, channels=3, signed=True)
    neuron.channel_threshold.copy_(theta)
    neuron.channel_initial.copy_(initial)
    neuron.channel_initial_negative.copy_(theta - initial)
    current = torch.linspace(-3, 3, 61)[:, None].expand(61, 3)
    spikes = neuron(constant(current, steps))
    assert spikes.shape == (steps, 61, 6)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    positive, negative = spikes[..., :3].sum(0), spikes[..., 3:].sum(0)
    assert torch.equal(positive, torch.floor((steps * current + initial) / theta).clamp(0, steps))
    assert torch.equal(negative, torch.floor((-steps * current + theta - initial) / theta).clamp(0, steps))
    assert not bool(((positive > 0) & (negative > 0)).any())


def test_without_per_channel_thresholds_the_pair_rounds_around_zero():
    """θ/2 on both neurons: k⁺ - k⁻ = round(T·I/θ) clipped to [-T, T], and no spike at all for |T·I| < θ/2."""
    neuron = LIFNeuron(beta=1.0, threshold=0.5, initial_membrane=0.5, fire="count", signed=True)
    current = torch.linspace(-1.2, 1.2, 97)[:, None]
    spikes = neuron(constant(current, T))
    net = spikes[..., 0].sum(0) - spikes[..., 1].sum(0)
    assert torch.equal(net, torch.floor(T * current[:, 0] / 0.5 + 0.5).clamp(-T, T))
    assert spikes[:, (T * current[:, 0]).abs() < 0.25].sum() == 0


def test_lean_and_reference_pairs_give_the_same_spikes_and_gradients():
    torch.manual_seed(0)
    current = torch.randn(T, 5, 7, dtype=torch.float64)
    grad_out = torch.randn(T, 5, 14, dtype=torch.float64)
    out = {}
    for backend in ("reference", "lean"):
        neuron = LIFNeuron(beta=1.0, threshold=0.7, initial_membrane=0.5, fire="count", signed=True, backend=backend)
        x = current.clone().requires_grad_()
        spikes = neuron(x)
        (spikes * grad_out).sum().backward()
        out[backend] = (spikes, x.grad)
    assert torch.equal(out["reference"][0], out["lean"][0])
    torch.testing.assert_close(out["reference"][1], out["lean"][1], rtol=1e-12, atol=1e-12)
    assert out["lean"][1].abs().sum() > 0


def test_set_neuron_levels_makes_the_pair_the_2t_plus_1_level_quantizer_of_the_interval():
    lo, hi = torch.tensor([-1.0, 0.0, 0.5]), torch.tensor([1.0, 2.0, 0.75])
    neuron = LIFNeuron(beta=1.0, fire="count", per_channel=True, channels=3, signed=True)
    set_neuron_levels(neuron, lo, hi, T)
    # off the exact halves between levels, which the pair rounds away from the centre and quantize() upwards
    values = torch.linspace(-2, 3, 501)[:, None].expand(501, 3) + torch.tensor([3e-4, 1e-3, 2e-3])
    net = net_spikes(neuron(constant(values, T)), neuron).sum(0)            # k⁺ - k⁻ in [-T, T]
    levels = (lo + hi) / 2 + (hi - lo) / (2 * T) * net
    torch.testing.assert_close(levels, quantize(values, lo, hi, 2 * T))


def test_layers_read_the_pair_as_w_s_plus_minus_w_s_minus():
    torch.manual_seed(0)
    linear = SpikeLinear(4, 3, signed=True)
    spikes = (torch.rand(T, 5, 8) < 0.4).float()
    net = spikes[..., :4] - spikes[..., 4:]
    torch.testing.assert_close(linear(spikes), torch.nn.functional.linear(net, linear.weight, linear.bias))
    weight = torch.rand(4)
    torch.testing.assert_close(spike_scale(spikes, weight, signed=True), net * weight)


@pytest.fixture(scope="module")
def calibrated_pairs():
    return calibrated_opt(T, neuron_overrides=SIGNED)


def test_calibrated_pairs_feed_least_squares_fits_of_their_net_spikes(calibrated_pairs):
    teacher, student, sequences = calibrated_pairs
    spikes, q_teacher = first_block_spikes_and_teacher_q(teacher, student, sequences)
    block = student.model.layers[0]
    assert spikes.shape[-1] == 128 and set(spikes.unique().tolist()) <= {0.0, 1.0}
    weight, bias = ridge_fit(net_spikes(spikes, block.attn_in_neuron).mean(0).reshape(-1, 64),
                             q_teacher.reshape(-1, 64))
    q = block.self_attn.q_proj
    scale = q.weight.detach().double() / weight   # rescaled to the initialization's spread, as unsigned fits are
    torch.testing.assert_close(scale, torch.full_like(scale, float(scale.mean())), rtol=1e-4, atol=1e-6)


def test_set_time_steps_keeps_each_pair_the_quantizer_of_its_interval(calibrated_pairs):
    _, student, _ = calibrated_pairs
    neuron = student.model.layers[1].ffn_in_neuron
    theta = neuron.channel_threshold.clone()
    centre = (theta / 2 - neuron.channel_initial) / T
    lo, hi = centre - theta, centre + theta
    values = torch.linspace(-3, 3, 61)[:, None].expand(61, 64)
    try:
        set_time_steps(student, 4)
        net = net_spikes(neuron(constant(values, 4)), neuron).sum(0)
        torch.testing.assert_close(centre + theta / 4 * net, quantize(values, lo, hi, 8), rtol=1e-5, atol=1e-5)
    finally:
        set_time_steps(student, T)
    torch.testing.assert_close(neuron.channel_initial_negative, theta / 2 + T * centre)


def test_a_pair_counts_as_two_neurons_and_its_spikes_as_what_fired(calibrated_pairs):
    _, student, sequences = calibrated_pairs
    neuron = student.model.layers[0].attn_in_neuron
    with torch.no_grad(), FiringRateRecorder({"block_in": neuron}) as recorder:
        spikes = neuron(constant(torch.randn(4, 64), T))
    assert recorder.rates()["block_in"] == pytest.approx(float(spikes.mean()))
    report = count_operations(student, sequences[:1, :16])
    updates = sum(e.count for e in report.entries if e.kind == "neuron_update" and e.layer == 0
                  and e.name == "attn_in_neuron")
    assert updates == 2 * T * 16 * 64


@pytest.mark.parametrize("bits", [8, 4])
def test_engine_reproduces_a_calibrated_student_with_pairs_spike_for_spike(calibrated_pairs, bits):
    """int8 (and 4-bit) weights: the engine reads rows W, then -W, for the pair's [S⁺, S⁻] and gives the PyTorch
    model's spikes, counts and greedy tokens, prefill and one-token decode alike."""
    _, student, _ = calibrated_pairs
    model = copy.deepcopy(student)
    quantize_(model, head=True, bits=bits)
    ids = torch.randint(0, 300, (48,))
    engine = PackedEngine.from_model(model, int8=True, bits=bits)
    assert engine.fused is None                 # the one-call kernel runs unsigned neurons only
    ours, theirs, steps, logits = engine_and_model(model, ids, prefill=32, int8=True, bits=bits)
    assert ours["model.layers.0.attn_in_neuron"].shape[-1] == 128
    assert spike_agreement(ours, theirs) == 1.0
    assert torch.equal(steps.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("overrides, match", [
    ({"q": {"signed": True}}, "signed neuron pairs are for"),
    ({"block_in": {"signed": True, "fire": "step"}}, "needs fire='count'"),
])
def test_config_refuses_pairs_where_they_cannot_run(overrides, match):
    with pytest.raises(InvalidConfig, match=match):
        BiSpikCLMConfig.from_preset("tiny", fire="count", neuron_overrides=overrides)
    with pytest.raises(ValueError, match="fire='count'"):
        LIFNeuron(signed=True)


def test_the_rate_mse_of_the_feature_term_refuses_signed_block_inputs():
    from bispikclm.distill.losses import SpADLoss
    config = BiSpikCLMConfig.from_preset("tiny", fire="count", neuron_overrides=SIGNED)
    teacher = OPTConfig(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512)
    with pytest.raises(ValueError, match="train.weights.feat to 0"):
        SpADLoss(config, teacher, weights={"feat": 1.0, "soft": 1.0})
    SpADLoss(config, teacher, weights={"feat": 0.0, "emb": 0.0, "attn": 0.0, "soft": 0.8, "hard": 0.2})
