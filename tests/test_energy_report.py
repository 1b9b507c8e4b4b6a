"""``bispikclm report RUN_DIR``: the pictures show the student's real spikes, beside the teacher layers distillation
paired them with, and the HTML stands alone."""

from __future__ import annotations

import json
import re
import shutil

import matplotlib.image
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from helpers import cost_models
from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.cli import main
from bispikclm.checkpoints import load_pretrained
from bispikclm.data import text_token_ids
from bispikclm.distill.losses import SpADLoss
from bispikclm.report import attention_maps, block_input_spikes


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    folders = cost_models(data_dir, root)
    shutil.rmtree(folders["student"])
    folders["spiking_student"].rename(root / "student")
    return root


def test_block_input_spikes_are_the_models_spikes(run_dir, data_dir):
    student, tokenizer = load_pretrained(run_dir / "student")
    ids = text_token_ids(tokenizer, data_dir / "wikitext-2" / "test.txt", seq_len=16)
    spikes = block_input_spikes(student, ids)
    rates = student(input_ids=ids, use_cache=False, output_spike_rates=True).spike_rates
    assert len(spikes) == student.config.num_hidden_layers
    for layer_spikes, rate in zip(spikes, rates):
        assert layer_spikes.shape == (student.config.time_steps, 16, student.config.hidden_size)
        assert torch.equal(layer_spikes.float().mean(0), rate[0])


def test_report_command_writes_pictures_and_self_contained_html(run_dir, data_dir, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--text", str(data_dir / "wikitext-2" / "test.txt"),
                 "--tokens", "16", "--energy-seq-len", "32"]) == 0
    for name in ("firing_pattern", "firing_rates", "attention", "energy"):
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0.05   # not blank
    energy, audit = json.loads((out / "energy.json").read_text()), json.loads((out / "audit.json").read_text())
    assert 0 < energy["ratio"] < 1 and energy["tokens"] == 32 and audit["blocks_clean"]
    page = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 4
    assert not re.search(r'(src|href)="(?!data:)', page)       # nothing outside the file
    assert "student / ANN" in page and "blocks: clean" in page and "head: clean" in page
    assert "against the teacher" in page


def test_report_needs_a_student(tmp_path):
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.parametrize("student_layers, teacher_layers", [(2, 3), (3, 4), (4, 6), (6, 30)])
def test_report_pairs_layers_as_the_losses_do(student_layers, teacher_layers):
    """Beside each student block the report shows the teacher layer the SpAD losses align it with."""
    torch.manual_seed(0)
    teacher = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, word_embed_proj_dim=16, num_attention_heads=2,
                                       ffn_dim=32, num_hidden_layers=teacher_layers, max_position_embeddings=16,
                                       dropout=0.0)).eval()
    config = BiSpikCLMConfig.from_teacher_config(teacher.config, num_hidden_layers=student_layers, time_steps=1)
    student = BiSpikCLMForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    _, shown = attention_maps(student, teacher, ids)
    with torch.no_grad():
        maps = [a[0].mean(0) for a in teacher(input_ids=ids, output_attentions=True).attentions]
    paired = SpADLoss(config, teacher.config).map                       # 1-based teacher layers
    assert len(shown) == student_layers and paired[-1] == teacher_layers
    for student_layer, teacher_layer in enumerate(paired):
        matches = [j for j, m in enumerate(maps) if torch.equal(shown[student_layer], m)]
        assert matches == [teacher_layer - 1], (student_layer, matches)
