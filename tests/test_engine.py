"""The packed engine reproduces the PyTorch model spike for spike on WikiText-2 text, at OPT shape and at Llama
shape (grouped-query attention, gated SFFN, learned thresholds and leaks, a rotary teacher's student), and its
fast path (Numba) gives the same bits as its plain reference (NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, PreTrainedTokenizerFast

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.cli import main
from bispikclm.configuration import SIGNED_GROUPS
from bispikclm.engine import PackedEngine, dense, kernels, model_spikes, pack, quantize_, reference, spike_agreement
from bispikclm.engine.packing import pack_nibbles, unpack_nibbles
from bispikclm.errors import UserError
from helpers import engine_and_model, make_tokenizer

SMALL = dict(vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512,
             max_position_embeddings=512)


@pytest.fixture(scope="session")
def tokenizer(data_dir, tmp_path_factory) -> PreTrainedTokenizerFast:
    """A 2,048-token byte-level BPE trained on the first 20,000 lines of WikiText-2 train."""
    return make_tokenizer(data_dir, tmp_path_factory.mktemp("tokenizer"), SMALL["vocab_size"], lines=20000)


@pytest.fixture(scope="session")
def test_text(data_dir) -> list[str]:
    """Non-empty, non-heading paragraphs of WikiText-2 test."""
    lines = (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if len(line.split()) > 40 and not line.strip().startswith("=")]


# Llama shape: 3 query heads per K/V head, heads of 48 that straddle 64-bit words, gated SFFN
LLAMA = dict(num_attention_heads=6, num_key_value_heads=2, head_dim=48, ffn_type="gated", ffn_dim=384)
LEARNED = dict(learn_threshold="channel", learn_beta="group")
CALIBRATED = dict(fire="count", beta=1.0, initial_membrane=0.5, per_channel_neurons=True, relative_surrogate=True)
# signed neuron pairs: the quickstart's four groups, and every group that can be one (ternary Q·Kᵀ and P·V)
SIGNED = dict(CALIBRATED, neuron_overrides={g: {"signed": True} for g in ("block_in", "attn_out", "ffn_in", "ffn_out")})
SIGNED_QKV = dict(CALIBRATED, neuron_overrides={g: {"signed": True} for g in SIGNED_GROUPS})


def make_model(**overrides) -> BiSpikCLMForCausalLM:
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():       # learned thresholds and leaks away from their initial values, different per channel
        for neuron in model.neurons().values():
            if neuron.threshold_param is not None:
                neuron.threshold_param.mul_(torch.empty_like(neuron.threshold_param).uniform_(0.8, 1.2))
            if neuron.beta_param is not None:
                neuron.beta_param.fill_(0.6)
            if neuron.per_channel and neuron.channel_threshold.dim():     # calibrated-style per-channel buffers
                neuron.channel_threshold.uniform_(0.6, 1.4)
                neuron.channel_initial.copy_(neuron.channel_threshold * torch.rand_like(neuron.channel_threshold))
    return model


def rotary_teacher_student(**overrides) -> BiSpikCLMForCausalLM:
    """A student of a (tiny) Llama teacher with rotary positions: Llama shape and a learned position table."""
    teacher = LlamaConfig(vocab_size=SMALL["vocab_size"], hidden_size=128, intermediate_size=384,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    config = BiSpikCLMConfig.from_teacher_config(teacher, max_position_embeddings=320, **overrides)
    assert config.ffn_type == "gated" and config.key_value_heads == 2
    return BiSpikCLMForCausalLM(config).eval()


@pytest.mark.parametrize("time_steps, overrides", [
    (2, {}), (4, {}), (2, dict(hidden_size=96, num_attention_heads=2)), (2, dict(spiking_head=True)),
    (2, LLAMA), (4, dict(LLAMA, ffn_gate="and")), (2, dict(LLAMA, spiking_head=True, **LEARNED)),
    (2, "rotary teacher"), (2, dict(beta=1.0, initial_membrane=0.5)),
    (4, dict(LLAMA, fire="count", initial_membrane=0.5, **LEARNED)),
    (2, dict(fire="count", beta=1.0, initial_membrane=0.5, per_channel_neurons=True, relative_surrogate=True)),
    (2, SIGNED), (2, dict(LLAMA, **SIGNED_QKV))])
@pytest.mark.parametrize("int8", [False, True])
def test_spikes_agree_with_the_model_on_wikitext(tokenizer, test_text, time_steps, overrides, int8):
    if overrides == "rotary teacher":
        model = rotary_teacher_student(time_steps=time_steps)
    else:
        model = make_model(time_steps=time_steps, **overrides)
    if int8:
        quantize_(model, head=True)
    ids = torch.tensor(tokenizer(" ".join(test_text[:4]))["input_ids"][:256])
    ours, theirs, steps, logits = engine_and_model(model, ids, prefill=200, int8=int8)
    rate = np.mean([v.mean() for k, v in ours.items() if not k.endswith("out_proj")])
    assert 0.05 < rate < 0.5, rate
    match = spike_agreement(ours, theirs)
    if int8:
        assert match == 1.0
    else:
        assert match >= 0.9999, match
    if match < 1.0:     # float32 sums in another order put a membrane on the other side of its threshold
        assert (steps.argmax(-1) == logits.argmax(-1)).float().mean() >= 0.99
        return
    torch.testing.assert_close(steps, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(steps.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("time_steps, overrides", [
    (2, {}), (2, dict(LLAMA, spiking_head=True, **LEARNED)), (4, dict(LLAMA, ffn_gate="and", **LEARNED)),
    (2, dict(fire="count", beta=1.0, initial_membrane=0.5, per_channel_neurons=True)), (2, dict(LLAMA, **SIGNED_QKV))])
def test_4bit_spikes_agree_with_the_model_on_wikitext(tokenizer, test_text, time_steps, overrides):
    """4-bit rows and a 4-bit head: the engine and the PyTorch model quantized alike, spike for spike."""
    model = quantize_(make_model(time_steps=time_steps, **overrides), head=True, bits=4)
    ids = torch.tensor(tokenizer(" ".join(test_text[:4]))["input_ids"][:160])
    theirs, logits = model_spikes(model, ids)
    engine = PackedEngine.from_model(model, int8=True, bits=4)
    assert engine.blocks[0].qkv.weight.dtype == np.uint8                 # two values per byte
    assert (engine.head_nibbles is not None) == (not model.config.spiking_head)
    cache, records, steps = engine.new_cache(), [], []
    for chunk in [ids[:120]] + [ids[i:i + 1] for i in range(120, len(ids))]:
        records.append({})
        steps.append(engine.forward(chunk, cache, all_logits=True, record=records[-1]))
    ours = {k: np.concatenate([r[k] for r in records]) for k in records[0]}
    assert spike_agreement(ours, theirs) == 1.0
    torch.testing.assert_close(torch.cat(steps), logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.cat(steps).argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("time_steps, overrides", [
    (2, dict(fire="count", beta=1.0, initial_membrane=0.5, per_channel_neurons=True, relative_surrogate=True)),
    (2, dict(hidden_size=96, num_attention_heads=2, spiking_head=True)),
    (2, dict(LLAMA, **LEARNED)), (4, dict(LLAMA, ffn_gate="and", fire="count", initial_membrane=0.5, **LEARNED))])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_one_call_path_gives_the_per_kernel_bits(tokenizer, test_text, time_steps, overrides, bits):
    """Every block in one compiled call against the same kernels called one at a time (Numba and NumPy): the same
    spikes, attention counts and logits, bit for bit, through a prefill and decode steps."""
    model = make_model(time_steps=time_steps, **overrides)
    if bits:
        quantize_(model, head=True, bits=bits)
    ids = torch.tensor(tokenizer(" ".join(test_text[5:8]))["input_ids"][:48])
    results = []
    for backend, fused in [("numba", True), ("numba", False), ("reference", False)]:
        engine = PackedEngine.from_model(model, int8=bits is not None, bits=bits or 8, backend=backend, fused=fused,
                                         prefill="events")
        assert (engine.fused is not None) == fused
        cache, records, logits = engine.new_cache(), [], []
        for chunk in [ids[:40]] + [ids[i:i + 1] for i in range(40, len(ids))]:
            records.append({})
            logits.append(engine.forward(chunk, cache, all_logits=True, record=records[-1]))
        results.append(({k: np.concatenate([r[k] for r in records]) for k in records[0]}, torch.cat(logits),
                         cache.keys[:, :, :len(ids)].copy()))
    (fused, logits, keys), others = results[0], results[1:]
    assert 0.05 < np.mean([v.mean() for k, v in fused.items() if not k.endswith("out_proj")]) < 0.5
    for record, other_logits, other_keys in others:
        assert record.keys() == fused.keys() and all(np.array_equal(record[k], fused[k]) for k in fused)
        assert torch.equal(other_logits, logits) and np.array_equal(other_keys, keys)


@pytest.mark.parametrize("overrides", [dict(per_channel_neurons=True, fire="count", beta=1.0, initial_membrane=0.5),
                                       dict(LLAMA, **LEARNED), dict(LLAMA, ffn_gate="and"), dict(LLAMA, **SIGNED_QKV)])
@pytest.mark.parametrize("bits", [8, 4])
def test_dense_prefill_gives_the_event_driven_bits(tokenizer, test_text, overrides, bits):
    """The batched prefill (dense integer products of the spikes and the weights) against the event-driven one:
    the same spikes, counts and logits, and the same cache for the decode steps after it."""
    model = quantize_(make_model(time_steps=2, **overrides), head=True, bits=bits)
    ids = torch.tensor(tokenizer(" ".join(test_text[:4]))["input_ids"][:130])
    results = []
    for prefill in ("dense", "events"):
        engine = PackedEngine.from_model(model, int8=True, bits=bits, prefill=prefill)
        cache, record = engine.new_cache(), {}
        logits = [engine.forward(ids[:128], cache, all_logits=True, record=record)]
        logits += [engine.forward(ids[i:i + 1], cache, all_logits=True) for i in (128, 129)]
        results.append((record, torch.cat(logits), cache.keys[:, :, :130].copy()))
    (ours, logits, keys), (theirs, their_logits, their_keys) = results
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(logits, their_logits) and np.array_equal(keys, their_keys)
    assert max(v.max() for k, v in ours.items() if k.endswith("out_proj")) > 1      # counts, not only spikes
    if model.config.signed("v"):                      # O = P (V⁺ - V⁻): negative counts take negative digits
        assert min(v.min() for k, v in ours.items() if k.endswith("out_proj")) < -1


@pytest.mark.parametrize("overrides", [{}, dict(per_channel_neurons=True, fire="count", beta=1.0,
                                                initial_membrane=0.5)])
def test_one_call_path_reads_thresholds_set_on_the_engine(tokenizer, test_text, overrides):
    """Thresholds assigned to an engine's neurons (as a firing-rate sweep does) reach the one-call path, for one
    threshold per module and one per channel (a calibrated student's)."""
    model = quantize_(make_model(time_steps=2, **overrides), head=True)
    ids = torch.tensor(tokenizer(" ".join(test_text[:2]))["input_ids"][:32])
    engines = [PackedEngine.from_model(model, int8=True, fused=fused) for fused in (True, False)]
    rates = []
    for engine in engines:
        for block in engine.blocks:
            for name, neuron in block.neurons.items():
                if name != "self_attn.attn_neuron":
                    neuron.threshold = neuron.threshold * 2
        record = {}
        engine.forward(ids, engine.new_cache(), record=record)
        rates.append(record)
    assert all(np.array_equal(rates[0][k], rates[1][k]) for k in rates[0])
    default = {}
    fresh = PackedEngine.from_model(model, int8=True)
    fresh.forward(ids, fresh.new_cache(), record=default)
    assert rates[0]["model.layers.0.ffn.hidden_neuron"].mean() < default["model.layers.0.ffn.hidden_neuron"].mean()


@pytest.mark.parametrize("overrides", [{}, dict(LLAMA, **LEARNED)])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_greedy_generations_are_identical(tokenizer, test_text, bits, overrides):
    model = make_model(time_steps=2, **overrides)
    if bits:
        quantize_(model, head=bits == 4, bits=bits)
    engine = PackedEngine.from_model(model, int8=bits is not None, bits=bits or 8)
    for text in test_text[10:15]:
        prompt = torch.tensor(tokenizer(" ".join(text.split()[:12]))["input_ids"])
        expected = model.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert list(engine.generate(prompt, max_new_tokens=20)) == expected


def random_linear(rng, n_in, n_out, int8):
    if int8 == 4:                 # 4-bit rows, two values per byte
        return (pack_nibbles(rng.integers(-7, 8, (n_in, n_out))), rng.integers(-99, 99, n_out).astype(np.int32),
                np.exp2(rng.integers(-9, -5, n_out)).astype(np.float32))
    if int8:
        return (rng.integers(-127, 128, (n_in, n_out)).astype(np.int8), rng.integers(-999, 999, n_out).astype(np.int32),
                np.exp2(rng.integers(-9, -5, n_out)).astype(np.float32))
    return rng.standard_normal((n_in, n_out)).astype(np.float32), rng.standard_normal(n_out).astype(np.float32), \
        np.ones(n_out, np.float32)


@pytest.mark.parametrize("int8", [False, True, 4])
@pytest.mark.parametrize("time_steps", [1, 2, 4])
def test_fast_path_gives_the_reference_bits(int8, time_steps):
    rng = np.random.default_rng(time_steps)
    n, d, heads, past = 7, 160, 5, 9                   # head_dim 32: heads straddle 64-bit words
    for n_in, n_out in [(160, 600), (600, 160), (160, 75)]:
        weight, bias, scale = random_linear(rng, n_in, n_out, int8)
        spikes = pack(rng.random((n, time_steps, n_in)) < 0.3)
        counts = rng.integers(0, 4, (n, time_steps, n_in)).astype(np.int32) * (rng.random((n, time_steps, n_in)) < 0.5)
        large = counts * rng.integers(1, 40000, counts.shape).astype(np.int32)   # several base-128 digits
        for name, inputs in [("linear_spikes", spikes), ("linear_counts", counts), ("linear_counts", large)]:
            fast, ref = (np.empty((n, time_steps, n_out), np.float32) for _ in range(2))
            getattr(kernels, name)(inputs, weight, bias, scale, fast)
            getattr(reference, name)(inputs, weight, bias, scale, ref)
            assert np.array_equal(fast, ref), name
            if int8:                  # the batched prefill: a dense integer product, the same sums
                batched = np.empty_like(ref)
                getattr(dense, name)(inputs, weight, bias, scale, batched)
                assert np.array_equal(batched, ref), name
    current = rng.standard_normal((n, time_steps, d)).astype(np.float32) * 2
    gain = rng.standard_normal(d).astype(np.float32)
    thresholds = (0.9, rng.uniform(0.5, 1.5, d).astype(np.float32))       # one, or one per channel
    # neuron options: (beta, initial membrane as a fraction of the threshold, count firing)
    options = ((0.7, 0.0, False), (1.0, 0.5, False), (0.7, 0.5, True))
    outs = []
    for ops in (kernels, reference):
        for threshold in thresholds:
            for beta, initial, count in options:
                membrane, spikes = current.copy(), np.empty((n, time_steps, 3), np.uint64)
                ops.lif(membrane, beta, threshold, np.float32(initial) * threshold, count, spikes)
                x, gated = current.copy(), current.copy()
                ops.residual_add(x, spikes, gain)
                ops.gate_current(gated, spikes)
                outs.append((membrane, spikes, x, gated))
    half = len(outs) // 2
    for a, b in zip(outs[:half], outs[half:]):
        for u, v in zip(a, b):
            assert np.array_equal(u, v)
    assert not np.array_equal(outs[0][1], outs[len(options)][1])            # per-channel thresholds matter
    assert all(not np.array_equal(outs[0][1], outs[i][1]) for i in range(1, len(options)))   # so do the options
    # attention: one K/V head per query head, and grouped-query heads (3 per K/V head), heads off word boundaries
    for heads, kv_heads, head_dim in [(5, 5, 32), (6, 2, 48), (3, 1, 80)]:
        q = pack(rng.random((n, time_steps, heads * head_dim)) < 0.4)
        k_cache, v_cache = (pack(rng.random((time_steps, 32, kv_heads * head_dim)) < 0.4) for _ in range(2))
        for beta, initial, count in options:
            fast, ref = (np.empty((n, time_steps, heads * head_dim), np.int32) for _ in range(2))
            args = (q, k_cache, v_cache, past, heads, kv_heads, head_dim, 1 / head_dim, beta, 0.05, initial * 0.05, count)
            kernels.sfsa(*args, fast)
            reference.sfsa(*args, ref)
            assert np.array_equal(fast, ref) and fast.any()
    # signed pairs of Q, K or V: rows twice as wide (S⁺, then S⁻), ternary scores, counts of either sign
    for signed in [(True, False, False), (False, True, True), (True, True, True)]:
        heads, kv_heads, head_dim = 6, 2, 48
        q = pack(rng.random((n, time_steps, heads * head_dim * (1 + signed[0]))) < 0.3)
        k_cache, v_cache = (pack(rng.random((time_steps, 32, kv_heads * head_dim * (1 + on))) < 0.3)
                            for on in signed[1:])
        fast, ref = (np.empty((n, time_steps, heads * head_dim), np.int32) for _ in range(2))
        args = (q, k_cache, v_cache, past, heads, kv_heads, head_dim, 1 / head_dim, 1.0, 0.05, 0.025, True)
        kernels.sfsa(*args, fast, signed)
        reference.sfsa(*args, ref, signed)
        assert np.array_equal(fast, ref) and fast.any()
        assert (fast.min() < 0) == signed[2]
    h = rng.standard_normal((2, d)).astype(np.float32)
    weight, _, scale = random_linear(rng, d, 3000, True)
    fast, ref = (np.empty((2, 3000), np.float32) for _ in range(2))
    kernels.head_int8(h, weight, scale, fast)
    reference.head_int8(h, weight, scale, ref)
    assert np.array_equal(fast, ref)
    values = rng.integers(-7, 8, (d, 3001))
    scale = rng.uniform(0.5, 2, (d // 32, 3001)).astype(np.float32)
    fast, ref = (np.empty((2, 3001), np.float32) for _ in range(2))
    kernels.head_nibbles(h, pack_nibbles(values), scale, fast)
    reference.head_nibbles(h, pack_nibbles(values), scale, ref)
    assert np.array_equal(fast, ref)
    direct = (h[:, :, None] * values[None] * np.repeat(scale, 32, axis=0)[None]).sum(1)
    np.testing.assert_allclose(fast, direct, rtol=1e-4, atol=1e-3)
    assert np.array_equal(unpack_nibbles(pack_nibbles(values), 3001), values)


def test_int8_engine_needs_a_quantized_model_and_quantizing_is_idempotent():
    model = make_model()
    with pytest.raises(UserError, match="quantize_"):
        PackedEngine.from_model(model, int8=True)
    quantize_(model, head=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, head=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    weight = model.model.layers[0].ffn.fc1.weight.detach()
    step = torch.exp2(torch.ceil(torch.log2(weight.abs().amax(1, keepdim=True) / 127)))   # a power of two per row
    levels = weight / step
    assert torch.equal(levels, levels.round()) and levels.abs().max() == 127
    with pytest.raises(UserError, match="bits=4"):        # int8 rows are not 4-bit rows
        PackedEngine.from_model(model, int8=True, bits=4)
    model = quantize_(make_model(), head=True, bits=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, head=True, bits=4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    weight = model.model.layers[0].ffn.fc1.weight.detach()
    levels = weight / torch.exp2(torch.ceil(torch.log2(weight.abs().amax(1, keepdim=True) / 7)))
    assert torch.equal(levels, levels.round()) and levels.abs().max() == 7 and len(levels.unique()) == 15
    head = model.lm_head.weight.detach().reshape(-1, 32)         # groups of 32 inputs, 15 levels each
    steps = head.abs().amax(1, keepdim=True) / 7
    assert torch.equal(head / steps, (head / steps).round()) and torch.equal(steps.bfloat16().float(), steps)
    with pytest.raises(UserError, match="8 or 4"):
        PackedEngine.from_model(model, int8=True, bits=2)
    with pytest.raises(UserError, match="bits"):
        quantize_(model, bits=3)


def test_generate_command_streams_the_same_text_from_both_engines(tokenizer, test_text, tmp_path, capsys):
    make_model(time_steps=2).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompt = " ".join(test_text[3].split()[:10])
    texts = {}
    for engine in ("torch", "packed"):
        for bits in ("8", "4"):
            assert main(["generate", str(tmp_path), "--prompt", prompt, "--engine", engine, "--max-new-tokens", "12",
                         "--int8", "--bits", bits]) == 0
            texts[engine, bits] = capsys.readouterr().out
    assert texts["torch", "8"] == texts["packed", "8"] and len(texts["packed", "8"].strip()) > 0
    assert texts["torch", "4"] == texts["packed", "4"] and len(texts["packed", "4"].strip()) > 0
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--bits", "4"]) == 2
    assert "--bits needs --int8" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err


def test_generate_compare_prints_student_and_teacher_side_by_side(tokenizer, test_text, tmp_path, capsys,
                                                                   monkeypatch):
    from argparse import Namespace

    from transformers import AutoModelForCausalLM

    from bispikclm.commands.generate import continuations
    from helpers import make_teacher

    monkeypatch.setenv("COLUMNS", "400")     # one line per cell, so the printed text can be matched
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    make_model(time_steps=2).save_pretrained(student)
    tokenizer.save_pretrained(student)
    make_teacher("llama-gqa", teacher, tokenizer, positions=128)
    prompt = " ".join(test_text[3].split()[:10])
    assert main(["generate", str(student), "--compare", str(teacher), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    args = Namespace(engine=None, int8=False, int8_head=False, bits=8, temperature=0.0, top_k=None, seed=0,
                     tokenizer=None, max_new_tokens=8)
    rows = continuations([str(student), str(teacher)], prompt, args)
    assert [row["engine"] for row in rows] == ["packed", "torch"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for row, folder in zip(rows, (student, teacher)):      # each column is that model's own greedy continuation
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert row["text"] == tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
        assert row["text"].strip() and row["text"].strip() in printed and str(folder) in printed
    assert main(["generate", str(student), "--compare", str(teacher), "--prompt", "x", "--temperature", "1"]) == 2
    assert main(["generate", str(teacher), "--prompt", "x", "--engine", "packed"]) == 2
    assert "packed engine runs BiSpikCLM students" in capsys.readouterr().err
