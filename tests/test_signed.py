"""Signed neuron pairs: two binary count neurons per channel, driven by I and -I, that together quantize to 2T + 1
levels. Each claim against a hand computation: the spike counts of a constant current, the quantizer that
calibration sets, the least-squares fits of the net spikes, the layers that read ``W·S⁺ - W·S⁻``, ternary
attention when Q, K and V are pairs, and the places that must refuse the option."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import OPTConfig

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.attention import causal_mask
from bispikclm.distill.calibrate import net_spikes, quantize, ridge_fit, set_neuron_levels, set_time_steps
from bispikclm.energy import count_operations
from bispikclm.engine import PackedEngine, quantize_, spike_agreement
from bispikclm.configuration import SIGNED_GROUPS
from bispikclm.errors import InvalidConfig
from bispikclm.neurons import FiringRateRecorder, LIFNeuron
from bispikclm.spike_ops import SpikeLinear, spike_scale
from bispikclm.tracing import operand_kind
from helpers import calibrated_opt, engine_and_model, first_block_spikes_and_teacher_q

T = 2
SIGNED = {group: {"signed": True} for group in SIGNED_GROUPS}     # every group that can be a pair, Q, K, V too


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
    counts = ours["model.layers.0.self_attn.out_proj"]
    assert counts.min() < 0 < counts.max()       # O = P (V⁺ - V⁻): signed counts, read by the int8 rows as they are


def test_ternary_attention_against_a_hand_computation():
    """Q, K and V pairs: the scores are (Q⁺ - Q⁻)·(K⁺ - K⁻) summed by hand over each head's channels, the map is
    the attention neuron of those scores, and out_proj receives O = P (V⁺ - V⁻), causal, per time step."""
    config = BiSpikCLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, ffn_dim=64, max_position_embeddings=16, fire="count", beta=1.0,
                             initial_membrane=0.5, threshold=0.3, neuron_overrides=SIGNED)
    torch.manual_seed(0)
    attn = BiSpikCLMForCausalLM(config).eval().model.layers[0].self_attn
    x = (torch.rand(T, 1, 6, 64) < 0.3).float()                          # block-input pairs [S⁺, S⁻]
    seen = {}
    attn.out_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("o", a[0]))
    with torch.no_grad():
        attn(x)
        q = attn.q_neuron(attn.q_proj(x))[:, 0]                          # [T, N, 2 · H · dh]: [S⁺ | S⁻]
        k = attn.k_neuron(attn.k_proj(x))[:, 0]
        v = attn.v_neuron(attn.v_proj(x))[:, 0]
    assert set(q.unique().tolist()) <= {0.0, 1.0} and set(k.unique().tolist()) <= {0.0, 1.0}
    dh, hq = 16, 32
    net = lambda s, size: s[..., :size] - s[..., size:]  # noqa: E731
    qn, kn, vn = net(q, hq), net(k, dh), net(v, dh)
    expected = torch.zeros(T, 6, hq)
    scores_seen = []
    for h in range(2):                                                   # both query heads read K/V head 0
        scores = torch.zeros(T, 6, 6)
        for t in range(T):
            for i in range(6):
                for j in range(i + 1):
                    scores[t, i, j] = sum(float(qn[t, i, h * dh + c] * kn[t, j, c]) for c in range(dh))
        scores_seen.append(scores)
        mask = causal_mask(6, 6, None, x.device)[0, 0]
        with torch.no_grad():
            p = attn.attn_neuron(scores, valid=mask, input_scale=attn.attn_scale)
        assert set(p.unique().tolist()) <= {0.0, 1.0} and not bool(p[:, ~mask].any())
        expected[..., h * dh:(h + 1) * dh] = p @ vn
    assert min(float(s.min()) for s in scores_seen) < 0                 # ternary products: scores of either sign
    torch.testing.assert_close(seen["o"][:, 0], expected, rtol=0, atol=0)
    assert seen["o"].min() < 0


def test_signed_spike_operands_are_traced_as_signed_and_counted_by_their_magnitude():
    assert operand_kind(torch.tensor([-1.0, 0.0, 1.0])) == "signed"
    assert operand_kind(torch.tensor([-3, 0, 2], dtype=torch.int16)) == "signed"
    assert operand_kind(torch.tensor([0.0, 2.0])) == "count"
    assert operand_kind(torch.tensor([float("-inf"), 0.0])) == "float"            # an additive mask
    assert operand_kind(torch.tensor([torch.finfo(torch.float32).min, 0.0])) == "float"
    assert operand_kind(torch.tensor([-0.5, 1.0])) == "float"
    config = BiSpikCLMConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=64, max_position_embeddings=16, fire="count", beta=1.0, initial_membrane=0.5,
                             threshold=0.3, neuron_overrides=SIGNED)
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(config).eval()
    report = count_operations(model, torch.randint(0, 300, (1, 8)))
    qk = {e.kind: e for e in report.entries if e.name.endswith("Q·Kᵀ") and e.layer == 0}
    assert qk["ac"].operand == "signed" and 0 < qk["ac"].count
    assert qk["and_popcount"].count == 4 * qk["ac"].dense               # S⁺/S⁻ of Q against S⁺/S⁻ of K
    out = [e for e in report.entries if e.name == "self_attn.out_proj" and e.kind == "ac"]
    assert out and out[0].operand == "signed" and out[0].count > 0       # |O| ACs, not a sum that cancels


@pytest.mark.parametrize("overrides, match", [
    ({"attn": {"signed": True}}, "signed neuron pairs are for"),
    ({"ffn_hidden": {"signed": True}}, "signed neuron pairs are for"),
    ({"block_in": {"signed": True, "fire": "step"}}, "needs fire='count'"),
    ({"k": {"signed": True}, "attn": {"fire": "step"}}, "fire='count' for the attention map"),
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
