"""Our zero-shot evaluator against lm-evaluation-harness's own ``hf`` backend (HFLM through the Auto classes),
both real, on the local tasks: same log-likelihood for every request, same accuracies."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaForCausalLM

from bispikclm.cli import main
from bispikclm.evaluation.zeroshot import score_lls
from helpers import make_teacher, make_tokenizer, write_llama_gguf

TASKS = "arc_easy,winogrande,hellaswag,piqa"   # trailing-space prompts (winogrande), accented choices (piqa, hellaswag)


@pytest.fixture(scope="module")
def gguf_model(data_dir, tmp_path_factory):
    """A random Llama (GQA, tied) with 512 positions, written as a GGUF file: the harness needs the dequantized
    copy the parity command saves, our side loads the file."""
    root = tmp_path_factory.mktemp("parity")
    tokenizer = make_tokenizer(data_dir, root / "tok")
    folder = make_teacher("llama-gqa", root / "folder", tokenizer, positions=512)
    path = root / "tiny.gguf"
    write_llama_gguf(LlamaForCausalLM.from_pretrained(str(folder)), tokenizer, path)
    return path


def test_parity_with_the_harness(gguf_model, data_dir, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["eval", "parity", str(gguf_model), "--tasks", TASKS, "--limit", "12", "--data-dir", str(data_dir),
                 "--out", str(out), "--cache-dir", str(cache), "--batch-size", "8"]) == 0
    result = json.loads((out / "parity.json").read_text())
    assert "command" in result and result["limit"] == 12
    assert list(result["tasks"]) == TASKS.split(",")
    for name, row in result["tasks"].items():
        assert row["n"] == 12 and row["requests"] >= 24
        assert row["max_abs_loglikelihood_difference"] < 1e-3, name
        assert row["difference"] == {"acc": 0.0, "acc_norm": 0.0}, name
    assert result["max_abs_difference_points"] == 0.0
    assert "| hellaswag | 12 |" in (out / "parity.md").read_text()
    assert (cache / "gguf").is_dir() and len(list((cache / "gguf").iterdir())) == 1   # saved once for the harness


def test_parity_with_a_tokenizer_that_adds_bos(data_dir, tmp_path, capsys):
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tokenizer(data_dir, tmp_path / "tok")
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert tokenizer("a b")["input_ids"][0] == tokenizer.bos_token_id
    folder = make_teacher("opt", tmp_path / "opt", tokenizer, positions=512)
    assert main(["eval", "parity", str(folder), "--tasks", "arc_easy,winogrande", "--limit", "8", "--data-dir",
                 str(data_dir), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert result["harness_model"] == str(folder) and result["max_abs_difference_points"] == 0.0
    assert all(row["max_abs_loglikelihood_difference"] < 1e-3 for row in result["tasks"].values())


def test_parity_rejects_lambada_and_missing_models(data_dir, tmp_path, capsys):
    assert main(["eval", "parity", str(tmp_path / "none.gguf"), "--tasks", "lambada_openai",
                 "--data-dir", str(data_dir)]) == 2
    assert "multiple-choice" in capsys.readouterr().err
    assert main(["eval", "parity", str(tmp_path / "none.gguf"), "--tasks", "arc_easy", "--data-dir",
                 str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "is not a model checkpoint" in err and err.count("\n") == 1


def test_acc_norm_divides_by_characters_as_the_harness_does():
    # per byte, " café" (6 bytes) wins; per character (5), " cafe" wins, which is what lm-eval computes
    items = [{"prompt": "p", "choices": [" café", " cafe"], "answer": 1}]
    assert score_lls(items, [-6.0, -5.9]) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
