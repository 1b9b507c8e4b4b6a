"""The packed engine against the peers a user would pick on a CPU, side by side in one run, same shape, batch 1.

For the ``opt-125m`` and ``smollm2-135m`` shapes: our engine (int8 blocks and int8 head, T = 2) at a sweep of
firing rates (every threshold but the attention map's scaled until the blocks' mean firing rate hits each
target; weights random init, seed 0), at the quickstart student's measured rate (``results/quickstart.json``),
and at a trained student's real rates when ``--run-dir`` holds one (``RUN/student/model``); against the ANN of
the same shape (:func:`bispikclm.ann.same_shape_ann`: OPT, or Llama for the SmolLM2 shape) in Hugging Face
float32, in int8 by torchao (``Int8DynamicActivationInt8WeightConfig``, what ``torch.ao.quantization`` now
points CPU users to) and by ``torch.ao.quantization.quantize_dynamic`` (the deprecated API), and in llama.cpp
(``llama-cpp-python``) at Q8_0 and Q4_0, from a GGUF of the same weights written with the ``gguf`` package and
quantized by llama.cpp itself (llama.cpp has no OPT: the OPT shape runs as its GPT-2 architecture, which has
the same matrices, learned positions and LayerNorms, with GELU for ReLU), on its plain CPU kernels (see
:func:`load_llama_cpp`).

Measured: prefill tokens/s (a 64-token WikiText-2 prompt, best of ``--repeats``), decode tokens/s (median step
over ``--repeats`` x 24 tokens fed one at a time with the cache), weight bytes read per token, and the CPU's
read bandwidth (a Numba sum over 256 MB) beside the bytes of weight rows per second the engine's linear kernel
reads on its own, to say how close the kernels and each decode are to the bandwidth limit. Weights are
random: speeds, not outputs, are compared. 2 threads everywhere (torch, Numba, llama.cpp).

    pip install -e .[peers]      # llama-cpp-python (built from source) and gguf
    pip install torchao          # optional: the torchao int8 row (see docs/engine.md)
    PYTHONPATH=. python benchmarks/engine_peers.py     # writes results/engine_peers.json and .png
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP pools must sleep (see benchmarks/engine.py)

import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402

from engine import engine_run, opt_run, prepare, speed_arguments  # noqa: E402  (benchmarks/engine.py)

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM  # noqa: E402
from bispikclm.ann import same_shape_ann  # noqa: E402
from bispikclm.engine import PackedEngine, kernels, pack, quantize_  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("opt-125m", "smollm2-135m")
RATES = (0.05, 0.1, 0.15, 0.2, 0.3)
LLAMA_CPP_TYPES = {"Q8_0": 7, "Q4_0": 2}       # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


# ---------------------------------------------------------------------------------------------------- machine
@njit(parallel=True, cache=True, nogil=True)
def _read_all(words):
    total = np.uint64(0)
    for i in prange(words.shape[0]):
        total += words[i]
    return total


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second the CPU reads from memory with the benchmark's threads (a sum over a large array)."""
    words = np.ones(megabytes * 2 ** 20 // 8, np.uint64)
    _read_all(words)
    return words.nbytes / min(timed(lambda: _read_all(words)) for _ in range(repeats))


def linear_bandwidth(rates=(0.1, 0.2), layers: int = 24, repeats: int = 5) -> list[dict]:
    """Bytes per second of weight rows the fused event-driven linear kernel reads (int8, T = 2, decode: one
    token) at the OPT-125m shapes, over ``layers`` distinct weight matrices so that they do not stay in cache."""
    rng = np.random.default_rng(0)
    rows = []
    for n_in, n_out in [(768, 2304), (768, 3072), (3072, 768)]:
        weights = [rng.integers(-127, 128, (n_in, n_out)).astype(np.int8) for _ in range(layers)]
        bias, scale, out = np.zeros(n_out, np.int32), np.ones(n_out, np.float32), np.empty((1, 2, n_out), np.float32)
        for rate in rates:
            fired = [rng.random((1, 2, n_in)) < rate for _ in range(layers)]
            spikes = [pack(f) for f in fired]
            read = sum(int(f[0].any(0).sum()) for f in fired) * n_out

            def run():
                for s, w in zip(spikes, weights):
                    kernels.linear_spikes(s, w, bias, scale, out)
            run()
            seconds = min(timed(run) for _ in range(repeats))
            rows.append({"layer": f"{n_in}x{n_out}", "rate": rate, "us_per_layer": round(1e6 * seconds / layers, 1),
                         "gb_per_s": round(read / seconds / 1e9, 2)})
    return rows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speeds(run, model, prompt: list[int], decode: list[int], repeats: int) -> dict:
    """Prefill and decode tokens/s of ``run(model, prompt, decode) -> (prefill s, [step s])``."""
    run(model, prompt[:8], decode[:2])                       # warm up (compilation, allocation)
    prefills, steps = [], []
    for _ in range(repeats):
        prefill, step = run(model, prompt, decode)
        prefills.append(prefill)
        steps += step
    return {"prefill_tokens_per_s": round(len(prompt) / min(prefills), 2),
            "decode_tokens_per_s": round(1 / float(np.median(steps)), 2)}


# ----------------------------------------------------------------------------------------------------- engine
def block_rate(record: dict[str, np.ndarray]) -> float:
    """Mean firing rate of every neuron of the blocks in an engine record (the attention counts excluded)."""
    spikes = [v for k, v in record.items() if k.startswith("model.") and not k.endswith("out_proj")]
    return float(sum(v.sum() for v in spikes) / sum(v.size for v in spikes))


def scale_thresholds(engine: PackedEngine, base: list[dict], factor: float) -> None:
    """Every neuron threshold of the engine's blocks (the attention map's excepted) set to ``factor`` x its
    original value."""
    for block, thresholds in zip(engine.blocks, base):
        for name, neuron in block.neurons.items():
            if name != "self_attn.attn_neuron":
                neuron.threshold = (thresholds[name] * factor).astype(np.float32)


def rate_at(engine: PackedEngine, prompt: list[int]) -> tuple[float, dict]:
    record: dict = {}
    engine.forward(prompt, engine.new_cache(len(prompt)), record=record)
    return block_rate(record), record


def calibrate(engine: PackedEngine, base: list[dict], prompt: list[int], target: float, steps: int = 8) -> float:
    """Threshold factor whose blocks' mean firing rate on ``prompt`` is closest to ``target`` (bisection in
    log space: the rate falls as thresholds rise)."""
    lo, hi = np.log(0.1), np.log(10.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        scale_thresholds(engine, base, float(np.exp(mid)))
        if rate_at(engine, prompt)[0] > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2))


def engine_point(engine: PackedEngine, prompt, decode, repeats: int, **label) -> dict:
    rate, record = rate_at(engine, prompt)
    read = engine.weight_bytes(record)
    point = {**label, "firing_rate": round(rate, 4), **speeds(engine_run, engine, prompt, decode, repeats),
             "weight_bytes_per_token": round(read["blocks"] + read["head"])}
    print("  engine", json.dumps(point), flush=True)
    return point


def engine_sweep(config: BiSpikCLMConfig, prompt, decode, targets: dict[str, float], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = quantize_(BiSpikCLMForCausalLM(config).eval(), head=True)
    engine = PackedEngine.from_model(model, int8=True)
    base = [{name: neuron.threshold.copy() for name, neuron in block.neurons.items()} for block in engine.blocks]
    points = [engine_point(engine, prompt, decode, repeats, target="random init (thresholds as configured)",
                           threshold_factor=1.0)]
    for label, target in targets.items():
        factor = calibrate(engine, base, prompt, target)
        scale_thresholds(engine, base, factor)
        points.append(engine_point(engine, prompt, decode, repeats, target=label, target_rate=target,
                                   threshold_factor=round(factor, 4)))
    return points


# ------------------------------------------------------------------------------------------------------ peers
def hf_weight_bytes(model: torch.nn.Module, bytes_per_weight: int) -> int:
    """Bytes of the matrices a dense forward reads per token (every linear layer, the head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * bytes_per_weight


def torch_peers(config: BiSpikCLMConfig, prompt, decode, repeats: int) -> dict[str, dict]:
    from torch.ao.quantization import quantize_dynamic

    def ann():
        torch.manual_seed(0)
        return same_shape_ann(config, attn_implementation="sdpa").eval()

    peers = {}
    model = ann()
    dense_bytes = hf_weight_bytes(model, 4)
    peers["HF float32"] = {**speeds(opt_run, model, prompt, decode, repeats), "weight_bytes_per_token": dense_bytes}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import quantize_ as torchao_quantize_
    except ImportError:
        print("  torchao is not installed (pip install torchao); left out", flush=True)
    else:
        model = ann()
        torchao_quantize_(model, Int8DynamicActivationInt8WeightConfig())
        peers["torchao int8 (dynamic activations)"] = {**speeds(opt_run, model, prompt, decode, repeats),
                                                       "weight_bytes_per_token": dense_bytes // 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_dynamic(ann(), {torch.nn.Linear}, dtype=torch.qint8)
    peers["torch.ao quantize_dynamic int8"] = {**speeds(opt_run, model, prompt, decode, repeats),
                                              "weight_bytes_per_token": dense_bytes // 4}
    for name, value in peers.items():
        print(f"  {name}", json.dumps(value), flush=True)
    return peers


def write_gguf(config: BiSpikCLMConfig, path: Path) -> None:
    """The same-shape ANN's weights as a float32 GGUF: Llama architecture for a gated student, GPT-2's for an OPT
    one (llama.cpp has no OPT; GPT-2 has the same matrices, learned positions and LayerNorms). The vocabulary is
    placeholder pieces: the benchmark feeds token ids."""
    import gguf

    torch.manual_seed(0)
    ann = same_shape_ann(config).eval()
    weights = {k: v.detach().float().numpy() for k, v in ann.state_dict().items()}
    llama = config.ffn_type == "gated"
    writer = gguf.GGUFWriter(str(path), "llama" if llama else "gpt2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, config.vocab_size)])
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_token_types([2, 3, 3] + [1] * (config.vocab_size - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"] if llama
               else weights["model.decoder.embed_tokens.weight"]}
    if llama:
        writer.add_head_count_kv(config.key_value_heads)
        writer.add_rope_dimension_count(config.attention_head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        tensors["output_norm.weight"] = weights["model.norm.weight"]
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                     "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                     "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"}
            tensors.update({f"blk.{i}.{g}.weight": weights[f"{p}{h}.weight"] for g, h in names.items()})
    else:
        writer.add_layer_norm_eps(1e-5)
        tensors["position_embd.weight"] = weights["model.decoder.embed_positions.weight"][2:]   # OPT's offset
        tensors["output_norm.weight"] = weights["model.decoder.final_layer_norm.weight"]
        tensors["output_norm.bias"] = weights["model.decoder.final_layer_norm.bias"]
        for i in range(config.num_hidden_layers):
            p = f"model.decoder.layers.{i}."
            for kind in ("weight", "bias"):
                tensors[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(
                    [weights[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"])
                names = {"attn_norm": "self_attn_layer_norm", "attn_output": "self_attn.out_proj",
                         "ffn_norm": "final_layer_norm", "ffn_up": "fc1", "ffn_down": "fc2"}
                tensors.update({f"blk.{i}.{g}.{kind}": weights[f"{p}{h}.{kind}"] for g, h in names.items()})
    for name, value in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_matrix_bytes(path: Path) -> int:
    """Bytes of the matrices a decode step reads: every 2-D tensor but the position table, the token embedding
    standing for the tied head (one row of it is the lookup)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors
               if len(t.shape) == 2 and t.name != "position_embd.weight")


def llama_cpp_run(llm, prompt: list[int], decode: list[int]) -> tuple[float, list[float]]:
    """Seconds of the prefill of ``prompt`` and of each following decode step (llama.cpp, its own KV cache)."""
    llm.reset()
    prefill = timed(lambda: llm.eval(prompt))
    return prefill, [timed(lambda t=t: llm.eval([t])) for t in decode]


def load_llama_cpp(path: Path, batch: int, threads: int):
    """A ``llama_cpp.Llama`` on ``path`` without llama.cpp's extra CPU buffer types: built natively on this CPU
    (``GGML_NATIVE``), llama.cpp moves Q8_0/Q4_0 weights into its AMX buffer type and crashes at the first decode in
    this virtual machine (measured: segmentation fault); the plain ggml CPU kernels (AVX-512) run. ``Llama`` takes
    no option for it, so its model parameters are made with ``use_extra_bufts = False``."""
    import llama_cpp
    from llama_cpp import llama_cpp as api

    default = api.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(str(path), n_ctx=256, n_batch=batch, n_threads=threads, n_threads_batch=threads,
                               verbose=False)
    finally:
        api.llama_model_default_params = default


def llama_cpp_peers(config: BiSpikCLMConfig, folder: Path, prompt, decode, threads: int, repeats: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        print("  llama.cpp: llama-cpp-python is not installed (pip install -e .[peers]); left out", flush=True)
        return {}

    f32 = folder / "f32.gguf"
    write_gguf(config, f32)
    peers = {}
    for name, ftype in LLAMA_CPP_TYPES.items():
        path = folder / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {f32} to {name}")
        llm = load_llama_cpp(path, len(prompt), threads)
        peers[f"llama.cpp {name}"] = {**speeds(llama_cpp_run, llm, prompt, decode, repeats),
                                      "weight_bytes_per_token": gguf_matrix_bytes(path)}
        print(f"  llama.cpp {name}", json.dumps(peers[f"llama.cpp {name}"]), flush=True)
        del llm
    return peers


# --------------------------------------------------------------------------------------------------- analysis
def crossover(points: list[dict], peer_speed: float, key: str) -> float | str:
    """Firing rate at which the engine's ``key`` speed falls to ``peer_speed`` (linear interpolation between sweep
    points; the highest such rate), or a bound when it is faster (or slower) over the whole sweep."""
    ordered = sorted(points, key=lambda p: p["firing_rate"])
    best = None
    for a, b in zip(ordered, ordered[1:]):
        if a[key] >= peer_speed > b[key]:
            best = a["firing_rate"] + (a[key] - peer_speed) / (a[key] - b[key]) * (b["firing_rate"] - a["firing_rate"])
    if best is not None:
        return round(best, 4)
    if ordered[-1][key] >= peer_speed:
        return f"> {ordered[-1]['firing_rate']:.3f} (faster over the whole sweep)"
    return f"< {ordered[0]['firing_rate']:.3f} (slower over the whole sweep)"


def summary(shape: dict) -> dict:
    peers = shape["peers"]
    int8 = {k: v for k, v in peers.items() if k != "HF float32"}
    fastest = max(int8, key=lambda k: int8[k]["decode_tokens_per_s"])
    sweep = shape["engine"]
    out = {"fastest_int8_peer_decode": fastest, "crossover_rate_decode_vs": {}, "crossover_rate_prefill_vs": {},
           "rate_for_decode_goal_2x_fastest_int8": crossover(sweep, 2 * int8[fastest]["decode_tokens_per_s"],
                                                             "decode_tokens_per_s")}
    for name, peer in peers.items():
        out["crossover_rate_decode_vs"][name] = crossover(sweep, peer["decode_tokens_per_s"], "decode_tokens_per_s")
        out["crossover_rate_prefill_vs"][name] = crossover(sweep, peer["prefill_tokens_per_s"], "prefill_tokens_per_s")
    trained = [p for p in shape["engine"] if p["target"].startswith(("trained", "quickstart"))]
    goals = []
    for p in trained:
        goals.append({"at": p["target"], "firing_rate": p["firing_rate"],
                      "decode_over_fastest_int8_peer": round(p["decode_tokens_per_s"]
                                                             / int8[fastest]["decode_tokens_per_s"], 3),
                      "decode_goal": 2.0,
                      "prefill_over_float32": round(p["prefill_tokens_per_s"]
                                                    / peers["HF float32"]["prefill_tokens_per_s"], 3),
                      "prefill_goal": 1.0})
    out["goals"] = goals
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result["shapes"]
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for col, (name, shape) in enumerate(shapes.items()):
        for row, key in enumerate(("decode_tokens_per_s", "prefill_tokens_per_s")):
            ax = axes[row, col]
            sweep = sorted(shape["engine"], key=lambda p: p["firing_rate"])
            ax.plot([p["firing_rate"] for p in sweep], [p[key] for p in sweep], "o-", color="black",
                    label="packed engine (int8, T=2)")
            for p in sweep:
                if p["target"].startswith(("trained", "quickstart")):
                    ax.plot(p["firing_rate"], p[key], "*", markersize=14, color="red", label=p["target"])
            for i, (peer, value) in enumerate(shape["peers"].items()):
                ax.axhline(value[key], color=f"C{i}", linestyle="--", label=peer)
            ax.set_xlabel("mean firing rate of the blocks' neurons")
            ax.set_ylabel(key.replace("_", " "))
            ax.set_title(f"{name}: {key.split('_')[0]} (batch 1, {result['machine']['threads']} threads)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    """The result as Markdown tables, one per shape (what docs/engine.md shows)."""
    lines = []
    for name, shape in result["shapes"].items():
        lines += [f"**{name}** (batch 1, {result['machine']['threads']} threads)", "",
                  "| model | firing rate | decode tok/s | prefill tok/s | weight MB read / token | decode GB/s "
                  "(share of read bandwidth) |", "|---|---|---|---|---|---|"]
        rows = [(peer, "–", v) for peer, v in shape["peers"].items()]
        rows += [(f"packed engine, int8, T = 2: {p['target']}", f"{p['firing_rate']:.3f}", p)
                 for p in sorted(shape["engine"], key=lambda p: p["firing_rate"])]
        for label, rate, v in rows:
            lines.append(f"| {label} | {rate} | {v['decode_tokens_per_s']:.1f} | {v['prefill_tokens_per_s']:.1f} | "
                         f"{v['weight_bytes_per_token'] / 1e6:.1f} | {v['decode_gb_per_s']:.2f} "
                         f"({100 * v['decode_share_of_bandwidth']:.0f}%) |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def trained_student(run_dir: Path | None) -> BiSpikCLMForCausalLM | None:
    folder = run_dir / "student" / "model" if run_dir else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    return BiSpikCLMForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def main() -> None:
    parser = speed_arguments(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart",
                        help="a quickstart run; its trained student is measured at its real rates when present")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "engine_peers.json")
    args = parser.parse_args()
    start, load, tokens = prepare(args)
    prompt, decode = tokens[:args.prompt], tokens[args.prompt:]
    quickstart = json.loads((REPO / "results" / "quickstart.json").read_text())["student_firing_rates"]["all"]
    targets = {f"rate {r}": r for r in args.rates}
    targets[f"quickstart student's measured rate ({quickstart:.3f}, results/quickstart.json)"] = quickstart
    result = {
        "command": " ".join(["PYTHONPATH=. python benchmarks/engine_peers.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "cores": os.cpu_count(), "load_average_before": [round(x, 2) for x in load],
                    "read_bandwidth_gb_per_s": round(read_bandwidth() / 1e9, 2)},
        "linear_kernel_bandwidth": linear_bandwidth(),
        "setup": {"prompt_tokens": args.prompt, "decode_tokens": args.decode, "batch": 1, "repeats": args.repeats,
                  "engine": "int8 blocks + int8 head, T = 2, random init (seed 0); thresholds scaled to hit each "
                            "firing rate", "text": "WikiText-2 test"},
        "shapes": {},
    }
    print(json.dumps(result["machine"]), json.dumps(result["linear_kernel_bandwidth"]), flush=True)
    student = trained_student(args.run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            config = BiSpikCLMConfig.from_preset(name, time_steps=2)
            print(name, flush=True)
            shape = {"engine": engine_sweep(config, prompt, decode, targets, args.repeats),
                     "peers": {**torch_peers(config, prompt, decode, args.repeats),
                               **llama_cpp_peers(config, Path(tmp), prompt, decode, args.threads, args.repeats)}}
            shape["summary"] = summary(shape)
            result["shapes"][name] = shape
        if student is not None:
            print("trained student", flush=True)
            config = student.config
            engine = PackedEngine.from_model(quantize_(student, head=True), int8=True)
            shape = {"engine": [engine_point(engine, prompt, decode, args.repeats,
                                             target=f"trained student ({args.run_dir})")],
                     "peers": {**torch_peers(config, prompt, decode, args.repeats),
                               **(llama_cpp_peers(config, Path(tmp), prompt, decode, args.threads, args.repeats)
                                  if config.ffn_type == "gated" or config.key_value_heads == config.num_attention_heads
                                  else {})}}
            shape["summary"] = summary(shape)
            result["shapes"]["trained student"] = shape
    bandwidth = result["machine"]["read_bandwidth_gb_per_s"] * 1e9
    for shape in result["shapes"].values():
        for point in shape["engine"] + list(shape["peers"].values()):
            point["decode_gb_per_s"] = round(point["weight_bytes_per_token"] * point["decode_tokens_per_s"] / 1e9, 2)
            point["decode_share_of_bandwidth"] = round(point["decode_gb_per_s"] * 1e9 / bandwidth, 3)
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v["summary"] for k, v in result["shapes"].items()}, indent=1))
    print(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['runtime_s']} s")


if __name__ == "__main__":
    main()
