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


def main() -> None:
    from bispikclm.configuration import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/memory.json")
    parser.add_argument("--presets", nargs="+", default=["opt-125m", "smollm2-135m"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tmp = Path(tempfile.gettempdir()) / "bispikclm-memory"   # the trainer's run folder; nothing is written
    if args.one:
        payload = json.loads(args.one)
        result = saved_only(payload["cases"], tmp) if "cases" in payload else measure(payload, tmp)
        print(json.dumps(result))
        return

    started = time.time()
    sweep = []
    for case in sweep_cases():
        row = in_subprocess(case)
        sweep.append(row)
        print(json.dumps(row), flush=True)
    fits, estimates = {}, []
    for name in args.presets:
        shape = {k: v for k, v in PRESETS[name].items() if k != "max_position_embeddings"}
        for kind in ("spiking", "ann"):
            ts = PRESET_TS if kind == "spiking" else (0,)
            cases = [{"kind": kind, "shape": shape, "seq": n, "time_steps": t, "batch": 1, "layers": layers,
                      "checkpointing": False, "spad": True} for layers in (1, 2) for n in PRESET_SEQS for t in ts]
            rows = in_subprocess({"cases": cases})
            fits[f"{name}/{kind}"] = {"points": rows, **fit(rows)}
            estimates.append(estimate(name, shape, kind, fits[f"{name}/{kind}"], backward_factor(sweep, kind)))
            print(json.dumps(estimates[-1]), flush=True)
    result = {"benchmark": "memory", "command": "OMP_NUM_THREADS=1 python benchmarks/memory.py",
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__},
              "base": {**BASE, **SMALL}, "sweep": sweep, "fits": fits,
              "target": {**TARGET, "gpu_bytes": GPU_BYTES}, "estimates": estimates,
              "wall_s": round(time.time() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
