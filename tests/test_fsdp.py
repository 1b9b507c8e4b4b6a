"""Sharded training (``train.fsdp``, FSDP2) on 2 real gloo processes: the same losses as one process and as data
parallelism on the same global batch; checkpoints of per-process shards (torch.distributed.checkpoint) that resume
bit for bit after kill -9 and after a torn shard, and end in one line on a full disk; a final folder the Auto
classes load; bf16 parameters with float32 neurons; and a one-line error where sharding cannot run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bispikclm.runfolder import check_manifest
from helpers import REPO, cli, cli_command, make_teacher, make_tokenizer, tmpfs, write_recipe

STEPS = 6


def torchrun(port: int) -> tuple[str, ...]:
    return ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port))


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def sharded_run(root, recipe) -> Path:
    """The uninterrupted sharded run the first test makes (made here when that test did not run)."""
    whole = root / "fsdp"
    if not (whole / "model").is_dir():
        assert cli("train", str(recipe), "--out", str(whole), "--set", "train.fsdp=true",
                   launcher=torchrun(29533)).returncode == 0
    return whole


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    teacher = make_teacher("opt", root / "opt", make_tokenizer(data_dir, root / "tok"))
    # early stopping that never stops: the final model is the best weights, loaded back into the shards first
    return root, write_recipe(root / "fsdp.yaml", teacher, data_dir, tokens=4 * 32 * STEPS, save_every=2,
                              eval_every=2, early_stopping=100)


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
    model, info = AutoModelForCausalLM.from_pretrained(str(root / "fsdp" / "model"), output_loading_info=True)
    assert not any(info.values()), info        # every weight there (the tied head from the embedding), no others
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    reference = AutoModelForCausalLM.from_pretrained(str(root / "one" / "model"))
    ours, theirs = model.state_dict(), reference.state_dict()
    assert type(model).__name__ == "BiSpikCLMForCausalLM" and ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-5) for k in ours)
    # the final model is the best weights (tied ones stored once), gathered again after a strict load into the shards
    last = root / "fsdp" / "checkpoints" / f"step-{STEPS:08d}"
    best = json.loads((last / "trainer_state.json").read_text())["best_step"]
    kept = load_file(str(root / "fsdp" / "best" / f"step-{best:08d}" / "model.safetensors"))
    assert kept.keys() < ours.keys() and all(torch.equal(ours[k], v) for k, v in kept.items()), best
    # the checkpoints hold one file of shards per process (no gathered weights), all under the manifest
    shards = sorted(p.name for p in (last / "shards").iterdir())
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards), shards
    assert not (last / "model.safetensors").exists() and check_manifest(last) is None
    assert {f"shards/{n}" for n in shards} <= set(json.loads((last / "manifest.json").read_text())["files"])


def test_sharded_run_killed_after_a_checkpoint_resumes_with_the_same_losses(setup):
    root, recipe = setup
    whole = sharded_run(root, recipe)
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


def test_a_torn_shard_is_skipped_in_one_line_and_the_run_resumes_from_the_one_before(setup):
    root, recipe = setup
    whole = sharded_run(root, recipe)
    run = root / "torn"
    shutil.copytree(whole, run)
    newest, before = f"step-{STEPS:08d}", f"step-{STEPS - 2:08d}"
    shard = sorted((run / "checkpoints" / newest / "shards").iterdir())[-1]
    with open(shard, "r+b") as f:
        f.truncate(1000)
    resumed = cli("train", str(recipe), "--out", str(run), "--resume", "--set", "train.fsdp=true",
                  launcher=torchrun(29537))
    assert resumed.returncode == 0, resumed.stderr
    notes = [line for line in resumed.stderr.splitlines() if "resuming from" in line]
    assert len(notes) == 1 and notes[0].startswith(
        f"bispikclm: warning: resuming from {before}; skipped {newest} (shards/{shard.name} has 1000 bytes, the "
        f"manifest says "), notes
    assert (run / "checkpoints" / f"damaged-{newest}").is_dir()
    assert losses(run) == losses(whole)


def test_a_full_disk_under_a_sharded_checkpoint_is_one_line_on_every_process(setup, tmp_path):
    """The checkpoints folder is a real tmpfs with room for one checkpoint and a half: the second one fails while
    the processes write their shards or the main process its files; every process ends with the same line, and the
    first checkpoint stays intact and named by latest."""
    root, recipe = setup
    whole = sharded_run(root, recipe) / "checkpoints" / f"step-{STEPS:08d}"
    size = sum(p.stat().st_size for p in whole.rglob("*") if p.is_file())
    run = tmp_path / "full"
    with tmpfs(run / "checkpoints", f"{size * 3 // 2 // 4096 * 4096}") as disk:
        done = cli("train", str(recipe), "--out", str(run), "--set", "train.fsdp=true", launcher=torchrun(29538))
        assert done.returncode != 0
        line = (f"bispikclm train: error: cannot write checkpoint {disk}/step-00000004: No space left on device; "
                f"the earlier checkpoints in {disk} are kept")
        assert done.stderr.count(line) == 2, done.stderr[-3000:]
        assert (disk / "latest").read_text() == "step-00000002" and check_manifest(disk / "step-00000002") is None
        assert not list(disk.glob(".tmp-*")) and not (disk / "step-00000004").exists()


MEMBRANE_PROBE = """
import json, os, torch
from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
from bispikclm.distill.trainer import shard
from bispikclm.neurons import LIFNeuron

torch.manual_seed(0)
model = BiSpikCLMForCausalLM(BiSpikCLMConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, ffn_dim=128, max_position_embeddings=32,
                                             time_steps=4))
names = {m: n for n, m in model.named_modules() if isinstance(m, LIFNeuron)}
model = shard(model, torch.device("cpu"), "bf16", False)
neurons, weights, busy = {}, set(), []

def probe(module, args, kwargs, out):
    if busy:          # the reference call below
        return
    busy.append(1)
    with torch.no_grad():    # the same current, float32 from the start
        reference = module(args[0].detach().float(), *args[1:], **kwargs)
    busy.pop()
    neurons[names[module]] = [str(args[0].dtype), str(out.dtype), int((reference.to(out.dtype) != out).sum()),
                              out.numel()]

for m in names:
    m.register_forward_hook(probe, with_kwargs=True)
model.model.layers[0].register_forward_pre_hook(lambda m, a: weights.update(
    str(p.dtype) for p in m.parameters() if p.ndim == 2))
ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(int(os.environ["RANK"])))
out = model(ids, labels=ids, use_cache=False)
out.loss.backward()
if int(os.environ["RANK"]) == 0:
    print(json.dumps({"neurons": neurons, "weights": sorted(weights), "loss": float(out.loss),
                      "grads": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None}),
                      "shards": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def test_bf16_sharded_training_keeps_the_neurons_membranes_in_float32(tmp_path):
    """Under ``mixed_precision: bf16`` on 2 gloo processes the gathered weights and the neurons' currents are bf16
    (the attention map's scores, spike counts, are float32 by design), yet every neuron gives the same spikes as
    one fed the float32 current: its membrane runs in float32. The shards and their gradients (what AdamW sees)
    stay float32."""
    script = tmp_path / "probe.py"
    script.write_text(MEMBRANE_PROBE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *torchrun(29539), str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    neurons = seen["neurons"]
    assert len(neurons) == 18 and seen["weights"] == ["torch.bfloat16"], seen
    for name, (current, spikes, mismatches, entries) in neurons.items():
        expected = "torch.float32" if name.endswith(".attn_neuron") else "torch.bfloat16"
        assert current == spikes == expected and mismatches == 0 and entries > 0, (name, neurons[name])
    assert seen["shards"] == ["torch.float32"] and seen["grads"] == ["torch.float32"], seen
    assert torch.isfinite(torch.tensor(seen["loss"]))


@pytest.mark.parametrize("override, message", [
    ((), "train.fsdp needs torch.distributed: launch with torchrun"),
    (("--set", "train.fsdp_offload=true"), "train.fsdp_offload keeps GPU shards in CPU memory and needs GPUs"),
])
def test_sharding_where_it_cannot_run_is_one_line_and_exit_2(setup, override, message):
    root, recipe = setup
    done = cli("train", str(recipe), "--out", str(root / "refused"), "--set", "train.fsdp=true", *override)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (root / "refused" / "checkpoints").exists()
