"""Packed engine against a float Hugging Face OPTForCausalLM of the same shape, side by side in one run on this CPU.

For the ``tiny`` and ``opt-125m`` shapes and T = 2, 4: prefill tokens/s (a 64-token WikiText-2 prompt) and
decode tokens/s at batch 1 (24 further WikiText-2 tokens fed one at a time with the cache), the bytes of
weights read per token, the firing rates the student ran at (random init), its spike-for-spike agreement with
the PyTorch model on the prompt, and where the engine's decode time goes (linears, attention, neurons, head, Python). Engines: float32 weights; int8 blocks (float head); int8 blocks
and int8 head. Prefill: the best of ``--repeats`` runs; decode: the median time of a step over all steps of all
runs (robust to other processes on a shared machine); the engine and OPT are measured alternately.
Also: the linear-layer kernel choice (Numba fused event-driven vs torch index_select vs torch dense).

    PYTHONPATH=. python benchmarks/engine.py            # writes results/engine.json
"""

from __future__ import annotations

import os

# Threads of an idle OpenMP pool must sleep, not spin: torch and Numba each keep a pool, and spinning pools fight for
# the two cores (measured here: the engine fell from 21 to 1.6 tokens/s at 2 threads with spinning pools).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import OPTForCausalLM  # noqa: E402

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM, same_shape_ann  # noqa: E402
from bispikclm.engine import PackedEngine, kernels, model_spikes, pack, quantize_, spike_agreement  # noqa: E402
from bispikclm.data import default_data_dir, train_tokenizer  # noqa: E402
from bispikclm.modeling import CACHE_FIELD  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = {"linear_spikes": "linears", "linear_counts": "linears", "sfsa": "attention", "lif": "neurons",
              "residual_add": "neurons", "head_int8": "head kernel"}


def wikitext_tokens(data: Path, count: int) -> list[int]:
    """``count`` tokens of WikiText-2 test, by a 4,096-token byte-level BPE trained on 20,000 lines of train."""
    train = (data / "wikitext-2" / "train.txt").read_text(encoding="utf-8").splitlines()[:20000]
    test = (data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    return train_tokenizer(train, 4096)(test[:20000], add_special_tokens=False)["input_ids"][:count]


class TimedOps:
    """The engine's kernel module, with the time of each call added to ``totals[component]``."""

    def __init__(self, ops, totals: dict[str, float]) -> None:
        self.ops, self.totals = ops, totals

    def __getattr__(self, name: str):
        kernel = getattr(self.ops, name)

        def timed(*args):
            start = time.perf_counter()
            kernel(*args)
            self.totals[COMPONENTS[name]] += time.perf_counter() - start
        return timed


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def opt_run(opt: OPTForCausalLM, prompt: list[int], decode: list[int]) -> tuple[float, list[float]]:
    """Seconds of the prefill of ``prompt`` and of each following decode step."""
    start = time.perf_counter()
    cache = getattr(opt(torch.tensor([prompt]), use_cache=True), CACHE_FIELD)
    prefill, steps = time.perf_counter() - start, []
    for token in decode:
        start = time.perf_counter()
        cache = getattr(opt(torch.tensor([[token]]), use_cache=True, **{CACHE_FIELD: cache}), CACHE_FIELD)
        steps.append(time.perf_counter() - start)
    return prefill, steps


def engine_run(engine: PackedEngine, prompt: list[int], decode: list[int]) -> tuple[float, list[float]]:
    """Seconds of the prefill of ``prompt`` and of each following decode step."""
    cache = engine.new_cache(len(prompt) + len(decode))
    start = time.perf_counter()
    engine.forward(prompt, cache)
    prefill, steps = time.perf_counter() - start, []
    for token in decode:
        start = time.perf_counter()
        engine.forward([token], cache)
        steps.append(time.perf_counter() - start)
    return prefill, steps


def profile(engine: PackedEngine, prompt: list[int], decode: list[int]) -> dict[str, float]:
    """Milliseconds per decoded token by component, on the per-kernel path (the one-call path has no calls to
    time one by one)."""
    totals: dict[str, float] = defaultdict(float)
    ops, head, fused = engine.ops, engine._head, engine.fused
    engine.ops, engine.fused = TimedOps(ops, totals), None

    def timed_head(*args):
        start = time.perf_counter()
        out = head(*args)
        totals["head"] += time.perf_counter() - start
        return out

    engine._head = timed_head
    cache = engine.new_cache(len(prompt) + len(decode))
    engine.forward(prompt, cache)
    totals.clear()
    start = time.perf_counter()
    for token in decode:
        engine.forward([token], cache)
    total = time.perf_counter() - start
    engine.ops, engine._head, engine.fused = ops, head, fused
    totals.pop("head kernel", None)   # inside the head's time
    totals["python and copies"] = total - sum(totals.values())
    return {k: round(1e3 * v / len(decode), 3) for k, v in totals.items()}


def rates(record: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean firing rate per neuron group over the layers, and the fraction of input rows each linear reads."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, value in record.items():
        group = name.split(".", 3)[-1]
        if group.endswith("out_proj"):
            groups["rows read: out_proj (count > 0 at any t)"].append(float((value != 0).any(1).mean()))
            continue
        groups[group].append(float(value.mean()))
        if group in ("attn_in_neuron", "ffn_in_neuron", "ffn.hidden_neuron"):
            groups[f"rows read: {group} (fired at any t)"].append(float(value.any(1).mean()))
    return {k: round(float(np.mean(v)), 4) for k, v in groups.items()}


def opt_model(config: BiSpikCLMConfig) -> OPTForCausalLM:
    torch.manual_seed(0)
    return same_shape_ann(config).eval()


def bench_shape(preset: str, tokens: list[int], args) -> dict:
    prompt, decode = tokens[:args.prompt], tokens[args.prompt:args.prompt + args.decode]
    shape = BiSpikCLMConfig.from_preset(preset)
    opt = opt_model(shape)
    dense = sum(m.weight.numel() for n, m in opt.named_modules()
                if isinstance(m, torch.nn.Linear) and "layers" in n) * 4
    head = opt.lm_head.weight.numel() * 4
    opt_run(opt, prompt[:8], decode[:2])
    out = {"opt": {"weight_bytes_per_token": {"blocks": dense, "head": head, "total": dense + head}},
           "students": []}
    opt_prefill, opt_dec = [], []
    for time_steps in (2, 4):
        torch.manual_seed(0)
        model = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset(preset, time_steps=time_steps)).eval()
        for variant in ("float32", "int8", "int8 + int8 head"):
            if variant != "float32":
                quantize_(model, head=variant.endswith("head"))
            engine = PackedEngine.from_model(model, int8=variant != "float32")
            record: dict = {}
            logits = engine.forward(prompt, engine.new_cache(len(prompt)), all_logits=True, record=record)
            theirs, torch_logits = model_spikes(model, prompt)
            engine_run(engine, prompt[:8], decode[:2])
            prefills, steps = [], []
            for _ in range(args.repeats):    # alternate the two models so that both see the same machine load
                for run, prefill_times, step_times in [(engine_run, prefills, steps), (opt_run, opt_prefill, opt_dec)]:
                    prefill, step = run(engine if run is engine_run else opt, prompt, decode)
                    prefill_times.append(prefill)
                    step_times += step
            bytes_read = engine.weight_bytes(record)
            out["students"].append({
                "time_steps": time_steps, "weights": variant,
                "prefill_tokens_per_s": round(len(prompt) / min(prefills), 2),
                "decode_tokens_per_s": round(1 / float(np.median(steps)), 2),
                "weight_bytes_per_token": {"blocks": round(bytes_read["blocks"]), "head": round(bytes_read["head"]),
                                           "total": round(bytes_read["blocks"] + bytes_read["head"])},
                "spike_agreement_with_torch": spike_agreement(record, theirs),
                "greedy_next_tokens_equal_torch": float((logits.argmax(-1) == torch_logits.argmax(-1)).float().mean()),
                "firing_rates": rates(record),
                "decode_ms_per_token": profile(engine, prompt, decode),
            })
            print(preset, json.dumps(out["students"][-1]), flush=True)
            del engine
    out["opt"]["prefill_tokens_per_s"] = round(len(prompt) / min(opt_prefill), 2)
    out["opt"]["decode_tokens_per_s"] = round(1 / float(np.median(opt_dec)), 2)
    for student in out["students"]:
        student["decode_speedup_vs_opt"] = round(student["decode_tokens_per_s"] / out["opt"]["decode_tokens_per_s"], 2)
        student["prefill_speedup_vs_opt"] = round(student["prefill_tokens_per_s"] / out["opt"]["prefill_tokens_per_s"], 2)
    print(preset, "opt", json.dumps(out["opt"]), flush=True)
    return out


def kernel_choice(repeats: int) -> list[dict]:
    """One 768 -> 3072 linear layer at T = 2 on spikes: Numba fused event-driven (float32, int8) against torch
    index_select + sum of the fired rows, and the dense float product. Microseconds per token."""
    rng = np.random.default_rng(0)
    weight_t = rng.standard_normal((768, 3072)).astype(np.float32)
    weight_i8 = rng.integers(-127, 128, (768, 3072)).astype(np.int8)
    w_torch, wt_torch = torch.from_numpy(np.ascontiguousarray(weight_t.T)), torch.from_numpy(weight_t)
    bias, bias_i32, ones = np.zeros(3072, np.float32), np.zeros(3072, np.int32), np.ones(3072, np.float32)
    out = np.empty((1, 2, 3072), np.float32)
    rows = []
    for rate in (0.1, 0.2, 0.3):
        spikes = rng.random((2, 768)) < rate
        packed = pack(spikes[None])
        fired = [torch.from_numpy(np.flatnonzero(s)) for s in spikes]
        dense_in = torch.from_numpy(spikes.astype(np.float32))
        kernels.linear_spikes(packed, weight_i8, bias_i32, ones, out)
        kernels.linear_spikes(packed, weight_t, bias, ones, out)
        us = lambda fn: round(1e6 * min(best(fn, 50) for _ in range(repeats)), 1)  # noqa: E731
        rows.append({
            "rate": rate,
            "numba_fused_float32_us": us(lambda: kernels.linear_spikes(packed, weight_t, bias, ones, out)),
            "numba_fused_int8_us": us(lambda: kernels.linear_spikes(packed, weight_i8, bias_i32, ones, out)),
            "torch_index_select_us": us(lambda: [wt_torch.index_select(0, f).sum(0) for f in fired]),
            "torch_dense_us": us(lambda: torch.nn.functional.linear(dense_in, w_torch)),
        })
    return rows


def speed_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options shared by the speed benchmarks (threads, prompt, decode, repeats, data)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=default_data_dir())
    return parser


def prepare(args) -> tuple[float, tuple, list[int]]:
    """Set the torch and Numba threads; return the start time, the load average before the run and the prompt
    and decode tokens."""
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    return time.time(), os.getloadavg(), wikitext_tokens(args.data, args.prompt + args.decode)


def main() -> None:
    parser = speed_arguments(__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "opt-125m"])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "engine.json")
    args = parser.parse_args()
    start, load, tokens = prepare(args)
    result = {
        "command": " ".join(["PYTHONPATH=. python benchmarks/engine.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "load_average_before": [round(x, 2) for x in load]},
        "setup": {"prompt_tokens": args.prompt, "decode_tokens": args.decode, "batch": 1, "repeats": args.repeats,
                  "students": "random init (seed 0); firing rates as measured on the prompt",
                  "text": "WikiText-2 test, 4,096-token BPE trained on 20,000 lines of train"},
        "kernel_choice_768x3072_T2": kernel_choice(args.repeats),
        "shapes": {preset: bench_shape(preset, tokens, args) for preset in args.presets},
    }
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['runtime_s']} s")


if __name__ == "__main__":
    main()
