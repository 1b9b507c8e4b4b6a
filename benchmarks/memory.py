"""Memory of one training step (forward + backward + AdamW step, SpAD against a same-shape teacher) of a BiSpikCLM
student and of the ANN of its exact shape, with and without block checkpointing, and from it an estimate of the
GPU memory of the ``opt-125m`` and ``smollm2-135m`` recipes. Writes ``results/memory.json``.

    OMP_NUM_THREADS=1 python benchmarks/memory.py

Two measurements per case, each case in a fresh process (so peaks do not mix):

* ``saved_mib``: the bytes autograd keeps from the forward for the backward (``saved_tensors_hooks``; each storage
  once, parameters excluded). Under checkpointing the blocks' own activations are not kept (recomputed in the
  backward); their inputs are kept by the checkpoint and are not seen by the hooks.
* ``peak_rss_growth_mib``: the growth of the process's peak resident memory over one whole training step
  (``Trainer.train_step``: activations, gradients, AdamW state and the backward's temporaries).

Sweeps: sequence length, T, batch and width around a small base shape. Estimate: for each recipe's student shape
(real width, heads, FFN and vocabulary), saved bytes are measured with 1 and 2 blocks at several sequence lengths
and T (batch 1) and fitted as ``outside(N, T) + L · block(N, T)``, each part linear in ``N·T, N²·T, N, N²`` (the
N² terms are the attention maps: binary P in the student, the teacher's softmax maps for L_attn); saved bytes are
linear in the batch (checked by the batch sweep). The GPU estimate is the model states (fp32 weights and
gradients, AdamW's two moments, the fp32 teacher) plus the saved bytes times the peak-per-saved-byte factor
measured on the CPU sweeps (the backward's gradients and temporaries come on top of what is kept).

FSDP estimate per process (``train.fsdp``, :func:`fsdp_estimate`), for the ``opt-125m``, ``smollm2-135m`` and
``opt-1.3b`` recipes at 2, 4 and 8 processes, at each recipe's sequence length and T (and T = 4 for ``opt-1.3b``,
the paper's other setting), under bf16 mixed precision::

    16 P / R                  fp32 parameter, gradient and two AdamW moment shards (P student parameters, R ranks)
  + 8 (P_root + 2 P_block)    unsharded bf16 parameters and their bf16 + fp32 gradients of what is gathered at
                              once: the root group (embeddings, positions, final norm) and two blocks (the one that
                              runs and the one prefetched)
  + 4 P_teacher               the replicated fp32 teacher (2 with train.teacher_dtype: bfloat16)
  + factor x saved(micro)     activations of one micro-batch, as above (not sharded: each process runs its own)

The activations are float32 here, so the estimate leans high where bf16 halves the currents.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --reuse results/memory.json --presets opt-1.3b --kinds spiking

measures only the ``opt-1.3b`` student's fit and reuses the sweeps and the other fits of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SMALL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, ffn_dim=1024)
BASE = dict(seq=128, time_steps=4, batch=2, width=256)
SWEEPS = {"seq": [64, 128, 256], "time_steps": [1, 2, 4], "batch": [1, 2, 4], "width": [128, 256, 512]}
PRESET_SEQS, PRESET_TS = (128, 256, 384), (2, 4)
TARGET = dict(seq=1024, time_steps=4)            # the recipes' sequence length and the paper's OPT-125M T
GPU_BYTES = 80e9
MIB = 2 ** 20


def student_config(shape: dict, seq: int, time_steps: int, layers: int | None = None):
    from bispikclm import BiSpikCLMConfig

    return BiSpikCLMConfig(**{**shape, "max_position_embeddings": seq, "time_steps": max(time_steps, 1),
                              **({"num_hidden_layers": layers} if layers else {})})


def trainer_for(case: dict, out: Path):
    """A Trainer of ``case`` (kind, shape, seq, time_steps, batch, checkpointing, spad) on random token ids."""
    from bispikclm import BiSpikCLMForCausalLM
    from bispikclm.ann import same_shape_ann
    from bispikclm.distill import TrainConfig, Trainer
    from bispikclm.distill.teacher import freeze

    torch.manual_seed(0)
    config = student_config(case["shape"], case["seq"], case["time_steps"], case.get("layers"))
    student = (BiSpikCLMForCausalLM(config) if case["kind"] == "spiking"
               else same_shape_ann(config, attn_implementation="eager"))
    teacher = freeze(same_shape_ann(config, attn_implementation="eager")) if case["spad"] else None
    weights = {} if case["spad"] else {"emb": 0, "attn": 0, "feat": 0, "soft": 0, "hard": 1}
    train = TrainConfig(tokens=case["batch"] * case["seq"], seq_len=case["seq"], batch_size=case["batch"],
                        weights=weights, gradient_checkpointing=case["checkpointing"], firing_rates=False,
                        mixed_precision="no")
    data = torch.randint(0, config.vocab_size, (case["batch"], case["seq"]))
    return Trainer(student, train, data, None, out, teacher=teacher, progress=False)


def saved_bytes(trainer, input_ids: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward (with the loss) for the backward, parameters excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._forward(input_ids, False)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def measure(case: dict, out: Path) -> dict:
    """One case in this process: peak RSS growth over a whole training step, then the saved bytes of a forward."""
    trainer = trainer_for(case, out)
    params = sum(p.numel() for p in trainer.model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    trainer.train_step()
    step_s = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    saved = saved_bytes(trainer, trainer.micro_batch(0, 0)) if case.get("saved", True) else None
    return {**{k: v for k, v in case.items() if k != "shape"}, "params": params, "step_s": round(step_s, 3),
            "saved_mib": None if saved is None else saved / MIB, "peak_rss_growth_mib": growth / 1024}


def saved_only(cases: list[dict], out: Path) -> list[dict]:
    """Saved bytes of several forwards in this process (no step: the saved bytes do not depend on the process)."""
    rows = []
    for case in cases:
        trainer = trainer_for(case, out)
        rows.append({**{k: v for k, v in case.items() if k != "shape"},
                     "saved_mib": saved_bytes(trainer, trainer.micro_batch(0, 0)) / MIB})
        del trainer
    return rows


def in_subprocess(payload: dict) -> list[dict] | dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(payload)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"case {payload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def sweep_cases() -> list[dict]:
    """Each axis of SWEEPS around BASE: the student with checkpointing off and on, the ANN (no T axis) without
    checkpointing, and with it at the base point."""
    seen, cases = set(), []
    for axis, values in SWEEPS.items():
        for value in values:
            point = {**BASE, axis: value}
            for kind in ("spiking", "ann"):
                if kind == "ann" and axis == "time_steps":
                    continue
                for ckpt in (False, True):
                    if kind == "ann" and ckpt and point != BASE:
                        continue
                    key = (kind, ckpt, *point.values())
                    if key in seen:
                        continue
                    seen.add(key)
                    width = point["width"]
                    shape = {**SMALL, "hidden_size": width, "ffn_dim": 4 * width}
                    cases.append({"kind": kind, "shape": shape, "seq": point["seq"],
                                  "time_steps": point["time_steps"] if kind == "spiking" else 0,
                                  "batch": point["batch"], "width": width, "checkpointing": ckpt, "spad": True,
                                  "axis": axis})
    return cases


FEATURES = ("N*T", "N^2*T", "N", "N^2")


def features(seq: int, time_steps: int) -> list[float]:
    return [seq * time_steps, seq * seq * time_steps, seq, seq * seq]


def fit(rows: list[dict]) -> dict:
    """Least-squares ``saved_mib = outside(N, T) + L * block(N, T)`` (batch 1), each part linear in FEATURES."""
    x = np.array([features(r["seq"], max(r["time_steps"], 1)) + [r["layers"] * f for f in
                  features(r["seq"], max(r["time_steps"], 1))] for r in rows], dtype=float)
    y = np.array([r["saved_mib"] for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    worst = float(np.max(np.abs(x @ coef - y) / y))
    return {"outside": dict(zip(FEATURES, coef[:4].tolist())), "block": dict(zip(FEATURES, coef[4:].tolist())),
            "max_relative_residual": worst}


def predict(part: dict, seq: int, time_steps: int) -> float:
    return sum(c * f for c, f in zip(part.values(), features(seq, time_steps)))


def param_count(shape: dict, kind: str) -> int:
    """Parameters of the student (``kind`` spiking) or of the same-shape ANN, built on the meta device."""
    from bispikclm import BiSpikCLMForCausalLM
    from bispikclm.ann import same_shape_ann

    config = student_config(shape, TARGET["seq"], TARGET["time_steps"])
    with torch.device("meta"):
        model = BiSpikCLMForCausalLM(config) if kind == "spiking" else same_shape_ann(config)
    return sum(p.numel() for p in model.parameters())


def backward_factor(sweep: list[dict], kind: str) -> float:
    """How much peak memory one more byte of saved activations costs over a whole step (it is kept, and the
    backward makes gradients and temporaries of its size): the least-squares slope of the peak RSS growth over
    the saved bytes along the sequence and batch sweeps (fixed width, so the model states are constant)."""
    rows = [r for r in sweep if r["kind"] == kind and not r["checkpointing"] and r["axis"] in ("seq", "batch")]
    x = np.array([[r["saved_mib"], 1.0] for r in rows])
    slope, _ = np.linalg.lstsq(x, np.array([r["peak_rss_growth_mib"] for r in rows]), rcond=None)[0]
    return float(slope)


def estimate(name: str, shape: dict, kind: str, model_fit: dict, factor: float) -> dict:
    """GPU memory at TARGET per micro-batch size, without and with checkpointing: fp32 weights, gradients and
    AdamW moments, the fp32 teacher (the same-shape ANN's size), and ``factor`` times the fitted saved
    activations (:func:`backward_factor`; float32 activations: under bf16 autocast part of them are half as
    large, so this leans high)."""
    params, teacher_params = param_count(shape, kind), param_count(shape, "ann")
    n, t = TARGET["seq"], TARGET["time_steps"] if kind == "spiking" else 1
    layers = shape["num_hidden_layers"]
    states_gb = (16 * params + 4 * teacher_params) / 1e9
    block, outside = predict(model_fit["block"], n, t) * MIB, predict(model_fit["outside"], n, t) * MIB
    block_input = t * n * shape["hidden_size"] * 4             # what a checkpointed block keeps: its input
    rows = []
    for micro in (1, 2, 4, 8, 16):
        plain = micro * (outside + layers * block)
        ckpt = micro * (outside + layers * block_input + block)    # + one block recomputed in the backward
        rows.append({"micro_batch": micro, "saved_gb": round(plain / 1e9, 2),
                     "saved_checkpointing_gb": round(ckpt / 1e9, 2),
                     "total_gb": round(states_gb + factor * plain / 1e9, 1),
                     "total_checkpointing_gb": round(states_gb + factor * ckpt / 1e9, 1)})
    return {"recipe": name, "kind": kind, "params": params, "teacher_params": teacher_params,
            "states_gb": round(states_gb, 2), "backward_factor": round(factor, 2), "rows": rows}


FSDP_RANKS = (2, 4, 8)
FSDP_RECIPES = ("opt-125m", "smollm2-135m", "opt-1.3b")


def block_param_counts(shape: dict) -> tuple[int, int]:
    """``(root, one block)``: the student's parameters outside the blocks and those of one block (meta device)."""
    from bispikclm import BiSpikCLMForCausalLM

    with torch.device("meta"):
        model = BiSpikCLMForCausalLM(student_config(shape, TARGET["seq"], TARGET["time_steps"]))
    blocks = sum(p.numel() for name, p in model.named_parameters() if ".layers." in f".{name}")
    return sum(p.numel() for p in model.parameters()) - blocks, blocks // shape["num_hidden_layers"]


def saved_per_sample(shape: dict, model_fit: dict, seq: int, time_steps: int) -> tuple[float, float]:
    """Saved activation bytes of one sequence without and with block checkpointing (see :func:`estimate`)."""
    block = predict(model_fit["block"], seq, time_steps) * MIB
    outside = predict(model_fit["outside"], seq, time_steps) * MIB
    layers = shape["num_hidden_layers"]
    return (outside + layers * block,
            outside + layers * time_steps * seq * shape["hidden_size"] * 4 + block)


def fsdp_estimate(recipe: str, shape: dict, model_fit: dict, factor: float, time_steps: int | None = None) -> dict:
    """GB per process of a BiSpikCLM student trained with ``train.fsdp`` at FSDP_RANKS processes, at the
    recipe's sequence length and T (or ``time_steps``), per micro-batch, without and with checkpointing (the
    formula in the module docstring)."""
    from bispikclm.recipes import load_recipe

    spec = load_recipe(recipe)
    seq = spec["train"]["seq_len"]
    t = time_steps or spec["student"]["time_steps"]
    params, teacher_params = param_count(shape, "spiking"), param_count(shape, "ann")
    root, block = block_param_counts(shape)
    teacher_bytes = 2 if spec["train"].get("teacher_dtype") == "bfloat16" else 4
    gathered = 8 * (root + 2 * block)
    plain, ckpt = saved_per_sample(shape, model_fit, seq, t)
    rows = []
    for ranks in FSDP_RANKS:
        states = 16 * params / ranks + gathered + teacher_bytes * teacher_params
        for micro in (1, 2, 4, 8, 16):
            rows.append({"ranks": ranks, "micro_batch": micro, "states_gb": round(states / 1e9, 2),
                         "total_gb": round((states + factor * micro * plain) / 1e9, 1),
                         "total_checkpointing_gb": round((states + factor * micro * ckpt) / 1e9, 1)})
    return {"recipe": recipe, "seq": seq, "time_steps": t, "params": params, "root_params": root,
            "block_params": block, "teacher_params": teacher_params, "teacher_bytes": teacher_bytes,
            "backward_factor": round(factor, 2), "saved_per_sample_gb": round(plain / 1e9, 2),
            "saved_per_sample_checkpointing_gb": round(ckpt / 1e9, 2), "rows": rows}


def main() -> None:
    from bispikclm.configuration import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/memory.json")
    parser.add_argument("--presets", nargs="+", default=["opt-125m", "smollm2-135m"])
    parser.add_argument("--kinds", nargs="+", default=["spiking", "ann"], choices=["spiking", "ann"])
    parser.add_argument("--reuse", help="an earlier results/memory.json: keep its sweeps and fits, measure only "
                                        "the fits of --presets it lacks")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tmp = Path(tempfile.gettempdir()) / "bispikclm-memory"   # the trainer's run folder; nothing is written
    if args.one:
        payload = json.loads(args.one)
        result = saved_only(payload["cases"], tmp) if "cases" in payload else measure(payload, tmp)
        print(json.dumps(result))
        return

    started = time.time()
    earlier = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    sweep = earlier.get("sweep", [])
    for case in [] if sweep else sweep_cases():
        row = in_subprocess(case)
        sweep.append(row)
        print(json.dumps(row), flush=True)
    fits = earlier.get("fits", {})
    names = list(dict.fromkeys([*args.presets, *(k.split("/")[0] for k in fits)]))
    for name in names:
        shape = {k: v for k, v in PRESETS[name].items() if k != "max_position_embeddings"}
        for kind in args.kinds if name in args.presets else ():
            if f"{name}/{kind}" in fits:
                continue
            ts = PRESET_TS if kind == "spiking" else (0,)
            cases = [{"kind": kind, "shape": shape, "seq": n, "time_steps": t, "batch": 1, "layers": layers,
                      "checkpointing": False, "spad": True} for layers in (1, 2) for n in PRESET_SEQS for t in ts]
            rows = [in_subprocess({"cases": [case]})[0] for case in cases]    # a process each: memory is freed
            fits[f"{name}/{kind}"] = {"points": rows, **fit(rows)}
            print(json.dumps(fits[f"{name}/{kind}"]), flush=True)
    estimates = [estimate(key.split("/")[0], {k: v for k, v in PRESETS[key.split("/")[0]].items()
                                              if k != "max_position_embeddings"}, key.split("/")[1], value,
                          backward_factor(sweep, key.split("/")[1]))
                 for key, value in fits.items() if key.split("/")[0] != "opt-1.3b"]
    factor = backward_factor(sweep, "spiking")
    fsdp = []
    for name in FSDP_RECIPES:
        if f"{name}/spiking" not in fits:
            continue
        shape = {k: v for k, v in PRESETS[name].items() if k != "max_position_embeddings"}
        fsdp.append(fsdp_estimate(name, shape, fits[f"{name}/spiking"], factor))
        if name == "opt-1.3b":
            fsdp.append(fsdp_estimate(name, shape, fits[f"{name}/spiking"], factor, time_steps=4))
        print(json.dumps(fsdp[-1]), flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/memory.py", *sys.argv[1:]]).strip()
    if args.reuse:
        command = f"{earlier.get('command', '')}; then {command}"
    result = {"benchmark": "memory", "command": command,
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "base": {**BASE, **SMALL}, "sweep": sweep, "fits": fits,
              "target": {**TARGET, "gpu_bytes": GPU_BYTES}, "estimates": estimates, "fsdp_estimates": fsdp,
              "wall_s": round(time.time() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
