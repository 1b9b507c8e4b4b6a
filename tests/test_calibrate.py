"""Per-channel neurons, the relative surrogate, and calibration from the teacher, each against a direct computation:
a constant current gives the spike count the quantizer formula says; the refitted layers are the least-squares
fits of the student's own spikes to the teacher's pre-activations; the engine reproduces a calibrated student
spike for spike."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from transformers import OPTConfig, OPTForCausalLM

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.distill.calibrate import fit_levels, quantize, ridge_fit, set_neuron_levels, set_time_steps
from bispikclm.distill.init import init_from_teacher, teacher_layer_of
from bispikclm.engine import quantize_, spike_agreement
from bispikclm.neurons import LIFNeuron, surrogate_grad
from helpers import (calibrated_opt, cli, engine_and_model, first_block_spikes_and_teacher_q, make_teacher,
                     make_tokenizer, write_recipe)

T = 2


def constant(values: torch.Tensor, steps: int) -> torch.Tensor:
    return values.unsqueeze(0).expand(steps, *values.shape).contiguous()


@pytest.mark.parametrize("fire", ["step", "count"])
def test_per_channel_neuron_fires_the_quantizer_count(fire):
    """IF (beta 1) or count neuron, per-channel θ and U0, constant current I: clip(floor((T·I + U0) / θ), 0, T)."""
    theta = torch.tensor([0.5, 1.0, 2.0, 0.25])
    initial = torch.tensor([0.1, 0.5, 1.0, 0.0])
    neuron = LIFNeuron(beta=1.0, fire=fire, per_channel=True, channels=4)
    neuron.channel_threshold.copy_(theta)
    neuron.channel_initial.copy_(initial)
    current = torch.linspace(-1, 3, 41)[:, None].expand(41, 4)
    for steps in (2, 4):
        spikes = neuron(constant(current, steps))
        assert set(spikes.unique().tolist()) <= {0.0, 1.0}
        expected = torch.floor((steps * current + initial) / theta).clamp(0, steps)
        if fire == "step":       # an IF neuron quantizes a constant current only while U0 < θ
            keep = initial < theta
            assert torch.equal(spikes.sum(0)[:, keep], expected[:, keep])
        else:
            assert torch.equal(spikes.sum(0), expected)


def test_set_neuron_levels_makes_the_uniform_quantizer_of_the_interval():
    lo, hi = torch.tensor([-1.0, 0.0, 0.5]), torch.tensor([1.0, 2.0, 0.75])
    neuron = LIFNeuron(beta=1.0, fire="count", per_channel=True, channels=3)
    set_neuron_levels(neuron, lo, hi, 4)
    values = torch.linspace(-2, 3, 501)[:, None].expand(501, 3) + torch.tensor([0.0, 1e-3, 2e-3])
    levels = lo + (hi - lo) * neuron(constant(values, 4)).sum(0) / 4
    torch.testing.assert_close(levels, quantize(values, lo, hi, 4))
    # nearest level: the error is at most half a step inside the interval
    inside = (values >= lo) & (values <= hi)
    assert ((levels - values).abs()[inside] <= ((hi - lo) / 8).expand_as(values)[inside] + 1e-6).all()


def test_fit_levels_is_the_best_quantile_pair():
    torch.manual_seed(0)
    values = torch.randn(2000, 3) * torch.tensor([1.0, 0.1, 5.0]) + torch.tensor([0.0, 1.0, -2.0])
    lo, hi = fit_levels(values, T)
    err = (quantize(values, lo, hi, T) - values).square().mean(0)
    for ql in (0.0, 0.05, 0.2):        # no listed quantile pair does better on any channel
        for qh in (1.0, 0.95, 0.8):
            other = (quantize(values, values.quantile(ql, 0), values.quantile(qh, 0), T) - values).square().mean(0)
            assert (err <= other + 1e-6).all()
    assert (err < values.var(0)).all()


def test_relative_surrogate_is_the_surrogate_of_u_over_theta():
    theta = torch.tensor([0.5, 2.0])
    for surrogate in ("arctan", "sigmoid", "triangle"):
        neuron = LIFNeuron(beta=1.0, surrogate=surrogate, per_channel=True, channels=2, relative_surrogate=True,
                           backend="reference")
        neuron.channel_threshold.copy_(theta)
        neuron.channel_initial.zero_()
        current = torch.tensor([[0.3, 1.7]], requires_grad=True)
        neuron(current).sum().backward()
        expected = surrogate_grad((current.detach() - theta) / theta, surrogate, neuron.alpha) / theta
        torch.testing.assert_close(current.grad, expected)


def test_ridge_fit_is_least_squares():
    torch.manual_seed(0)
    x = torch.rand(500, 6)
    y = x @ torch.randn(6, 3) + torch.tensor([1.0, -2.0, 0.5]) + 0.01 * torch.randn(500, 3)
    weight, bias = ridge_fit(x, y, ridge=0.0)
    ones = torch.cat([x, torch.ones(500, 1)], 1).double()
    direct = torch.linalg.lstsq(ones, y.double()).solution
    torch.testing.assert_close(weight, direct[:6].T)
    torch.testing.assert_close(bias, direct[6])


def test_teacher_layer_map():
    assert [teacher_layer_of(i, 2, 3) for i in range(2)] == [1, 2]
    assert [teacher_layer_of(i, 4, 6) for i in range(4)] == [1, 2, 3, 5]     # round half to even, as losses.layer_map
    assert [teacher_layer_of(i, 2, 2) for i in range(2)] == [0, 1]


@pytest.fixture(scope="module")
def calibrated():
    """A small trained-free OPT teacher, its same-shape per-channel count student calibrated on random text."""
    return calibrated_opt(T)


def test_calibrated_layers_are_the_least_squares_fits_to_the_teacher(calibrated):
    teacher, student, sequences = calibrated
    spikes, q_teacher = first_block_spikes_and_teacher_q(teacher, student, sequences)
    block = student.model.layers[0]
    weight, bias = ridge_fit(spikes.mean(0).reshape(-1, 64), q_teacher.reshape(-1, 64))
    # the refit is rescaled to the initialization's spread, with the neuron's θ and U0 by the same factor
    q = block.self_attn.q_proj
    scale = q.weight.double() / weight
    torch.testing.assert_close(scale, torch.full_like(scale, float(scale.mean())), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.bias.double(), bias * float(scale.mean()), rtol=1e-4, atol=1e-5)
    want = config_std(student, q.in_features)
    assert math.isclose(float(q.weight.std()), want, rel_tol=1e-3)
    # residual weights are the output neuron's interval widths, rescaled back to the teacher's units
    assert student.model.input_gain == 1.0
    assert bool(((block.attn_in_neuron.channel_threshold) > 0).all())


def config_std(student, fan_in: int) -> float:
    cfg = student.config
    return cfg.weight_gain / math.sqrt(fan_in * cfg.input_rate)


def test_calibrated_student_is_closer_to_the_teacher_than_a_copy(calibrated):
    teacher, student, sequences = calibrated
    torch.manual_seed(1)
    copy = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(teacher.config, time_steps=T)).eval()
    init_from_teacher(copy, teacher, "all")
    held_out = torch.randint(0, 300, (8, 32))
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=held_out).logits, -1)
        kl = {name: float(torch.nn.functional.kl_div(torch.log_softmax(m(held_out).logits, -1), target,
                                                     log_target=True, reduction="batchmean"))
              for name, m in (("calibrated", student), ("copy", copy))}
    assert kl["calibrated"] < 0.5 * kl["copy"], kl


def test_set_time_steps_keeps_each_quantizer_interval(calibrated):
    _, student, _ = calibrated
    neuron = student.model.layers[1].ffn_in_neuron
    lo = (neuron.channel_threshold / 2 - neuron.channel_initial) / T
    values = torch.linspace(-3, 3, 61)[:, None].expand(61, 64)
    try:
        set_time_steps(student, 4)
        theta = neuron.channel_threshold
        levels = lo + theta * neuron(constant(values, 4)).sum(0) / 4
        torch.testing.assert_close(levels, quantize(values, lo, lo + theta, 4), rtol=1e-5, atol=1e-5)
    finally:
        set_time_steps(student, T)
    torch.testing.assert_close((neuron.channel_threshold / 2 - neuron.channel_initial) / T, lo)


def test_engine_reproduces_a_calibrated_student_spike_for_spike(calibrated):
    _, student, _ = calibrated
    quantize_(student, head=True)
    ids = torch.randint(0, 300, (48,))
    ours, theirs, steps, logits = engine_and_model(student, ids, prefill=32, int8=True)
    assert spike_agreement(ours, theirs) == 1.0
    assert torch.equal(steps.argmax(-1), logits.argmax(-1))


def test_calibration_refuses_what_it_cannot_do():
    teacher = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64))
    plain = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(teacher.config))
    with pytest.raises(ValueError, match="per_channel_neurons"):
        init_from_teacher(plain, teacher, "calibrated", calibration=torch.randint(0, 300, (2, 8)))
    with pytest.raises(ValueError, match="calibration sequences"):
        init_from_teacher(plain, teacher, "calibrated")


def test_train_command_calibrates_an_opt_teacher_and_refuses_a_llama_one(data_dir, tmp_path):
    tokenizer = make_tokenizer(data_dir, tmp_path / "tok")
    for arch in ("opt", "llama"):
        teacher = make_teacher(arch, tmp_path / arch, tokenizer)
        path = write_recipe(tmp_path / f"{arch}.yaml", teacher, data_dir, tokens=4 * 32 * 2)
        recipe = yaml.safe_load(path.read_text())
        recipe["student"].update(init="calibrated", fire="count", beta=1.0, initial_membrane=0.5)
        path.write_text(yaml.safe_dump(recipe))
        done = cli("train", str(path), "--out", str(tmp_path / f"run-{arch}"))
        if arch == "opt":
            assert done.returncode == 0, done.stderr[-2000:]
            student = BiSpikCLMForCausalLM.from_pretrained(str(tmp_path / "run-opt" / "model"))
            assert student.config.per_channel_neurons
            theta = student.model.layers[0].ffn.hidden_neuron.channel_threshold
            assert theta.shape == (64,) and float(theta.std()) > 0      # calibrated, one per channel
        else:
            assert done.returncode == 2, done.stderr[-2000:]
            assert done.stderr.strip().splitlines()[-1].startswith(
                "bispikclm train: error: student.init calibrated: calibration supports OPT-family teachers")
