import pytest
import torch

from bispikclm.neurons import (SURROGATES, FiringRateRecorder, LIFNeuron, count_lean, count_reference, lif_lean,
                               lif_membrane, lif_reference)


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lean_equals_reference_outputs_and_gradients(surrogate, detach_reset, steps):
    torch.manual_seed(0)
    current = (torch.randn(steps, 3, 17, dtype=torch.float64) * 1.5).requires_grad_()
    grad_out = torch.randn(steps, 3, 17, dtype=torch.float64)
    out = {}
    for name, fn in [("reference", lif_reference), ("lean", lif_lean)]:
        x = current.detach().clone().requires_grad_()
        spikes = fn(x, 0.6, 0.8, surrogate, 2.0, detach_reset)
        (spikes * grad_out).sum().backward()
        out[name] = (spikes, x.grad)
    assert torch.equal(out["reference"][0], out["lean"][0])
    torch.testing.assert_close(out["reference"][1], out["lean"][1], rtol=1e-12, atol=1e-12)
    assert out["lean"][1].abs().sum() > 0


def test_dynamics_match_the_equations():
    current = torch.tensor([[0.6], [0.6], [0.6], [2.0]])
    beta, theta = 0.5, 1.0
    # U0 = .6 (no spike); U1 = .3 + .6 = .9 (no); U2 = .45 + .6 = 1.05 (spike); U3 = .525 + 2 - 1 = 1.525 (spike)
    assert lif_reference(current, beta, theta).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(lif_membrane(current, beta, theta).flatten(), torch.tensor([0.6, 0.9, 1.05, 1.525]))


def test_spikes_are_binary_and_membrane_is_bounded():
    torch.manual_seed(1)
    beta, theta = 0.7, 0.5
    current = torch.randn(64, 1000) * 3
    spikes = LIFNeuron(beta=beta, threshold=theta)(current)
    assert spikes.shape == current.shape
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    bound = (current.abs().max() + theta) / (1 - beta)
    assert lif_membrane(current, beta, theta).abs().max() <= bound


def test_lean_backward_keeps_one_float_tensor():
    current = torch.randn(4, 8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lif_lean(current * 1.0, 0.5, 1.0)
    assert len(saved) == 1 and saved[0].shape == current.shape
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lif_reference(current * 1.0, 0.5, 1.0)
    assert len(saved) == 4  # one per time step, plus a graph node per operation


def test_firing_rate_recorder_counts_valid_entries_and_leaves_the_neuron_stateless():
    neuron = LIFNeuron(threshold=1.0)
    current = torch.tensor([[[2.0, 2.0, 0.0, 0.0]]])
    with FiringRateRecorder({"n": neuron}) as recorder:
        neuron(current, valid=torch.tensor([True, True, True, False]))
        neuron(current)
    neuron(current)                                     # after the context: not counted
    assert recorder.counts["n"] == [4.0, 7.0]
    assert recorder.rates()["n"] == pytest.approx(4 / 7) and recorder.overall() == pytest.approx(4 / 7)
    assert not neuron._forward_hooks


def test_membrane_runs_in_float32_under_half_precision():
    torch.manual_seed(0)
    current = torch.randn(4, 1000).to(torch.bfloat16)
    neuron = LIFNeuron(beta=0.9, threshold=1.0)
    spikes = neuron(current)
    assert spikes.dtype == torch.bfloat16
    assert torch.equal(spikes.float(), lif_reference(current.float(), 0.9, 1.0))
    # a bf16 membrane would differ: small leak steps are lost at bf16 precision
    u, bf16_spikes = torch.zeros(1000, dtype=torch.bfloat16), []
    for t in range(4):
        u = 0.9 * u + current[t] - (bf16_spikes[-1] if bf16_spikes else 0)
        bf16_spikes.append((u >= 1.0).to(torch.bfloat16))
    assert not torch.equal(torch.stack(bf16_spikes).float(), spikes.float())


@pytest.mark.parametrize("kwargs, field", [(dict(beta=1.5), "beta"), (dict(beta=0.0), "beta"),
                                           (dict(initial_membrane=1.5), "initial_membrane"), (dict(fire="burst"), "fire"),
                                           (dict(threshold=0.0), "threshold"), (dict(surrogate="relu"), "surrogate")])
def test_bad_neuron_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LIFNeuron(**kwargs)


@pytest.mark.parametrize("detach_reset", [False, True])
def test_integer_levels_path_equals_reference(detach_reset):
    """The attention neuron keeps integer scores as uint8 and recomputes its membrane in backward."""
    torch.manual_seed(3)
    levels = torch.randint(0, 17, (4, 2, 3, 9, 9)).double().requires_grad_()
    grad_out = torch.randn(levels.shape, dtype=torch.float64)
    out = {}
    for backend in ("reference", "lean"):
        x = levels.detach().clone().requires_grad_()
        neuron = LIFNeuron(beta=0.5, threshold=0.3, backend=backend, detach_reset=detach_reset)
        spikes = neuron(x, input_scale=1 / 16)
        (spikes * grad_out).sum().backward()
        out[backend] = (spikes, x.grad)
    assert torch.equal(out["reference"][0], out["lean"][0])
    torch.testing.assert_close(out["reference"][1], out["lean"][1], rtol=1e-12, atol=1e-12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LIFNeuron(threshold=0.3)(levels * 1.0, input_scale=1 / 16)
    assert [t.dtype for t in saved] == [torch.uint8]


@pytest.mark.parametrize("learn", [("group", "group"), ("channel", "none"), ("channel", "group")])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_learned_thresholds_and_leak_get_the_same_gradients_in_both_backends(learn, detach_reset):
    torch.manual_seed(0)
    learn_threshold, learn_beta = learn
    current = torch.randn(4, 3, 16, dtype=torch.float64) * 1.5
    weight = torch.randn(4, 3, 16, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "lean"):
        neuron = LIFNeuron(beta=0.6, threshold=0.8, backend=backend, detach_reset=detach_reset,
                           learn_threshold=learn_threshold, learn_beta=learn_beta, channels=16).double()
        x = current.clone().requires_grad_(True)
        (neuron(x) * weight).sum().backward()
        grads[backend] = [x.grad] + [p.grad for p in neuron.parameters()]
    assert len(grads["lean"]) == 1 + (learn_threshold != "none") + (learn_beta != "none")
    for a, b in zip(grads["reference"], grads["lean"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads["lean"][1:])


def test_learned_threshold_on_attention_levels_matches_the_reference():
    torch.manual_seed(1)
    levels = torch.randint(0, 9, (2, 3, 5, 5)).double()
    grads = {}
    for backend in ("reference", "lean"):
        neuron = LIFNeuron(beta=0.5, threshold=0.3, backend=backend, learn_threshold="group").double()
        x = levels.clone().requires_grad_(True)
        (neuron(x, input_scale=0.125) * torch.linspace(-1, 1, 5, dtype=torch.float64)).sum().backward()
        grads[backend] = (x.grad, neuron.threshold_param.grad)
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- neuron quantization options ---------------------------------------------------------------------------------
CURRENTS = torch.linspace(-0.5, 3.0, 351, dtype=torch.float64)   # constant currents, in units of the threshold


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("initial", [0.0, 0.5])
@pytest.mark.parametrize("fire", ["step", "count"])
def test_constant_current_gives_the_spike_count_of_the_formula(steps, initial, fire):
    """IF (beta = 1) and count neurons driven by a constant current I for T steps fire
    clip(floor((T·I + initial) / θ), 0, T) times: floor with a membrane from 0, round from θ/2 (QCFS)."""
    theta = 0.8
    current = (CURRENTS * theta).expand(steps, -1)
    neuron = LIFNeuron(beta=1.0, threshold=theta, initial_membrane=initial, fire=fire)
    count = neuron(current).sum(0)
    expected = torch.floor((steps * current[0] + initial * theta) / theta + 1e-9).clamp(0, steps)
    assert torch.equal(count, expected)
    if initial == 0.5:          # a rounding quantizer: every current within half a level of its spike count
        inside = (current[0] >= 0) & (current[0] <= theta)
        error = (count * theta / steps - current[0])[inside].abs()
        assert error.max() <= theta / (2 * steps) + 1e-9


def test_a_leak_and_a_zero_membrane_bias_the_quantizer_downwards():
    """With beta < 1 and the membrane from 0, a constant current fires no more often than the IF neuron does."""
    theta, steps = 1.0, 4
    current = CURRENTS.expand(steps, -1)
    leaky = LIFNeuron(beta=0.5, threshold=theta)(current).sum(0)
    integrate = LIFNeuron(beta=1.0, threshold=theta)(current).sum(0)
    assert (leaky <= integrate).all() and (leaky < integrate).any()


def test_count_firing_fires_first_and_depends_only_on_the_summed_input():
    current = torch.tensor([[0.0, 2.0, 0.4], [2.0, 0.0, 0.4]])     # T = 2: the same sums 2, 2 and 0.8
    spikes = LIFNeuron(threshold=1.0, fire="count")(current)
    assert spikes.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    # the step-by-step neuron fires once for [0, 2] (the first step is lost), twice for [2, 0] (leak 0.5)
    assert LIFNeuron(beta=0.5, threshold=1.0)(current)[:, :2].sum(0).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_count_lean_equals_reference_outputs_and_gradients(surrogate, steps):
    torch.manual_seed(0)
    current = torch.randn(steps, 3, 17, dtype=torch.float64) * 1.5
    threshold = torch.rand(17, dtype=torch.float64) + 0.5
    grad_out = torch.randn(steps, 3, 17, dtype=torch.float64)
    out = {}
    for name, fn in [("reference", count_reference), ("lean", count_lean)]:
        x, th = current.clone().requires_grad_(), threshold.clone().requires_grad_()
        spikes = fn(x, 0.5, th, surrogate, 2.0, False, 0.5 * th)
        (spikes * grad_out).sum().backward()
        out[name] = (spikes, x.grad, th.grad)
    assert torch.equal(out["reference"][0], out["lean"][0])
    for a, b in zip(out["reference"][1:], out["lean"][1:]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert out["lean"][1].abs().sum() > 0 and out["lean"][2].abs().sum() > 0


@pytest.mark.parametrize("beta", [0.6, 1.0])
def test_initial_membrane_lean_equals_reference_with_learned_parameters(beta):
    torch.manual_seed(0)
    current = torch.randn(4, 3, 17, dtype=torch.float64)
    grad_out = torch.randn(4, 3, 17, dtype=torch.float64)
    out = {}
    for name in ("reference", "lean"):
        neuron = LIFNeuron(beta=min(beta, 0.99), threshold=0.7, initial_membrane=0.5, backend=name,
                           learn_threshold="channel", learn_beta="group", channels=17).double()
        x = current.clone().requires_grad_()
        spikes = neuron(x)
        (spikes * grad_out).sum().backward()
        out[name] = (spikes, x.grad, neuron.threshold_param.grad, neuron.beta_param.grad)
    assert torch.equal(out["reference"][0], out["lean"][0])
    for a, b in zip(out["reference"][1:], out["lean"][1:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
