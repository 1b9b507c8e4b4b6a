"""Operation counter and energy model, checked against PyTorch's FlopCounterMode and against spike counts
taken independently with forward hooks, on real models and WikiText-2 test text."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import cost_models
from bispikclm.cli import main
from bispikclm.checkpoints import load_pretrained
from bispikclm.data import text_token_ids
from bispikclm.energy import (BLOCK_PARTS, KIND_COST, EnergyTable, MemoryTable, bytes_read, cost_table,
                              count_operations, energy_per_token, energy_report, format_cost_table,
                              load_energy_table)
from bispikclm.distill.losses import SpikeCostLoss
from bispikclm.errors import UserError
from bispikclm.neurons import LIFNeuron


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory):
    return cost_models(data_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def input_ids(folders, data_dir):
    tokenizer = load_pretrained(folders["student"])[1]
    return text_token_ids(tokenizer, data_dir / "wikitext-2" / "test.txt", seq_len=48, num_sequences=2)


def hooked_spike_counts(model, input_ids):
    """Σ spikes x fan-out per product, and neuron updates/spikes, from forward hooks on the modules' real inputs
    and outputs: ``{(layer or None, name): (AC, MAC-equivalent)}``, ``{path: (updates, spikes)}``."""
    products, neurons, handles = defaultdict(lambda: [0.0, 0.0]), {}, []
    n = input_ids.shape[1]
    head_dim = model.config.hidden_size // model.config.num_attention_heads

    def add(key, spikes: torch.Tensor, fan_out: int):
        products[key][0] += float(spikes.sum()) * fan_out
        products[key][1] += spikes.numel() * fan_out

    for path, module in model.named_modules():
        parts = path.split(".")
        layer = int(parts[2]) if path.startswith("model.layers.") else None
        name = ".".join(parts[3:]) if layer is not None else path
        if isinstance(module, nn.Linear):
            hook = lambda m, args, out, key=(layer, name): add(key, args[0], m.out_features)  # noqa: E731
            handles.append(module.register_forward_hook(hook))
        elif name == "self_attn.q_neuron":   # each query spike meets every key: fan-out N
            hook = lambda m, args, q, key=(layer, "self_attn Q·Kᵀ"): add(key, q, n)  # noqa: E731
            handles.append(module.register_forward_hook(hook))
        elif name == "self_attn.attn_neuron":  # each attention spike adds one binary V row: fan-out d_head
            hook = lambda m, args, p, key=(layer, "self_attn P·V"): add(key, p, head_dim)  # noqa: E731
            handles.append(module.register_forward_hook(hook))
        if isinstance(module, LIFNeuron):
            def hook(m, args, s, path=path):
                neurons[path] = (args[0].numel(), float(s.sum()))
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return dict(products), neurons


def test_ann_count_matches_flop_counter(folders, input_ids):
    teacher = load_pretrained(folders["teacher"])[0]
    implementation = teacher.config._attn_implementation
    count = count_operations(teacher, input_ids)
    assert teacher.config._attn_implementation == implementation   # restored after counting
    teacher.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        teacher(input_ids=input_ids, use_cache=False)
    assert count.total("mac") == pytest.approx(flops.get_total_flops() / 2, rel=0.01)
    assert count.total("ac") == 0 and count.time_steps is None
    cfg = teacher.config
    d, n = cfg.hidden_size, input_ids.shape[1]
    per_token_layer = 4 * d * d + 2 * d * cfg.ffn_dim + 2 * n * d       # projections, FFN, Q·Kᵀ and P·V
    expected = input_ids.numel() * (cfg.num_hidden_layers * per_token_layer + cfg.hidden_size * cfg.vocab_size)
    assert count.total("mac") == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ann_count_matches_flop_counter_for_other_families(input_ids, family):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = (GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64))
             if family == "gpt2" else
             LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                          eos_token_id=0)))
    count = count_operations(model, input_ids)
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(input_ids=input_ids, use_cache=False)
    assert count.total("mac") == pytest.approx(flops.get_total_flops() / 2, rel=0.01)
    names = {e.name for e in count.entries if e.layer == 0}
    attention = "attn" if family == "gpt2" else "self_attn"
    assert {f"{attention} Q·Kᵀ", f"{attention} P·V"} <= names


@pytest.mark.parametrize("student", ["student", "spiking_student"])
def test_ac_count_equals_spikes_times_fan_out(folders, input_ids, student):
    model = load_pretrained(folders[student])[0]
    count = count_operations(model, input_ids)
    products, neurons = hooked_spike_counts(model, input_ids)
    counted = defaultdict(float)
    for e in count.entries:
        if e.kind == "ac":
            counted[(e.layer, e.name)] += e.count
    float_head = not model.config.spiking_head
    expected = {key: ac for key, (ac, _) in products.items() if not (float_head and key == (None, "lm_head"))}
    assert set(counted) == set(expected)
    for key, ac in expected.items():
        assert counted[key] == pytest.approx(ac, rel=1e-9), key
    assert count.total("ac") > 0 and all(ac > 0 for ac in expected.values())
    assert count.total("neuron_update") == sum(u for u, _ in neurons.values())
    assert count.total("spike_reset") == pytest.approx(sum(s for _, s in neurons.values()), rel=1e-9)
    out = model(input_ids=input_ids, use_cache=False, output_firing_rates=True)
    assert count.firing_rates == pytest.approx(out.firing_rates, rel=1e-9)
    if float_head:   # the LayerNorm head's product has a real-valued input; mean_t and LayerNorm: 5 mul each
        tokens_d = input_ids.numel() * model.config.hidden_size
        assert count.total("mac", "head") == tokens_d * model.config.vocab_size
        assert count.total("elementwise_mul", "head") == 5 * tokens_d


@pytest.mark.parametrize("student", ["student", "spiking_student"])
def test_spike_cost_loss_is_the_counted_linear_layer_ratio_and_has_a_gradient(folders, input_ids, student):
    """The training term `spike_cost` equals E_AC·(counted accumulates of the linear layers) / E_MAC·(the ANN's
    MACs of the same layers, head included), and its gradient reaches the weights that drive the neurons."""
    model = load_pretrained(folders[student])[0]
    ann = load_pretrained(folders["teacher"])[0]
    linear = lambda e: "·" not in e.name and e.part in ("attention", "ffn", "head")  # noqa: E731
    counted = sum(e.count for e in count_operations(model, input_ids).entries if e.kind == "ac" and linear(e))
    ann_macs = sum(e.count for e in count_operations(ann, input_ids).entries if e.kind == "mac" and linear(e))
    table = EnergyTable()
    cost = SpikeCostLoss(model, table.ac_pj / table.mac_pj)
    model.train()
    with cost.recording():
        model(input_ids, use_cache=False)
        value = cost.value(input_ids.numel())
    assert value.item() == pytest.approx(counted * table.ac_pj / (ann_macs * table.mac_pj), rel=1e-5)
    value.backward()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    with torch.no_grad():   # not recording: the hooks add nothing
        model(input_ids, use_cache=False)
    assert cost._sums is None
    cost.remove()


def test_formula_agrees_within_documented_head_and_neuron_terms(folders, input_ids):
    table = EnergyTable()
    teacher = load_pretrained(folders["teacher"])[0]
    ann = count_operations(teacher, input_ids)
    for name in ("spiking_student", "student"):
        model = load_pretrained(folders[name])[0]
        report = energy_report(count_operations(model, input_ids), ann, table)
        products, neurons = hooked_spike_counts(model, input_ids)
        if not model.config.spiking_head:
            products.pop((None, "lm_head"))
        rate = sum(ac for ac, _ in products.values()) / sum(dense for _, dense in products.values())
        formula, t = report["formula"], model.config.time_steps
        assert formula["rate"] == pytest.approx(rate, rel=1e-9)
        assert formula["ratio"] == pytest.approx(0.9 / 4.6 * t * rate, rel=1e-9)
        e_ann = ann.energy_pj(table)
        block_neurons = sum(u * (4.6 + 0.9) + s * 0.9 for path, (u, s) in neurons.items() if path.startswith("model."))
        terms = formula["terms_outside"]
        assert terms["neurons"] == pytest.approx(block_neurons / e_ann, rel=1e-9)
        # the spike-driven products are exactly the ANN's products (same shape), except a LayerNorm head
        spike_macs = sum(dense for _, dense in products.values()) / t
        cfg = model.config
        head_macs = 0 if cfg.spiking_head else input_ids.numel() * cfg.hidden_size * cfg.vocab_size
        assert spike_macs + head_macs == ann.total("mac")
        assert formula["coverage"] == pytest.approx(spike_macs * 4.6 / e_ann, rel=1e-9)
        gap = report["ratio"] - formula["ratio"] * formula["coverage"]
        small = terms["bias"] + terms["embedding"] + terms["residual"]
        assert abs(gap - terms["neurons"] - terms["head"]) <= small * 1.0001
        assert small < 0.2 * (terms["neurons"] + terms["head"])
        if not model.config.spiking_head:   # the real-valued head alone costs the ANN's head
            assert terms["head"] > head_macs * 4.6 / e_ann


def test_energy_table_from_file(folders, input_ids, tmp_path):
    model = load_pretrained(folders["spiking_student"])[0]
    count = count_operations(model, input_ids)
    path = tmp_path / "table.yaml"
    path.write_text("name: doubled\nmac_pj: 9.2\nac_pj: 1.8\n")
    doubled = load_energy_table(path)
    assert doubled == EnergyTable("doubled", 9.2, 1.8)
    assert count.energy_pj(doubled) == pytest.approx(2 * count.energy_pj(EnergyTable()), rel=1e-9)
    (tmp_path / "bad.json").write_text(json.dumps({"mac": 1}))
    with pytest.raises(UserError, match="mac_pj"):
        load_energy_table(tmp_path / "bad.json")


def test_energy_command(folders, data_dir, tmp_path, capsys):
    out = tmp_path / "energy.json"
    text = str(data_dir / "wikitext-2" / "test.txt")
    code = main(["energy", str(folders["spiking_student"]), "--teacher", str(folders["teacher"]), "--text", text,
                 "--seq-len", "32", "--time-steps", "4", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["time_steps"] == 4 and report["tokens"] == 32
    assert 0 < report["ratio"] < 1
    assert set(report["student"]["parts"]) == {"embedding", "attention", "ffn", "neurons", "residual", "head"}
    assert "student / ANN" in capsys.readouterr().out
    assert main(["energy", str(folders["teacher"]), "--text", text]) == 2   # an ANN is not a student
    assert main(["energy", str(tmp_path), "--text", text]) == 2
    assert main(["energy", str(folders["student"]), "--text", text, "--seq-len", "100000"]) == 2


def test_memory_reads_match_a_hand_count(folders, input_ids):
    """Bytes a batch-1 decode reads per token, counted by hand from the shapes and from the neurons' spikes."""
    teacher = load_pretrained(folders["teacher"])[0]
    cfg = teacher.config
    d, f, v, layers = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.num_hidden_layers
    b, n = input_ids.shape
    tokens, keys_seen = b * n, b * n * (n + 1) // 2          # position i reads the K/V of positions 0..i
    ann = count_operations(teacher, input_ids)
    weights = layers * (4 * d * d + 2 * d * f) + d * v + 2 * d   # projections, FFN, head, token + position rows
    assert ann.total("weight_read") == tokens * weights
    assert ann.total("cache_read") == layers * 2 * d * keys_seen
    assert bytes_read(ann, "int8") == tokens * weights + layers * 2 * d * keys_seen
    assert bytes_read(ann, "float32") == 4 * bytes_read(ann, "int8")

    for name in ("student", "spiking_student"):
        model = load_pretrained(folders[name])[0]
        t = model.config.time_steps
        fired = defaultdict(float)        # rows read: inputs that fired at any of the T steps, from the neurons
        inputs_of = {"attn_in_neuron": 3 * d, "ffn_in_neuron": f, "ffn.hidden_neuron": d, "head_neuron": v}
        hooks = [m.register_forward_hook(lambda m, a, s, fan_out=fan_out: fired.__setitem__(
                     "rows", fired["rows"] + float(s.bool().any(0).sum()) * fan_out))
                 for path, m in model.named_modules() for leaf, fan_out in inputs_of.items()
                 if isinstance(m, LIFNeuron) and path.endswith(leaf)]
        hooks += [m.register_forward_pre_hook(lambda m, a: fired.__setitem__(
                      "rows", fired["rows"] + float((a[0] != 0).any(0).sum()) * d))
                  for path, m in model.named_modules() if path.endswith("out_proj")]
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        count = count_operations(model, input_ids)
        head = 0 if model.config.spiking_head else tokens * d * v
        assert count.total("weight_read") == fired["rows"] + head + tokens * 2 * d
        assert count.total("cache_read") == layers * 2 * d * t * keys_seen
        assert bytes_read(count, "int8") == count.total("weight_read") + layers * 2 * d * t * keys_seen / 8
        assert count.total("weight_read", "ffn") < tokens * layers * 2 * d * f      # sparse: fewer rows


def test_cost_table_prices_both_conventions_at_both_precisions(folders, input_ids):
    ann = count_operations(load_pretrained(folders["teacher"])[0], input_ids)
    student = count_operations(load_pretrained(folders["student"])[0], input_ids)
    memory = MemoryTable()
    table = cost_table(student, ann, memory)
    rows = {(r["precision"], r["convention"]): r for r in table["rows"]}
    assert set(rows) == {(p, c) for p in ("float32", "int8") for c in ("paper", "arithmetic", "sram", "dram")}
    assert memory.sram_pj_per_byte == 1.25 and memory.dram_pj_per_byte == 160.0
    tokens = input_ids.numel()
    for count, who in ((student, "student"), (ann, "ann")):
        macs = sum(count.total(k) * KIND_COST[k][0] for k in KIND_COST)
        acs = sum(count.total(k) * KIND_COST[k][1] for k in KIND_COST)
        block_macs = sum(count.total(k, p) * KIND_COST[k][0] for k in KIND_COST for p in BLOCK_PARTS)
        block_acs = sum(count.total(k, p) * KIND_COST[k][1] for k in KIND_COST for p in BLOCK_PARTS)
        for precision, (mac, ac, size) in {"float32": (4.6, 0.9, 4), "int8": (0.23, 0.03, 1)}.items():
            arithmetic = (macs * mac + acs * ac) / tokens * 1e-9
            traffic = bytes_read(count, precision) / tokens
            assert table["bytes_per_token"][precision][who] == pytest.approx(traffic, rel=1e-12)
            assert rows[precision, "paper"][f"{who}_mj"] == pytest.approx(
                (block_macs * mac + block_acs * ac) / tokens * 1e-9, rel=1e-9)
            assert rows[precision, "arithmetic"][f"{who}_mj"] == pytest.approx(arithmetic, rel=1e-9)
            assert rows[precision, "dram"][f"{who}_mj"] == pytest.approx(arithmetic + traffic * 160e-9, rel=1e-9)
            assert rows[precision, "sram"][f"{who}_mj"] == pytest.approx(arithmetic + traffic * 1.25e-9, rel=1e-9)
    # the student reads fewer bytes per token than the ANN: rows of the inputs that fired, 1-bit K/V spikes
    assert table["bytes_per_token"]["int8"]["student"] < table["bytes_per_token"]["int8"]["ann"]
    assert rows["float32", "arithmetic"]["student_mj"] == pytest.approx(
        energy_report(student, ann)["student"]["energy_mj_per_token"], rel=1e-12)
    assert "| int8 | everything + memory at DRAM |" in format_cost_table(table)


def test_energy_per_token_prices_any_weight_size(folders, input_ids):
    """A block format's weight size (4-bit rows, llama.cpp's Q4_0 with its scales) changes only the weight bytes'
    share of the memory energy; the cost table's rows are energy_per_token at the precision's own size."""
    count = count_operations(load_pretrained(folders["student"])[0], input_ids)
    memory = MemoryTable()
    rows = {(r["precision"], r["convention"]): r["student_mj"]
            for r in cost_table(count, count_operations(load_pretrained(folders["teacher"])[0], input_ids))["rows"]}
    for (precision, convention), mj in rows.items():
        assert energy_per_token(count, precision, convention, memory) == pytest.approx(mj, rel=1e-12)
    weights, tokens = count.total("weight_read"), input_ids.numel()
    assert bytes_read(count, "int8", bytes_per_weight=0.5) == pytest.approx(bytes_read(count, "int8") - weights / 2)
    for convention, pj_per_byte in (("sram", 1.25), ("dram", 160.0)):
        saved = energy_per_token(count, "int8", convention) - energy_per_token(count, "int8", convention,
                                                                               bytes_per_weight=18 / 32)
        assert saved == pytest.approx(weights * (1 - 18 / 32) / tokens * pj_per_byte * 1e-9, rel=1e-9)
    assert energy_per_token(count, "int8", "paper", bytes_per_weight=0.5) == rows["int8", "paper"]
    with pytest.raises(UserError, match="unknown precision"):
        energy_per_token(count, "int4", "dram")


def test_energy_command_precision(folders, data_dir, tmp_path, capsys):
    out = tmp_path / "energy.json"
    text = str(data_dir / "wikitext-2" / "test.txt")
    assert main(["energy", str(folders["student"]), "--teacher", str(folders["teacher"]), "--text", text,
                 "--seq-len", "32", "--precision", "int8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["energy_table"]["mac_pj"] == 0.23 and report["energy_table"]["ac_pj"] == 0.03
    int8_arithmetic = next(r for r in report["cost_table"]["rows"] if r["precision"] == "int8"
                           and r["convention"] == "arithmetic")
    assert report["ratio"] == pytest.approx(int8_arithmetic["ratio"], rel=1e-9)
    printed = capsys.readouterr().out
    assert "paper: blocks, arithmetic only" in printed and "everything + memory at DRAM" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["energy", str(folders["student"]), "--precision", "int4"])
    assert exit_info.value.code == 2
