"""energy, audit and report load their models as eval and generate do (``checkpoints.load_pretrained``): a
``save_pretrained`` folder or a GGUF file (written here by the ``gguf`` package from a real Llama), and give the
same results for the same model from either source."""

from __future__ import annotations

import json

import pytest

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.cli import main
from helpers import llama_folder_and_gguf


@pytest.fixture(scope="module")
def sources(data_dir, tmp_path_factory):
    """A random grouped-query Llama as a folder and as a GGUF file, and a BiSpikCLM student of its shape sharing
    its tokenizer, saved as a folder."""
    root = tmp_path_factory.mktemp("sources")
    folder, llama, tokenizer, gguf = llama_folder_and_gguf(data_dir, root)
    student = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_teacher_config(llama.config, time_steps=2))
    student.save_pretrained(str(root / "student"))
    tokenizer.save_pretrained(str(root / "student"))
    return {"folder": folder, "gguf": gguf, "student": root / "student"}


@pytest.fixture
def text(data_dir):
    return str(data_dir / "wikitext-2" / "test.txt")


def test_audit_takes_a_gguf_file_like_a_folder(sources, text, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = {}
    for name in ("gguf", "folder"):
        out = tmp_path / f"{name}.json"
        assert main(["audit", str(sources[name]), "--text", text, "--tokens", "16", "--json", str(out)]) == 1
        results[name] = json.loads(out.read_text())
    assert not results["gguf"]["blocks_clean"] and results["gguf"]["findings"]
    assert results["gguf"]["findings"] == results["folder"]["findings"]
    assert main(["audit", str(sources["student"]), "--text", text, "--tokens", "16"]) == 0


def test_energy_takes_a_gguf_teacher_like_a_folder(sources, text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reports = {}
    for name in ("gguf", "folder"):
        out = tmp_path / f"{name}.json"
        assert main(["energy", str(sources["student"]), "--teacher", str(sources[name]), "--text", text,
                     "--seq-len", "16", "--json", str(out)]) == 0
        reports[name] = json.loads(out.read_text())
    lines = {name: [(l["name"], l["kind"], l["per_token"]) for l in r["ann"]["lines"]] for name, r in reports.items()}
    assert lines["gguf"] == lines["folder"] and any(kind == "mac" for _, kind, _ in lines["gguf"])
    assert reports["gguf"]["ratio"] == reports["folder"]["ratio"] and 0 < reports["gguf"]["ratio"] < 1
    capsys.readouterr()
    assert main(["energy", str(sources["gguf"]), "--text", text, "--seq-len", "16"]) == 2
    assert "is not a BiSpikCLM student" in capsys.readouterr().err


def test_report_takes_a_student_folder_and_a_gguf_teacher(sources, text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "report"
    assert main(["report", str(sources["student"]), "--teacher", str(sources["gguf"]), "--out", str(out),
                 "--text", text, "--tokens", "8", "--energy-seq-len", "16"]) == 0
    energy = json.loads((out / "energy.json").read_text())
    assert energy["tokens"] == 16 and energy["ann"]["model"] == "teacher"
    assert "against the teacher" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main(["report", str(sources["gguf"]), "--text", text]) == 2     # not a folder to write the report in
    assert "--out" in capsys.readouterr().err
