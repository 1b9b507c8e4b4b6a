"""Checkpoints of sharded (``train.fsdp``) runs, two formats side by side: (i) ``full``, the whole state gathered
onto the main process and written there (one ``model.safetensors`` and the full optimizer state), loaded back by
every process reading the whole files; (ii) ``sharded``, each process writing and reading its own shards with
``torch.distributed.checkpoint`` (:mod:`bispikclm.distill.sharded`). Writes ``results/fsdp_checkpoint.json``.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/fsdp_checkpoint.py

Each case is one ``torchrun`` launch of N gloo processes on this machine's CPU, a real ``Trainer`` with
``train.fsdp: true``: one training step (so AdamW holds its moments), then ``Trainer.save_checkpoint`` and
``Trainer.load_checkpoint`` into the same trainer after its weights and moments were zeroed (every tensor must come
back bit for bit; the case fails otherwise). Both include what every checkpoint costs (fsync, the manifest's
sha256 pass, verifying it before loading). Per process: the wall time of save and load, and the growth of peak
resident memory over what the process held before each (``/proc/self/clear_refs`` resets the peak; glibc is told
to return large blocks to the system at once, ``MALLOC_MMAP_THRESHOLD_``, so that freed memory is not counted as
held). Absolute times are noisy on a shared machine; the ratios of the two formats in one run are the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {   # BiSpikCLM shapes (T = 1: time steps do not change the state's size)
    "w256-L2": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, ffn_dim=1024),
    "opt-125m": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
}
FORMATS = ("full", "sharded")
MIB = 2 ** 20


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _digest(trainer) -> str:
    """sha256 of this process's shards of every weight and optimizer tensor."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    tensors = [p for p in trainer.model.parameters()]
    for state in trainer.optimizer.state.values():
        tensors += [v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor)]
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        h.update(local.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _zero(trainer) -> None:
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for t in list(trainer.model.parameters()) + [v for s in trainer.optimizer.state.values()
                                                        for v in s.values() if isinstance(v, torch.Tensor)]:
            (t.to_local() if isinstance(t, DTensor) else t).zero_()


def worker(size: str, fmt: str, out: Path) -> None:
    """One case, on every process of a torchrun launch; the main process prints the per-process results."""
    import torch.distributed as dist

    from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
    from bispikclm.distill import TrainConfig, Trainer

    world = int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig(**SIZES[size], max_position_embeddings=16, time_steps=1))
    params = sum(p.numel() for p in model.parameters())
    config = TrainConfig(tokens=world * 16, seq_len=16, batch_size=world, mixed_precision="no", fsdp=True,
                         firing_rates=False, weights={"emb": 0, "attn": 0, "feat": 0, "soft": 0, "hard": 1})
    data = torch.randint(0, SIZES[size]["vocab_size"], (world, 16))
    trainer = Trainer(model, config, data, None, out, progress=False)
    trainer.sharded_checkpoints = fmt == "sharded"
    trainer.train_step()
    before = _digest(trainer)
    dist.barrier()
    base = held = _reset_peak()
    start = time.perf_counter()
    trainer.save_checkpoint()
    dist.barrier()
    save_s, save_peak = time.perf_counter() - start, _status("VmHWM") - base
    _zero(trainer)
    dist.barrier()
    base = _reset_peak()
    start = time.perf_counter()
    assert trainer.load_checkpoint()
    dist.barrier()
    load_s, load_peak = time.perf_counter() - start, _status("VmHWM") - base
    row = {"save_s": round(save_s, 3), "load_s": round(load_s, 3), "save_peak_growth_mib": round(save_peak / MIB, 1),
           "load_peak_growth_mib": round(load_peak / MIB, 1), "rss_before_save_mib": round(held / MIB, 1),
           "bit_for_bit": _digest(trainer) == before}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        folder = next((out / "checkpoints").glob("step-*"))
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(json.dumps({"size": size, "format": fmt, "processes": world, "params": params,
                          "checkpoint_mib": round(disk / MIB, 1), "ranks": rows}))


def run_case(size: str, fmt: str, world: int, port: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bispikclm-fsdp-ckpt-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           __file__, "--worker", size, fmt, str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"{size} {fmt} x{world} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if not all(r["bit_for_bit"] for r in row["ranks"]):
        raise RuntimeError(f"{size} {fmt} x{world}: the loaded state differs from the saved one")
    return row


def summary(rows: list[dict]) -> list[dict]:
    """Per size and process count: sharded / full for the main process's and the other processes' numbers."""
    out = []
    for full in (r for r in rows if r["format"] == "full"):
        shard = next(r for r in rows if r["format"] == "sharded" and r["size"] == full["size"]
                     and r["processes"] == full["processes"])
        entry = {"size": full["size"], "processes": full["processes"], "params": full["params"]}
        for key in ("save_s", "load_s", "save_peak_growth_mib", "load_peak_growth_mib"):
            for who, pick in (("main", lambda r: r["ranks"][0][key]),
                              ("others_max", lambda r: max(x[key] for x in r["ranks"][1:]))):
                entry[f"{key}_{who}"] = {"full": pick(full), "sharded": pick(shard),
                                         "sharded_over_full": round(pick(shard) / max(pick(full), 1e-9), 3)}
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/fsdp_checkpoint.json")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--processes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, fmt, out = args.worker
        worker(size, fmt, Path(out))
        return
    started, rows, port = time.time(), [], 29600
    for size in args.sizes:
        for world in args.processes:
            for fmt in FORMATS:
                port += 1
                rows.append(run_case(size, fmt, world, port))
                print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "fsdp_checkpoint",
              "command": " ".join(["OMP_NUM_THREADS=1 nice -n 10 python benchmarks/fsdp_checkpoint.py",
                                  *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average_at_start": os.getloadavg()},
              "sizes": {k: SIZES[k] for k in args.sizes}, "cases": rows, "summary": summary(rows),
              "wall_s": round(time.time() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
