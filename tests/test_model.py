"""The model's spiking claims, checked on what actually runs."""

import contextlib
import logging
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.configuration import SIGNED_GROUPS
from bispikclm.modeling import CACHE_FIELD
from bispikclm.tracing import trace_ops

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
             max_position_embeddings=64)
# OPT-style blocks, and Llama-style blocks (grouped-query SFSA: 4 query heads share 2 K/V heads; gated SFFN)
# and OPT-style blocks whose neurons learn their thresholds (one per channel) and leaks (one per neuron module)
SHAPES = {"opt": {}, "llama-select": dict(num_key_value_heads=2, ffn_type="gated", ffn_gate="select"),
          "llama-and": dict(num_key_value_heads=2, ffn_type="gated", ffn_gate="and"),
          "opt-learned": dict(learn_threshold="channel", learn_beta="group"),
          # integrate-and-fire neurons whose membrane starts at half the threshold (they round: QCFS), and neurons
          # that integrate a token's T steps before they fire (fire="count"), with learned per-channel thresholds
          "opt-if-half": dict(beta=1.0, initial_membrane=0.5),
          "opt-count": dict(fire="count", initial_membrane=0.5, learn_threshold="channel"),
          # per-channel thresholds and initial membranes (the buffers calibration sets), set at random here
          "opt-calibrated": dict(fire="count", beta=1.0, initial_membrane=0.5, per_channel_neurons=True,
                                 relative_surrogate=True),
          # the same with signed neuron pairs at the block inputs and the branch outputs ([S⁺, S⁻], 2T + 1 levels)
          "opt-signed": dict(fire="count", beta=1.0, initial_membrane=0.5, per_channel_neurons=True,
                             relative_surrogate=True, neuron_overrides={
                                 group: {"signed": True} for group in ("block_in", "attn_out", "ffn_in", "ffn_out")}),
          # every group that can be signed, Q, K and V included (ternary Q·Kᵀ and P·V), with GQA and a gated SFFN
          "llama-signed-qkv": dict(num_key_value_heads=2, ffn_type="gated", ffn_gate="select", fire="count", beta=1.0,
                                   initial_membrane=0.5, per_channel_neurons=True, relative_surrogate=True,
                                   neuron_overrides={group: {"signed": True} for group in SIGNED_GROUPS})}


def small_model(shape: str = "opt", **overrides) -> BiSpikCLMForCausalLM:
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig(**{**SMALL, **SHAPES[shape], **overrides})).eval()
    with torch.no_grad():
        for neuron in model.neurons().values():
            if neuron.per_channel and neuron.channel_threshold.dim():
                neuron.channel_threshold.uniform_(0.6, 1.4)
                neuron.channel_initial.copy_(neuron.channel_threshold * torch.rand_like(neuron.channel_threshold))
                if neuron.signed:
                    neuron.channel_initial_negative.copy_(
                        neuron.channel_threshold * torch.rand_like(neuron.channel_threshold))
    return model


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spiking_head", [False, True])
def test_every_matmul_in_the_blocks_is_fed_by_spikes(shape, spiking_head):
    model = small_model(shape, spiking_head=spiking_head)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad(), trace_ops(model) as trace:
        model(ids, attention_mask=torch.ones(2, 24, dtype=torch.long).index_fill_(1, torch.tensor([0]), 0))
    matmuls = trace.matmuls("model.layers")
    # q, k, v, QK^T, PV, out + fc1, fc2 (OPT) or gate, up, down (gated) per layer
    assert len(matmuls) == 2 * (8 if shape.startswith("opt") else 9)
    qkv = shape == "llama-signed-qkv"
    for rec in matmuls:
        spike_side = rec.kinds[0]
        assert spike_side in ("binary", "count", "signed"), rec
        if rec.module.endswith("self_attn"):  # Q K^T and P V: both operands spikes (ternary S⁺ - S⁻ when signed)
            assert rec.kinds in ((("signed", "signed"), ("binary", "signed")) if qkv else
                                 (("binary", "binary"),)), rec
    counts = [r for r in matmuls if r.module.endswith("out_proj") or r.kinds[0] == "count"]
    assert {r.module.rsplit(".", 1)[-1] for r in counts} == {"out_proj"}  # O = P V is an integer count
    assert {r.kinds[0] for r in counts} == {"signed" if qkv else "count"}  # of either sign with signed V
    head = trace.matmuls("lm_head")
    assert head and all(r.kinds[0] == ("binary" if spiking_head else "float") for r in head)


@pytest.mark.parametrize("shape", SHAPES)
def test_no_softmax_exp_or_division_in_the_blocks_and_multiplications_are_listed(shape):
    model = small_model(shape, residual_scale=0.5)
    with torch.no_grad(), trace_ops(model) as trace:
        model(torch.randint(0, 300, (1, 20)))
    assert trace.forbidden("model.layers") == []
    muls = trace.multiplications("model.layers")
    kinds = {r.kinds for r in muls}
    # neuron leak and reset, attention scale: by a constant; residual weights: a spike selects its weight;
    # gated SFFN: a gate spike selects the up current ("select") or ANDs with the up spike ("and")
    allowed = {("float", "scalar"), ("binary", "scalar"), ("count", "scalar"), ("binary", "float")}
    if shape == "opt-learned":   # learned leak (0-d) times the membrane; learned threshold per channel times spikes
        allowed |= {("scalar", kind) for kind in ("float", "binary", "count")} | {(k, "binary") for k in
                                                                                  ("float", "binary")}
    if shape in ("opt-count", "opt-calibrated", "opt-signed", "llama-signed-qkv"):
        allowed |= {("scalar", "scalar")}    # the firing levels (t + 1) * threshold: constants of the neuron
    if shape == "llama-signed-qkv":          # the attention scale times ternary scores
        allowed |= {("signed", "scalar")}
    assert kinds <= allowed | ({("binary", "binary")} if shape == "llama-and" else set()), kinds
    selects = [r for r in muls if r.kinds == ("binary", "float")]
    assert all(r.module.startswith("model.layers.") for r in selects)
    assert len(selects) == 2 * (3 if SHAPES[shape].get("ffn_gate") == "select" else 2)  # 2 residual weights (+ gate)
    assert all(not (r.kinds[0] == "float" and r.kinds[1] == "float") for r in muls)
    if shape == "llama-and":
        assert len([r for r in muls if r.kinds == ("binary", "binary")]) == 2
    # outside the blocks: the head's LayerNorm is the one normalization
    assert [r.forbidden for r in trace.forbidden()] == ["normalization"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("time_steps", [1, 2, 4])
def test_causality_future_tokens_never_change_the_past(shape, time_steps):
    model = small_model(shape, time_steps=time_steps)
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (1, 32))
    base = model(ids, use_cache=False).logits
    for j in (5, 17, 31):
        changed = ids.clone()
        changed[0, j:] = torch.randint(0, 300, (32 - j,))
        logits = model(changed, use_cache=False).logits
        assert torch.equal(logits[:, :j], base[:, :j])
        assert not torch.equal(logits[:, j:], base[:, j:])


@contextlib.contextmanager
def cache_name_warnings():
    """The messages transformers logs or warns inside the block that name the K/V cache's deprecated names
    (``past_key_values``, ``cache_params``). Its once-only warnings are reset first, so that a warning an
    earlier test triggered cannot hide one here."""
    messages, records = [], []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger, verbosity = logging.getLogger("transformers"), hf_logging.get_verbosity()
    logging.Logger.warning_once.cache_clear()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    messages += [m for m in records + [str(w.message) for w in caught]
                 if "past_key_values" in m or "cache_params" in m]


@pytest.mark.parametrize("shape", ["opt", "llama-select"])
def test_generate_and_incremental_decoding_use_the_current_cache_name(shape):
    """Neither ``generate`` nor incremental decoding through the cache (nor a forward pass without it, as in
    training) makes transformers warn about deprecated cache names; cached steps equal the full pass and
    ``generate`` continues as greedy decoding over full passes does."""
    model = small_model(shape, time_steps=2).double()
    torch.manual_seed(3)
    ids = torch.randint(0, 300, (2, 24))
    with cache_name_warnings() as messages:
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :8], use_cache=True)
        steps, cache = [out.logits], getattr(out, CACHE_FIELD)
        for i in range(8, 24):
            out = model(ids[:, i:i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = getattr(out, CACHE_FIELD)
        generated = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert messages == []
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    assert cache.get_seq_length() == 24
    greedy = ids[:1, :8]
    for _ in range(6):
        greedy = torch.cat([greedy, model(greedy, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, greedy)


@pytest.mark.skipif(CACHE_FIELD != "cache", reason="transformers before 5.24 knows only past_key_values")
def test_old_cache_name_still_works_and_is_what_transformers_warns_about():
    """A caller that passes and reads ``past_key_values`` gets the same logits as with ``cache``; reading the
    old name is what transformers warns about (so the capture above sees such a warning when there is one)."""
    model = small_model("opt").double()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    first = model(ids[:, :6], use_cache=True)
    with cache_name_warnings() as messages:
        old = first.past_key_values
    assert messages and "deprecated" in messages[0]
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, 6:], cache=old, past_key_values=old)
    stepped = model(ids[:, 6:], past_key_values=old, use_cache=True).logits
    torch.testing.assert_close(stepped, model(ids, use_cache=False).logits[:, 6:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("time_steps", [1, 2, 4])
def test_incremental_decoding_equals_full_forward(shape, time_steps):
    model = small_model(shape, time_steps=time_steps).double()
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
    kv_heads = 4 if shape.startswith("opt") else 2                 # the cache holds only the key/value heads
    width = 32 if shape == "llama-signed-qkv" else 16              # a signed pair's S⁺ and S⁻ per head
    assert layer.keys.dtype == torch.bool and layer.keys.shape == (2, time_steps, kv_heads, 40, width)
    assert layer.values.dtype == torch.bool and layer.values.shape == (2, time_steps, kv_heads, 40, width)


@pytest.mark.parametrize("shape", ["opt", "llama-select"])
def test_batched_generation_with_left_padding_matches_single_sequences(shape):
    model = small_model(shape, pad_token_id=0)
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


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_reach_every_parameter(shape):
    model = small_model(shape).train()
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


@pytest.mark.parametrize("shape", SHAPES)
def test_save_load_round_trip_through_auto_classes(tmp_path, shape):
    model = small_model(shape, time_steps=4, spiking_head=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "bispikclm"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BiSpikCLMForCausalLM)
    ids = torch.randint(0, 300, (2, 20))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("field, value", [("time_steps", 0), ("beta", 1.5), ("beta", 0.0), ("initial_membrane", -0.1), ("fire", "burst"), ("threshold", 0.0),
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
        assert cfg.ffn_type == ("gated" if isinstance(teacher, LlamaConfig) else "mlp")


def test_llama_teacher_gives_grouped_query_gated_student_with_its_own_position_table():
    from transformers import LlamaConfig

    teacher = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                          tie_word_embeddings=True)
    cfg = BiSpikCLMConfig.from_teacher_config(teacher)
    assert (cfg.num_attention_heads, cfg.key_value_heads, cfg.attention_head_dim) == (9, 3, 64)
    assert cfg.ffn_type == "gated" and cfg.ffn_dim == 1536 and cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == 2048                      # rotary teacher: no table to copy
    assert BiSpikCLMConfig.from_teacher_config(teacher, max_position_embeddings=256).max_position_embeddings == 256
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(
        teacher, vocab_size=300, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, ffn_dim=64,
        num_hidden_layers=1, max_position_embeddings=32))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 48 and attn.k_proj.out_features == attn.v_proj.out_features == 16


def test_position_table_grows_by_repeating_trained_rows():
    model = small_model()
    ids = torch.randint(0, 300, (1, 64))
    before = model(ids).logits
    table = model.model.embed_positions.weight.detach().clone()
    model.resize_position_embeddings(150)
    assert model.config.max_position_embeddings == 150 and model.model.embed_positions.weight.shape == (150, 64)
    assert torch.equal(model.model.embed_positions.weight[64:128], table)
    assert torch.equal(model(ids).logits, before)                   # the trained positions are untouched
    assert model(torch.randint(0, 300, (1, 150))).logits.shape == (1, 150, 300)


def test_attention_counts_stay_exact_under_bf16_autocast():
    """P·V sums up to one spike per key: beyond 256 keys bfloat16 cannot hold them exactly, float32 can."""
    dense = {group: {"threshold": 0.05} for group in ("block_in", "q", "k", "v")}   # most neurons fire
    model = small_model("llama-select", max_position_embeddings=320, attn_threshold=0.01, neuron_overrides=dense)
    attn = model.model.layers[0].self_attn
    seen = {}
    hooks = [attn.attn_neuron.register_forward_hook(lambda m, a, out: seen.__setitem__("p", out)),
             attn.v_neuron.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out)),
             attn.out_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 300, (1, 300)), use_cache=False)
    for hook in hooks:
        hook.remove()
    t = model.config.time_steps
    v = attn._repeat_kv(attn._heads(seen["v"].double(), attn.num_kv_heads))
    o = (seen["p"].double() @ v).transpose(2, 3).reshape(t, 1, 300, 64)
    assert o.max() > 256                                            # counts bfloat16 would round
    assert seen["o"].dtype == torch.float32 and torch.equal(seen["o"].double(), o)

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
    saved = []
    hooks = (lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        lean(ids, labels=ids, use_cache=False)
    without = sum(saved)
    lean.activation_checkpointing_enable()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        lean(ids, labels=ids, use_cache=False)
    assert sum(saved) < 0.5 * without                   # blocks keep only their inputs; the rest is recomputed
    loss_c, grads_c = _grads(lean, ids)
    assert loss_a == loss_b == loss_c
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads_a[name], grads_c[name], rtol=1e-9, atol=1e-12)
