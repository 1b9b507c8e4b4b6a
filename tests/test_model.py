"""The model's spiking claims, checked on what actually runs."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.tracing import trace_ops

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
             max_position_embeddings=64)


def small_model(**overrides) -> BiSpikCLMForCausalLM:
    torch.manual_seed(0)
    return BiSpikCLMForCausalLM(BiSpikCLMConfig(**{**SMALL, **overrides})).eval()


@pytest.mark.parametrize("spiking_head", [False, True])
def test_every_matmul_in_the_blocks_is_fed_by_spikes(spiking_head):
    model = small_model(spiking_head=spiking_head)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad(), trace_ops(model) as trace:
        model(ids, attention_mask=torch.ones(2, 24, dtype=torch.long).index_fill_(1, torch.tensor([0]), 0))
    matmuls = trace.matmuls("model.layers")
    assert len(matmuls) == 2 * 8  # q, k, v, QK^T, PV, out, fc1, fc2 per layer
    for rec in matmuls:
        spike_side = rec.kinds[0]
        assert spike_side in ("binary", "count"), rec
        if rec.module.endswith("self_attn"):  # Q K^T and P V: both operands spikes
            assert rec.kinds[1] == "binary", rec
    counts = [r for r in matmuls if r.kinds[0] == "count"]
    assert {r.module.rsplit(".", 1)[-1] for r in counts} == {"out_proj"}  # O = P V is an integer count
    head = trace.matmuls("lm_head")
    assert head and all(r.kinds[0] == ("binary" if spiking_head else "float") for r in head)


def test_no_softmax_exp_or_division_in_the_blocks_and_multiplications_are_listed():
    model = small_model(residual_scale=0.5)
    with torch.no_grad(), trace_ops(model) as trace:
        model(torch.randint(0, 300, (1, 20)))
    assert trace.forbidden("model.layers") == []
    muls = trace.multiplications("model.layers")
    kinds = {r.kinds for r in muls}
    # neuron leak and reset, attention scale: by a constant; residual weights: a spike selects its weight
    assert kinds <= {("float", "scalar"), ("binary", "scalar"), ("count", "scalar"), ("binary", "float")}, kinds
    residual = [r for r in muls if r.kinds == ("binary", "float")]
    assert len(residual) == 2 * 2 and all(r.module.startswith("model.layers.") for r in residual)
    # outside the blocks: the head's LayerNorm is the one normalization
    assert [r.forbidden for r in trace.forbidden()] == ["normalization"]


@pytest.mark.parametrize("time_steps", [1, 2, 4])
def test_causality_future_tokens_never_change_the_past(time_steps):
    model = small_model(time_steps=time_steps)
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, 32))
    base = model(ids, use_cache=False).logits
    for j in (5, 17, 31):
        changed = ids.clone()
        changed[0, j:] = torch.randint(0, 300, (32 - j,))
        logits = model(changed, use_cache=False).logits
        assert torch.equal(logits[:, :j], base[:, :j])
        assert not torch.equal(logits[:, j:], base[:, j:])


@pytest.mark.parametrize("time_steps", [1, 2, 4])
def test_incremental_decoding_equals_full_forward(time_steps):
    model = small_model(time_steps=time_steps).double()
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (2, 40))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :10], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for i in range(10, 40):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    # float64 so that summation order (different matrix shapes) cannot move a potential across a threshold;
    # a single flipped spike would change the logits far beyond this tolerance
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.bool and layer.keys.shape == (2, time_steps, 4, 40, 16)


def test_batched_generation_with_left_padding_matches_single_sequences():
    model = small_model(pad_token_id=0)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 300, (n,)) for n in (5, 9)]
    singles = [model.generate(p[None], max_new_tokens=8, do_sample=False)[0, len(p):] for p in prompts]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, 9:]
    for i in range(2):
        assert torch.equal(out[i], singles[i])
    torch.manual_seed(4)
    sampled = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
    assert sampled.shape == (2, 17)


def test_gradients_reach_every_parameter():
    model = small_model().train()
    ids = torch.randint(0, 300, (4, 32))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_spikes_are_saved_for_backward_as_bool():
    model = small_model().train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(torch.randint(0, 300, (2, 16)), use_cache=False)
    spike_like = [t for t in saved if t.dtype == torch.bool]
    assert len(spike_like) >= 2 * 8  # the spike input of every product in every block
    # float tensors kept: membrane potentials, weights, and the few float activations outside the blocks
    linear_weights = {p.data_ptr() for p in model.parameters()}
    floats = [t for t in saved if t.dtype.is_floating_point and t.data_ptr() not in linear_weights]
    neurons = len(model.neurons())
    assert len(floats) <= neurons + 8


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model = small_model(time_steps=4, spiking_head=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "bispikclm"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BiSpikCLMForCausalLM)
    ids = torch.randint(0, 300, (2, 20))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("field, value", [("time_steps", 0), ("beta", 1.0), ("beta", 0.0), ("threshold", 0.0),
                                          ("threshold", -1.0), ("num_attention_heads", 5), ("surrogate", "relu")])
def test_invalid_config_names_the_field(field, value):
    name = "hidden_size" if field == "num_attention_heads" else field
    with pytest.raises(ValueError, match=name):
        BiSpikCLMConfig(**{**SMALL, field: value})


def test_input_longer_than_positions_is_a_clear_error():
    model = small_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, 300, (1, 65)))


def test_same_shape_student_from_teacher_configs():
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    for teacher, ffn in [(OPTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=256), 256),
                         (GPT2Config(n_embd=64, n_head=4, n_layer=2), 256),
                         (LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                      intermediate_size=172), 172)]:
        cfg = BiSpikCLMConfig.from_teacher_config(teacher, time_steps=4)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.ffn_dim) == (64, 2, 4, ffn)
        assert cfg.vocab_size == teacher.vocab_size and cfg.time_steps == 4


def _grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_reference_backend_and_gradient_checkpointing_give_the_same_gradients():
    ids = torch.randint(0, 300, (2, 24))
    lean = small_model().double().train()
    reference = small_model(neuron_backend="reference").double().train()
    reference.load_state_dict(lean.state_dict())
    loss_a, grads_a = _grads(lean, ids)
    loss_b, grads_b = _grads(reference, ids)
    lean.activation_checkpointing_enable()
    loss_c, grads_c = _grads(lean, ids)
    assert loss_a == loss_b == loss_c
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads_a[name], grads_c[name], rtol=1e-9, atol=1e-12)
