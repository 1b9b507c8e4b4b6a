"""Each SpAD term alone, against a direct computation, and the weighted sum."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from transformers import AutoModelForCausalLM

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.configuration import NEURON_GROUPS
from bispikclm.modeling import neuron_group
from bispikclm.distill.init import init_from_teacher
from bispikclm.distill.losses import (AttentionLoss, EmbeddingLoss, FeatureLoss, FiringRateLoss, HardTargetLoss,
                                      SoftTargetLoss, SpADLoss, layer_map, projector, rate_target)
from bispikclm.distill.teacher import TeacherOutput
from bispikclm.neurons import FiringRateRecorder, LIFNeuron
from helpers import make_teacher, make_tokenizer


def test_rate_target_is_the_firing_rate_of_the_lif_neuron_under_constant_current():
    value = torch.tensor([-1.0, 0.3, 0.6, 1.0, 2.5])
    neuron = LIFNeuron(beta=0.5, threshold=1.0, backend="reference")
    expected = neuron(value.expand(4, -1)).mean(0)
    assert torch.equal(rate_target(value, 0.5, 1.0, 4), expected)
    # U1 = 0.6, U2 = 0.9, U3 = 1.05 -> fires at t = 3 only; 1.0 fires at t = 1, 3 (soft reset)
    assert rate_target(value, 0.5, 1.0, 4).tolist() == [0.0, 0.0, 0.25, 0.5, 1.0]


def test_layer_map_is_uniform_and_projector_starts_as_identity():
    assert layer_map(2, 2) == [1, 2] and layer_map(2, 4) == [2, 4] and layer_map(3, 12) == [4, 8, 12]
    x = torch.randn(2, 3, 8)
    assert isinstance(projector(8, 8), torch.nn.Identity)
    assert torch.equal(projector(8, 12)(x)[..., :8], x) and torch.equal(projector(8, 12)(x)[..., 8:], 0 * x[..., :4])


def test_embedding_loss_compares_directions_not_scales():
    t = torch.randn(2, 5, 16)
    loss = EmbeddingLoss(16, 16)
    assert loss(50 * t, t) < 1e-6 and loss(torch.randn(2, 5, 16), t) > 0.5
    wide = EmbeddingLoss(16, 24)
    assert sum(p.numel() for p in wide.parameters()) == 16 * 24 + 24


def test_attention_loss_is_mse_plus_rate_mse_over_causal_entries():
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(2, 4, 6, 6).masked_fill(~torch.ones(6, 6).bool().tril(), -1e9), -1)
    student = (torch.rand(2, 4, 6, 6) > 0.5).float().tril()
    causal = torch.ones(6, 6).bool().tril()
    s, t = student[..., causal], teacher[..., causal]
    target = LIFNeuron(0.5, 0.05)(t.expand(2, *t.shape)).mean(0)
    expected = F.mse_loss(s, t) + F.mse_loss(s, target)
    assert torch.allclose(AttentionLoss(0.5, 0.05, 2)([student], [teacher]), expected)
    # differing head counts are compared head-averaged
    assert AttentionLoss(0.5, 0.05, 2)([student], [teacher[:, :2]]).isfinite()


def test_feature_loss_adds_rate_mse_on_block_input_spikes():
    torch.manual_seed(0)
    hidden_t, inputs_t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    rate = torch.rand(2, 5, 8)
    loss = FeatureLoss(8, 8, 1, beta=0.5, threshold=1.0, time_steps=2)
    target = rate_target(F.layer_norm(inputs_t, (8,)), 0.5, 1.0, 2)
    expected = F.mse_loss(F.layer_norm(3 * hidden_t, (8,)), F.layer_norm(hidden_t, (8,))) + F.mse_loss(rate, target)
    assert torch.allclose(loss([3 * hidden_t], [rate], [hidden_t], [inputs_t]), expected, atol=1e-6)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_soft_target_loss_matches_tau_squared_kl_and_its_gradient(chunk):
    torch.manual_seed(0)
    student = torch.randn(2, 3, 100, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 100, dtype=torch.float64)
    tau = 2.0
    expected = tau**2 * F.kl_div(F.log_softmax(student / tau, -1).reshape(-1, 100),
                                 F.log_softmax(teacher / tau, -1).reshape(-1, 100), log_target=True,
                                 reduction="batchmean")
    (grad_expected,) = torch.autograd.grad(expected, student)
    got = SoftTargetLoss(tau, chunk)(student, teacher)
    (grad,) = torch.autograd.grad(got, student)
    assert torch.allclose(got, expected) and torch.allclose(grad, grad_expected)
    assert torch.autograd.gradcheck(lambda s: SoftTargetLoss(tau, chunk)(s, teacher), (student,))


def test_soft_target_loss_keeps_half_precision_logits_as_they_are():
    student = torch.randn(4, 50, dtype=torch.bfloat16, requires_grad=True)
    loss = SoftTargetLoss(2.0, 16)(student, torch.randn(4, 50, dtype=torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16


def test_hard_target_loss_is_the_models_own_next_token_loss():
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset("tiny", vocab_size=64, hidden_size=32, ffn_dim=64))
    ids = torch.randint(0, 64, (2, 10))
    out = model(ids, labels=ids, use_cache=False)
    assert torch.allclose(HardTargetLoss()(out.logits, ids), out.loss)


def _pair():
    torch.manual_seed(0)
    config = BiSpikCLMConfig.from_preset("tiny", vocab_size=64, hidden_size=32, ffn_dim=64, num_attention_heads=4)
    model = BiSpikCLMForCausalLM(config)
    ids = torch.randint(0, 64, (2, 10))
    teacher = TeacherOutput(torch.randn(2, 10, 64), tuple(torch.randn(2, 10, 32) for _ in range(3)),
                            tuple(torch.softmax(torch.randn(2, 4, 10, 10), -1) for _ in range(2)))
    return config, model, ids, teacher


def test_spad_loss_logs_every_term_and_switches_terms_off():
    config, model, ids, teacher = _pair()
    spad = SpADLoss(config, config)
    out = model(ids, use_cache=False, **spad.student_outputs())
    loss, terms = spad(out, teacher, ids)
    assert set(terms) == {"emb", "attn", "feat", "soft", "hard"}
    assert spad.weights == {"emb": 0.2, "attn": 0.1, "feat": 0.1, "soft": 0.3, "hard": 0.3}
    assert torch.allclose(loss.detach(), sum(spad.weights[k] * v for k, v in terms.items()))
    loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0

    ce = SpADLoss(config, None, {"emb": 0, "attn": 0, "feat": 0, "soft": 0, "hard": 1})
    assert not ce.needs_teacher and ce.student_outputs() == dict(
        output_hidden_states=False, output_attentions=False, output_spike_rates=False)
    loss, terms = ce(model(ids, use_cache=False), None, ids)
    assert set(terms) == {"hard"}
    with pytest.raises(ValueError, match="need a teacher"):
        SpADLoss(config, None, {"soft": 0.5})
    with pytest.raises(ValueError, match="unknown SpAD terms"):
        SpADLoss(config, config, {"kd": 1.0})


def test_spad_aligns_a_smaller_student_with_a_real_gpt2_teacher():
    from transformers import GPT2Config, GPT2LMHeadModel

    from bispikclm.distill import teacher_forward
    from bispikclm.distill.teacher import freeze

    torch.manual_seed(0)
    teacher = freeze(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=48, n_layer=4, n_head=6, n_positions=32,
                                                bos_token_id=0, eos_token_id=0)))
    config = BiSpikCLMConfig.from_teacher_config(teacher.config, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, ffn_dim=64)
    student = BiSpikCLMForCausalLM(config)
    spad = SpADLoss(config, teacher.config)
    assert spad.map == [2, 4]
    ids = torch.randint(0, 64, (2, 12))
    loss, terms = spad(student(ids, use_cache=False, **spad.student_outputs()), teacher_forward(teacher, ids), ids)
    loss.backward()
    assert set(terms) == {"emb", "attn", "feat", "soft", "hard"} and all(v.isfinite() for v in terms.values())
    assert spad.emb.proj.weight.grad.abs().sum() > 0 and spad.feat.projs[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["opt", "llama-gqa"])
def test_init_from_teacher_copies_embeddings_and_rescaled_block_weights(arch, data_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(str(make_teacher(arch, tmp_path / "t", make_tokenizer(
        data_dir, tmp_path / "tok"))))
    torch.manual_seed(0)
    student = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(teacher.config, max_position_embeddings=64))
    before = student.model.layers[0].self_attn.q_proj.weight.std()
    done = init_from_teacher(student, teacher, "all")
    assert torch.equal(student.model.embed_tokens.weight, teacher.get_input_embeddings().weight)
    teacher_blocks = teacher.model.decoder.layers if arch == "opt" else teacher.model.layers
    q_s, q_t = student.model.layers[0].self_attn.q_proj.weight, teacher_blocks[0].self_attn.q_proj.weight
    assert torch.allclose(q_s / q_s.std(), q_t / q_t.std(), atol=1e-5) and torch.isclose(q_s.std(), before, rtol=1e-4)
    assert ("model.embed_positions.weight" in done) == (arch == "opt")
    ids = torch.randint(0, student.config.vocab_size, (1, 64))
    current = student.model.embed(ids, torch.arange(64)[None]).detach()
    assert 0.5 < float(current.std()) < 2.0                       # input gain reset to unit-scale currents
    gated = [n for n in done if "ffn.gate_proj" in n]
    assert bool(gated) == (arch == "llama-gqa")


def test_narrower_student_gets_the_principal_directions_of_the_teacher_embedding(data_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(str(make_teacher("opt", tmp_path / "t", make_tokenizer(
        data_dir, tmp_path / "tok"))))
    student = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(teacher.config, hidden_size=16))
    init_from_teacher(student, teacher, "all")
    e_t = teacher.get_input_embeddings().weight
    e_s = student.model.embed_tokens.weight.detach()
    # the rows projected on the 16 leading principal directions, each direction scaled to the student's init spread
    centered = e_t - e_t.mean(0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    expected = centered @ vh[:16].t()
    expected = expected * (student.config.initializer_range / expected.std(0))
    torch.testing.assert_close(e_s - e_s.mean(0), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(e_s.std(0), torch.full((16,), student.config.initializer_range), rtol=1e-4)
    assert not any("layers" in n for n in init_from_teacher(student, teacher, "all"))


def test_matched_attention_targets_put_the_teacher_map_on_the_binary_maps_scale():
    """A row attending uniformly over its n keys maps to all ones; a peaked row to one key on."""
    n = 4
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    peaked = torch.zeros(n, n)
    peaked[torch.arange(n), 0] = 1.0
    teacher = torch.stack([uniform, peaked])[:, None]            # [B=2, H=1, N, N]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    matched = AttentionLoss(0.5, 0.05, 2, targets="matched")
    assert float(matched([torch.stack([causal.float(), peaked])[:, None]], [teacher])) == 0.0
    paper = AttentionLoss(0.5, 0.05, 2)
    assert float(paper([torch.stack([causal.float(), peaked])[:, None]], [teacher])) > 0.05


def test_spad_weights_are_normalized_to_sum_to_one():
    config = BiSpikCLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                             max_position_embeddings=8)
    spad = SpADLoss(config, config, {"emb": 0, "attn": 0, "feat": 0, "soft": 1, "hard": 3})
    assert spad.weights == {"emb": 0, "attn": 0, "feat": 0, "soft": 0.25, "hard": 0.75}
    with pytest.raises(ValueError, match=">= 0"):
        SpADLoss(config, config, {"hard": -1})


def test_matched_feature_targets_drive_the_neuron_on_the_students_own_scale():
    """When the student's block input is an affine copy of the teacher's state (per token), the matched target is
    the rate of the student's own neuron on that input: a student firing exactly so has zero Rate-MSE."""
    torch.manual_seed(0)
    teacher_state = torch.randn(2, 5, 16)
    student_input = 3.0 * teacher_state + 1.0
    own_rate = rate_target(student_input, 0.5, 1.0, 2)
    matched = FeatureLoss(16, 16, 1, 0.5, 1.0, 2, targets="matched")
    paper = FeatureLoss(16, 16, 1, 0.5, 1.0, 2)
    args = ([teacher_state], [own_rate], [teacher_state], [teacher_state], [student_input])
    assert float(matched(*args)) == pytest.approx(0.0, abs=1e-6)
    assert float(paper(*args)) > 0.01


def test_ann_student_starts_from_the_same_teacher_information(data_dir, tmp_path):
    from bispikclm.ann import same_shape_ann

    teacher = AutoModelForCausalLM.from_pretrained(str(make_teacher("opt", tmp_path / "t", make_tokenizer(
        data_dir, tmp_path / "tok"))))
    config = BiSpikCLMConfig.from_teacher_config(teacher.config)
    ann = same_shape_ann(config)
    init_from_teacher(ann, teacher, "all")                      # same shape, same family: the teacher itself
    ids = torch.randint(0, config.vocab_size, (1, 20))
    assert torch.equal(ann(ids).logits, teacher(ids).logits)
    narrow = same_shape_ann(BiSpikCLMConfig.from_teacher_config(teacher.config, hidden_size=16))
    assert init_from_teacher(narrow, teacher, "all") == ["token embedding", "position embedding"]


@pytest.mark.parametrize("overrides", [{}, dict(per_channel_neurons=True, fire="count", beta=1.0,
                                                initial_membrane=0.5)])
def test_firing_rate_loss_is_the_recorded_overall_rate_and_has_a_gradient(overrides):
    """`train.rate_cost`'s term equals the spikes over neuron updates that FiringRateRecorder counts on the same
    forward pass (causal attention entries only), and its gradient reaches the weights that drive the neurons."""
    torch.manual_seed(0)
    config = BiSpikCLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                             max_position_embeddings=16, time_steps=2, **overrides)
    model = BiSpikCLMForCausalLM(config).train()
    rate = FiringRateLoss(model)
    input_ids = torch.randint(0, 50, (2, 12))
    with FiringRateRecorder(model.neurons()) as recorder, rate.recording():
        model(input_ids, use_cache=False)
        value = rate.value()
    assert 0 < value.item() < 1
    assert value.item() == pytest.approx(recorder.overall(), rel=1e-6)
    value.backward()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    model(input_ids, use_cache=False)        # not recording: nothing collected
    assert rate._sums is None
    rate.remove()


def test_firing_rate_loss_leaves_exempt_groups_out():
    """With ``exempt=("attn",)`` the term is the rate of every neuron but the attention map's, as counted by
    FiringRateRecorder on those neurons alone; exempting every group is refused."""
    torch.manual_seed(0)
    config = BiSpikCLMConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                             max_position_embeddings=16, time_steps=2)
    model = BiSpikCLMForCausalLM(config).train()
    rate = FiringRateLoss(model, exempt=("attn",))
    others = {n: m for n, m in model.neurons().items() if neuron_group(n)[1] != "attn"}
    assert len(others) < len(model.neurons())
    input_ids = torch.randint(0, 50, (2, 12))
    with FiringRateRecorder(model.neurons()) as everything, FiringRateRecorder(others) as recorder, rate.recording():
        model(input_ids, use_cache=False)
        value = rate.value()
    assert value.item() == pytest.approx(recorder.overall(), rel=1e-6)
    assert value.item() != pytest.approx(everything.overall(), rel=1e-3)
    with pytest.raises(ValueError, match="nothing to charge"):
        FiringRateLoss(model, exempt=NEURON_GROUPS)
