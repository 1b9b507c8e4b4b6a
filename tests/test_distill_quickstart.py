"""The quickstart end to end: its run folder at a tiny budget, and (slow) the acceptance criterion at the default
budget."""

from __future__ import annotations

import json

import pytest

from helpers import cli

SMALL = ["--teacher-tokens", "8192", "--student-tokens", "8192", "--test-tokens", "8192",
         "--set", "teacher_train.eval_batches=2", "--set", "train.eval_batches=2"]


def test_quickstart_writes_its_run_folder(data_dir, tmp_path):
    out = tmp_path / "run"
    done = cli("quickstart", "--data", str(data_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *SMALL)
    assert done.returncode == 0, done.stderr
    assert "spiking / teacher" in done.stdout and "the price of spikes" in done.stdout
    assert "ANN student (same shape)" in done.stdout and "firing rates" in done.stdout
    assert "MatMul-free audit of the blocks: clean" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert {"teacher_ppl", "student_ppl", "ann_student_ppl", "unigram_ppl", "ratio", "ratio_to_ann_student",
            "student_firing_rates"} <= set(results)
    assert results["ratio_to_ann_student"] == pytest.approx(results["student_ppl"] / results["ann_student_ppl"])
    assert results["ann_student_train_tokens"] == results["student_train_tokens"]
    assert results["teacher_train_tokens"] >= results["student_train_tokens"]
    assert results["audit_blocks_clean"] is True
    energy = json.loads((out / "report" / "energy.json").read_text())
    # the results and the report agree; whether spikes are cheaper depends on the rate the run reaches (a
    # calibrated student of this 8k-token teacher fires more than one of the full quickstart: 78.9% there)
    assert 0 < results["energy"]["ratio"] == energy["ratio"]
    assert f"spiking / teacher: {100 * energy['ratio']:.1f}%" in done.stdout
    report = out / "report" / "report.html"
    assert str(report) in done.stdout and report.stat().st_size > 50_000
    for name in ("teacher", "ann_student", "student"):
        assert (out / name / "model" / "model.safetensors").is_file()
        assert (out / name / "model" / "tokenizer.json").is_file()   # each model folder loads on its own
        assert (out / name / "checkpoints" / "latest").is_file()
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "cache").is_dir() and (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_quickstart_teacher_converges_and_the_student_is_far_below_unigram(data_dir, tmp_path):
    out = tmp_path / "run"
    done = cli("quickstart", "--data", str(data_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               timeout=3600)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_train_tokens"] >= results["student_train_tokens"]
    assert results["teacher_ppl"] < results["ann_student_ppl"] * 1.05     # the teacher is the ceiling
    assert results["student_ppl"] <= 2.5 * results["teacher_ppl"]
    assert results["student_ppl"] < 0.5 * results["unigram_ppl"]
