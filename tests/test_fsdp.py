"""Sharded training (``train.fsdp``, FSDP2) on 2 real gloo processes: the same losses as one process and as data
parallelism on the same global batch, bit-for-bit resume after kill -9, a final folder the Auto classes load, and a
one-line error where sharding cannot run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import cli, cli_command, make_teacher, make_tokenizer, write_recipe

STEPS = 6


def torchrun(port: int) -> tuple[str, ...]:
    return ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port))


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    teacher = make_teacher("opt", root / "opt", make_tokenizer(data_dir, root / "tok"))
    return root, write_recipe(root / "fsdp.yaml", teacher, data_dir, tokens=4 * 32 * STEPS, save_every=2)


def test_sharded_training_matches_one_process_and_data_parallel(setup):
    root, recipe = setup
    one = cli("train", str(recipe), "--out", str(root / "one"))
    assert one.returncode == 0, one.stderr
    ddp = cli("train", str(recipe), "--out", str(root / "ddp"), launcher=torchrun(29531))
    assert ddp.returncode == 0, ddp.stderr
    fsdp = cli("train", str(recipe), "--out", str(root / "fsdp"), "--set", "train.fsdp=true", launcher=torchrun(29532))
    assert fsdp.returncode == 0, fsdp.stderr
    a, b, c = losses(root / "one"), losses(root / "ddp"), losses(root / "fsdp")
    assert list(a) == list(b) == list(c) == list(range(1, STEPS + 1))
    assert all(abs(a[k] - c[k]) <= 1e-5 and abs(b[k] - c[k]) <= 1e-5 for k in a), (a, b, c)
    assert c[STEPS] < c[1]
    model = AutoModelForCausalLM.from_pretrained(str(root / "fsdp" / "model"))
    reference = AutoModelForCausalLM.from_pretrained(str(root / "one" / "model"))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert type(model).__name__ == "BiSpikCLMForCausalLM" and ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-5) for k in ours)


def test_sharded_run_killed_after_a_checkpoint_resumes_with_the_same_losses(setup):
    root, recipe = setup
    whole = root / "fsdp"
    if not (whole / "model").is_dir():
        assert cli("train", str(recipe), "--out", str(whole), "--set", "train.fsdp=true",
                   launcher=torchrun(29533)).returncode == 0
    killed = root / "killed"
    argv, env = cli_command("train", str(recipe), "--out", str(killed), "--set", "train.fsdp=true",
                            launcher=torchrun(29534))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    while proc.poll() is None and not (latest.is_file() and latest.read_text() >= "step-00000002"):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(killed)) < STEPS, "the run ended before it could be killed"
    resumed = cli("train", str(recipe), "--out", str(killed), "--resume", "--set", "train.fsdp=true",
                  launcher=torchrun(29535))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(killed) == losses(whole)


@pytest.mark.parametrize("override, message", [
    ((), "train.fsdp needs torch.distributed: launch with torchrun"),
    (("--set", "train.fsdp_offload=true"), "train.fsdp_offload keeps GPU shards in CPU memory and needs GPUs"),
])
def test_sharding_where_it_cannot_run_is_one_line_and_exit_2(setup, override, message):
    root, recipe = setup
    done = cli("train", str(recipe), "--out", str(root / "refused"), "--set", "train.fsdp=true", *override)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (root / "refused" / "checkpoints").exists()
