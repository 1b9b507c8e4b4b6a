"""The MatMul-free audit on real saved models: clean blocks for BiSpikCLM students, findings for an HF OPT."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import cost_models
from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.audit import audit
from bispikclm.cli import main


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory):
    return cost_models(data_dir, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def text(data_dir):
    return str(data_dir / "wikitext-2" / "test.txt")


def test_student_blocks_are_clean_and_head_reported_alone(folders, text, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit", str(folders["student"]), "--text", text, "--tokens", "32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks: clean" in printed and "embedding: clean" in printed
    head_line = next(line for line in printed.splitlines() if line.startswith("head:"))
    assert "normalization" in head_line and "float product" in head_line and "spiking_head" in head_line
    result = json.loads(out.read_text())
    assert result["blocks_clean"] and not result["clean"]["head"]
    assert {(f["module"], f["problem"]) for f in result["findings"]} == {("final_layer_norm", "normalization"),
                                                                         ("lm_head", "float product")}


def test_spiking_head_student_is_clean_everywhere(folders, text, capsys):
    assert main(["audit", str(folders["spiking_student"]), "--text", text, "--tokens", "32"]) == 0
    printed = capsys.readouterr().out
    assert {"embedding: clean", "blocks: clean", "head: clean"} <= set(printed.splitlines())


def test_opt_is_flagged(folders, text, capsys):
    assert main(["audit", str(folders["teacher"]), "--text", text, "--tokens", "32"]) == 1
    printed = capsys.readouterr().out
    blocks_line = next(line for line in printed.splitlines() if line.startswith("blocks:"))
    assert all(p in blocks_line for p in ("float product", "normalization", "softmax"))
    assert "model.decoder.layers.1.fc2" in printed and "model.decoder.layers.0.self_attn" in printed


def test_eager_opt_softmax_and_float_attention_products(folders):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(folders["teacher"], attn_implementation="eager")
    result = audit(teacher, torch.arange(1, 17)[None])
    attention = [f for f in result.findings if f.module.endswith("layers.0.self_attn")]
    assert {(f.op, f.problem) for f in attention} == {("bmm", "float product"), ("_softmax", "softmax")}


def test_normalization_inside_blocks_is_caught():
    """A student whose block holds a LayerNorm (as an option that adds one would) fails the audit."""
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset("tiny", num_hidden_layers=1, spiking_head=True))
    ffn = model.model.layers[0].ffn
    ffn.fc1 = torch.nn.Sequential(torch.nn.LayerNorm(ffn.fc1.in_features), ffn.fc1)
    result = audit(model, torch.arange(1, 9)[None])
    assert not result.blocks_clean
    assert {(f.module, f.problem) for f in result.in_section("blocks")} == {
        ("model.layers.0.ffn.fc1.0", "normalization"), ("model.layers.0.ffn.fc1.1", "float product")}
