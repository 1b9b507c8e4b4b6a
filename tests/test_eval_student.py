"""Student checkpoints (save_pretrained) through every evaluation command, including the sweep."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import eval_models
from bispikclm.cli import main
from bispikclm.checkpoints import load_pretrained
from bispikclm.evaluation.models import with_spiking_overrides


@pytest.fixture(scope="module")
def student(data_dir, tmp_path_factory):
    return eval_models(data_dir, tmp_path_factory.mktemp("eval-student"), max_positions=512)[1]


def test_overrides_equal_a_checkpoint_loaded_with_them(student):
    """Rebuilding in memory (sweeps) and loading with config overrides (lm-eval model_args) give one model."""
    model, _ = load_pretrained(str(student))
    rebuilt = with_spiking_overrides(model, threshold=0.7, time_steps=3)
    loaded = AutoModelForCausalLM.from_pretrained(str(student), threshold=0.7, time_steps=3).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        a = rebuilt(ids, use_cache=False, output_firing_rates=True)
        b = loaded(ids, use_cache=False, output_firing_rates=True)
        base = model(ids, use_cache=False, output_firing_rates=True)
    assert torch.equal(a.logits, b.logits) and a.firing_rates == b.firing_rates
    assert not torch.equal(a.logits, base.logits)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight


def test_ppl_zeroshot_and_sweep_commands(student, data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    common = ["--model", str(student), "--data-dir", str(data_dir), "--out", str(out), "--attn-chunk-size", "64"]
    assert main(["eval", "ppl", *common, "--context-lengths", "128,512", "--stride", "64", "--max-tokens", "1500"]) == 0
    ppl = json.loads((out / "ppl.json").read_text())
    assert [r["context_length"] for r in ppl["results"]] == [128, 512]
    assert all(r["tokens"] == 1499 and 0 < r["firing_rate"] < 1 and r["perplexity"] > 1 for r in ppl["results"])

    assert main(["eval", "zeroshot", *common, "--tasks", "copa,lambada_openai", "--limit", "12"]) == 0
    zeroshot = json.loads((out / "zeroshot.json").read_text())
    assert zeroshot["tasks"]["copa"]["n"] == 12 and zeroshot["average"]["tasks"] == ["copa"]
    assert zeroshot["tasks"]["lambada_openai"]["perplexity"] > 1
    assert main(["eval", "zeroshot", *common, "--tasks", "paper,copa", "--limit", "3"]) == 0
    zeroshot = json.loads((out / "zeroshot.json").read_text())
    assert len(zeroshot["average_paper"]["tasks"]) == 8 and len(zeroshot["average"]["tasks"]) == 9
    assert "| **average** (the paper's 8 tasks) |" in (out / "zeroshot.md").read_text()

    assert main(["eval", "sweep", *common, "--thresholds", "0.5,1.0", "--time-steps", "1,2",
                 "--context-lengths", "128,256", "--max-tokens", "600"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["records"]) == 8
    rate = {(r["threshold"], r["time_steps"], r["context_length"]): r["firing_rate"] for r in sweep["records"]}
    assert rate[0.5, 2, 128] > rate[1.0, 2, 128]           # a lower threshold fires more
    table = (out / "sweep.md").read_text()
    assert "T = 1" in table and "T = 2" in table and "| threshold | 128 | 256 |" in table
    assert table.count("| 0.5 | ") == 2 and (out / "sweep.png").stat().st_size > 0
    assert "| copa | 12 |" in capsys.readouterr().out
