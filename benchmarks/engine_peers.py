"""The packed engine against the peers a user would pick on a CPU: every contender in a process of its own.

Contenders, batch 1, ``--threads`` threads (torch, Numba and llama.cpp): our engine (int8 blocks and int8 head,
T = 2; 4-bit blocks and head too when :func:`bispikclm.engine.quantize_` takes ``bits=4``) and, for the ANN of
the same shape (:func:`bispikclm.ann.same_shape_ann`: OPT, or Llama for a gated student), Hugging Face float32,
PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic``), torchao int8 when installed, and llama.cpp
(``llama-cpp-python``) at Q8_0 and Q4_0 on a GGUF of the same weights written with the ``gguf`` package and
quantized by llama.cpp itself (llama.cpp has no OPT: an OPT runs as its GPT-2 architecture, the same matrices,
learned positions and LayerNorms, with GELU for ReLU), with its own CPU buffer types (repacked Q4_0/Q8_0) unless
the build has AMX, which crashes in this virtual machine (:func:`llama_cpp_buffers`; recorded in the json).

Shapes: the trained quickstart student (``--run-dir``, its own thresholds) and its trained ANN; the
``opt-125m`` and ``smollm2-135m`` shapes with random weights (seed 0), the engine at a sweep of firing rates
(every threshold but the attention map's scaled until the blocks' mean firing rate hits each target) and at the
quickstart student's measured rate (``results/quickstart.json``).

How it measures (why: a peer run after torch and Numba in the same process ran at half its speed):

* every measurement is a fresh process (this script with ``--worker measure``) that builds one contender,
  warms it up and times it: prefill tokens/s (a 64-token WikiText-2 prompt, best of ``--repeats``), decode
  tokens/s (the median step over ``--repeats`` x 24 tokens fed one at a time with the cache);
* the contenders alternate over ``--rounds`` rounds (the order rotates each round); each row reports the median
  over the rounds and the min-max spread;
* the machine's read bandwidth (a Numba sum over 256 MB at the same threads) is measured in a process of its
  own at the start of each round; each row's decode GB/s is its weight bytes read per token (the engine: the
  rows of the inputs that fired, from its firing on the prompt; llama.cpp: the GGUF matrices' bytes; PyTorch:
  every linear layer's weights) times its decode tokens/s, and is reported as a share of that bandwidth;
* the engine's fused linear kernel on its own (bytes of weight rows per second over 24 distinct int8 matrices of
  each OPT-125m layer shape, ``linear_kernel_bandwidth``) once after the rounds, in a process of its own;
* the load average is recorded before and after (after a ``--settle`` pause, so that this run's own load has
  mostly decayed); above 1.5 the results are not written (one-line error, exit 1) unless ``--force``, which
  writes them marked ``"forced": true``;
* harness check: llama.cpp Q4_0 of each shape also runs once before any other contender; its in-harness median
  must be within 10% of that figure (``harness_check`` in the json; a flag is printed when it is not).

Perplexity and energy per token (quickstart shape; ``--worker quality``): perplexity on ``--ppl-windows``
windows of 128 tokens of WikiText-2 test (the quickstart's tokenizer) of the student quantized as the engine
runs it (its spikes are the engine's, as the default suite checks), of the ANN in float32, in PyTorch dynamic
int8, and with the weights llama.cpp's quantizer wrote into the Q8_0 / Q4_0 GGUF (dequantized by the ``gguf``
package into the PyTorch OPT, since llama.cpp has no ReLU model with learned positions; llama.cpp's 8-bit
activations are not modelled); energy per token by :func:`bispikclm.energy.energy_per_token` on the operations
:func:`bispikclm.energy.count_operations` counts, at each row's arithmetic and bytes per weight.

    pip install -e .[peers]      # llama-cpp-python (built from source) and gguf
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/engine_peers.py   # results/engine_peers.json, .png,
                                                                             # results/engine_trade.png
    PYTHONPATH=. python benchmarks/engine_peers.py --plot      # only the plots and tables, from the json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP pools must sleep (see benchmarks/engine.py)

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402

from engine import engine_run, opt_run, speed_arguments, wikitext_tokens  # noqa: E402  (benchmarks/engine.py)

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM  # noqa: E402
from bispikclm.ann import same_shape_ann  # noqa: E402
from bispikclm.engine import PackedEngine, quantize_  # noqa: E402
from bispikclm.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("opt-125m", "smollm2-135m")
QUICKSTART = "quickstart student"
RATES = (0.05, 0.1, 0.2, 0.3)
LLAMA_CPP_TYPES = {"Q8_0": 7, "Q4_0": 2}       # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0
LOAD_LIMIT = 1.5
HARNESS_TOLERANCE = 0.10
HARNESS_PEER = "llama.cpp Q4_0"
PPL_CONTEXT = 128
MARK = "RESULT "                               # a worker's last output line: MARK + its JSON


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
    from bispikclm.engine import kernels, pack

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
def four_bit_support() -> str | None:
    """``None`` when the engine runs 4-bit weights (``quantize_`` takes ``bits`` and an engine builds on a tiny
    model quantized with ``bits=4``), else the reason it does not."""
    if "bits" not in inspect.signature(quantize_).parameters:
        return "bispikclm.engine.quantize_ takes no bits= keyword (no 4-bit engine in this version)"
    torch.manual_seed(0)
    try:
        build_engine(BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset("tiny", time_steps=2)).eval(), 4)
    except (UserError, TypeError, ValueError) as err:
        return f"the engine does not build on 4-bit weights: {str(err).splitlines()[0]}"
    return None


def build_engine(model: BiSpikCLMForCausalLM, bits: int) -> PackedEngine:
    """``model`` quantized in place (blocks and head) to ``bits`` and its packed engine on integer weights."""
    quantize_(model, head=True, **({"bits": bits} if bits != 8 else {}))
    keywords = inspect.signature(PackedEngine.from_model).parameters
    return PackedEngine.from_model(model, int8=True, **({"bits": bits} if "bits" in keywords and bits != 8 else {}))


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


def base_thresholds(engine: PackedEngine) -> list[dict]:
    return [{name: neuron.threshold.copy() for name, neuron in block.neurons.items()} for block in engine.blocks]


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


def student_model(shape: dict) -> BiSpikCLMForCausalLM:
    """The shape's student: the trained one from its folder, or a random init (seed 0) of its preset at T = 2."""
    if shape.get("student"):
        return BiSpikCLMForCausalLM.from_pretrained(shape["student"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    return BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset(shape["preset"], time_steps=2)).eval()


def ann_model(shape: dict, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The shape's ANN: the trained one from its folder, or :func:`same_shape_ann` of the student (seed 0)."""
    if shape.get("ann"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(shape["ann"], dtype=torch.float32,
                                                    attn_implementation=attn_implementation).eval()
    torch.manual_seed(0)
    config = BiSpikCLMConfig.from_preset(shape["preset"], time_steps=2) if shape.get("preset") else \
        BiSpikCLMConfig.from_pretrained(shape["student"])
    return same_shape_ann(config, attn_implementation=attn_implementation).eval()


# ------------------------------------------------------------------------------------------------------ peers
def hf_weight_bytes(model: torch.nn.Module, bytes_per_weight: int) -> int:
    """Bytes of the matrices a dense forward reads per token (every linear layer, the head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * bytes_per_weight


def gguf_tensor_map(config) -> dict[str, list[str]]:
    """GGUF tensor name -> the same-shape ANN's state-dict keys it holds (concatenated along the rows): Llama's
    architecture for a gated student, GPT-2's for an OPT one. ``position_embd.weight`` holds OPT's position
    table without its first two rows (OPT's offset)."""
    if config.ffn_type == "gated":
        names = {"token_embd.weight": ["model.embed_tokens.weight"], "output_norm.weight": ["model.norm.weight"]}
        parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        for i in range(config.num_hidden_layers):
            names.update({f"blk.{i}.{g}.weight": [f"model.layers.{i}.{h}.weight"] for g, h in parts.items()})
        return names
    names = {"token_embd.weight": ["model.decoder.embed_tokens.weight"],
             "position_embd.weight": ["model.decoder.embed_positions.weight"],
             "output_norm.weight": ["model.decoder.final_layer_norm.weight"],
             "output_norm.bias": ["model.decoder.final_layer_norm.bias"]}
    parts = {"attn_norm": "self_attn_layer_norm", "attn_output": "self_attn.out_proj", "ffn_norm": "final_layer_norm",
             "ffn_up": "fc1", "ffn_down": "fc2"}
    for i in range(config.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        for kind in ("weight", "bias"):
            names[f"blk.{i}.attn_qkv.{kind}"] = [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"]
            names.update({f"blk.{i}.{g}.{kind}": [f"{p}{h}.{kind}"] for g, h in parts.items()})
    return names


def write_gguf(ann: torch.nn.Module, config: BiSpikCLMConfig, path: Path) -> None:
    """``ann``'s weights (the ANN of ``config``'s shape) as a float32 GGUF in the layout of
    :func:`gguf_tensor_map`. The vocabulary is placeholder pieces: the benchmark feeds token ids."""
    import gguf

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
    if llama:
        writer.add_head_count_kv(config.key_value_heads)
        writer.add_rope_dimension_count(config.attention_head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
    else:
        writer.add_layer_norm_eps(1e-5)
    for name, keys in gguf_tensor_map(config).items():
        value = np.concatenate([weights[k] for k in keys])
        if name == "position_embd.weight":
            value = value[2:]
        writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_matrices(path: Path) -> tuple[int, int]:
    """Bytes and elements of the matrices a decode step reads: every 2-D tensor but the position table, the token
    embedding standing for the tied head (one row of it is the lookup)."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2 and t.name != "position_embd.weight"]
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


def dequantized_ann(shape: dict, path: Path) -> torch.nn.Module:
    """The shape's ANN with every tensor replaced by what ``path`` (a GGUF of :func:`write_gguf`, quantized by
    llama.cpp) holds, dequantized by the ``gguf`` package: the weights llama.cpp computes with, in PyTorch."""
    import gguf
    from gguf.quants import dequantize

    ann = ann_model(shape, attn_implementation="eager")
    state = ann.state_dict()
    mapping = gguf_tensor_map(ann_config(shape))
    for tensor in gguf.GGUFReader(str(path)).tensors:
        value = torch.from_numpy(np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).copy())
        keys = mapping[tensor.name]
        if tensor.name == "position_embd.weight":
            value = torch.cat([state[keys[0]][:2], value.reshape(-1, state[keys[0]].shape[1])])
        rows = [state[k].shape[0] for k in keys]
        for key, part in zip(keys, value.reshape(sum(rows), *state[keys[0]].shape[1:]).split(rows)):
            state[key] = part.reshape(state[key].shape)
    if getattr(ann.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        state["lm_head.weight"] = state[mapping["token_embd.weight"][0]]     # one tensor: loaded last, it wins
    ann.load_state_dict(state)
    return ann.eval()


def ann_config(shape: dict) -> BiSpikCLMConfig:
    if shape.get("student"):
        return BiSpikCLMConfig.from_pretrained(shape["student"])
    return BiSpikCLMConfig.from_preset(shape["preset"], time_steps=2)


def quantize_gguf(f32: Path, out: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f32} to {out.stem}")


def llama_cpp_run(llm, prompt: list[int], decode: list[int]) -> tuple[float, list[float]]:
    """Seconds of the prefill of ``prompt`` and of each following decode step (llama.cpp, its own KV cache)."""
    llm.reset()
    prefill = timed(lambda: llm.eval(prompt))
    return prefill, [timed(lambda t=t: llm.eval([t])) for t in decode]


def llama_cpp_system() -> str:
    """llama.cpp's own line of the CPU features it was built for (``AMX_INT8 = 1``, ``REPACK = 1``, ...)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def llama_cpp_buffers() -> str:
    """``default``: llama.cpp's own CPU buffer types (the repacked Q4_0/Q8_0 layouts its fastest CPU kernels read);
    ``plain``: without them, for a build with AMX: there llama.cpp moves Q8_0/Q4_0 weights into its AMX buffer type,
    which crashes at the first decode in this virtual machine (measured: segmentation fault), and the only way to
    leave AMX out at run time also leaves out the repacking. Build without AMX for the default buffers
    (``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ... -DGGML_AMX_INT8=OFF"``, docs/engine.md)."""
    return "plain" if "AMX_INT8 = 1" in llama_cpp_system() else "default"


def llama_cpp_peer() -> dict | None:
    """What the llama.cpp rows ran on: version, build features and buffer types (None without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return {"version": llama_cpp.__version__, "system_info": llama_cpp_system(), "buffers": llama_cpp_buffers()}


def load_llama_cpp(path: Path, batch: int, threads: int):
    """A ``llama_cpp.Llama`` on ``path`` with the buffers of :func:`llama_cpp_buffers` (``Llama`` takes no option
    for them, so for ``plain`` its model parameters are made with ``use_extra_bufts = False``)."""
    import llama_cpp
    from llama_cpp import llama_cpp as api

    def load():
        return llama_cpp.Llama(str(path), n_ctx=256, n_batch=batch, n_threads=threads, n_threads_batch=threads,
                               verbose=False)

    if llama_cpp_buffers() == "default":
        return load()
    default = api.llama_model_default_params

    def plain_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = plain_buffers
    try:
        return load()
    finally:
        api.llama_model_default_params = default


# ---------------------------------------------------------------------------------------------------- workers
def worker_prepare(job: dict, name: str) -> dict:
    """The contenders of one shape: the engine's threshold factors (calibrated here once, for every width of
    weights), the GGUF files (written and quantized here) and what each measurement needs."""
    shape, threads = job["shapes"][name], job["threads"]
    prompt = shape["prompt"]
    contenders: dict[str, dict] = {}
    for bits in job["engine_bits"]:
        engine = build_engine(student_model(shape), bits)
        width = "int8" if bits == 8 else f"{bits}-bit"
        if shape.get("student"):
            contenders[f"engine {width}, T = 2, trained thresholds"] = {
                "kind": "engine", "bits": bits, "threshold_factor": 1.0, "target": "trained student"}
            continue
        base = base_thresholds(engine)
        targets = dict(job["targets"]) if bits == 8 else {k: v for k, v in job["targets"].items()
                                                            if k.startswith("quickstart")}
        for label, target in targets.items():
            factor = calibrate(engine, base, prompt, target)
            contenders[f"engine {width}, T = 2, {label}"] = {"kind": "engine", "bits": bits, "target": label,
                                                              "target_rate": target,
                                                              "threshold_factor": round(factor, 4)}
    contenders["HF float32"] = {"kind": "hf"}
    contenders["PyTorch dynamic int8"] = {"kind": "torch_dynamic"}
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("  torchao is not installed (pip install torchao); its row is left out", flush=True)
    else:
        contenders["torchao int8 (dynamic activations)"] = {"kind": "torchao"}
    config = ann_config(shape)
    if config.ffn_type != "gated" and config.key_value_heads != config.num_attention_heads:
        print("  llama.cpp: GPT-2's architecture has no grouped-query attention; left out", flush=True)
        return contenders
    try:
        import llama_cpp  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        print("  llama.cpp: llama-cpp-python or gguf is not installed (pip install -e .[peers]); left out", flush=True)
        return contenders
    folder = Path(job["work"]) / name.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "f32.gguf"
    write_gguf(ann_model(shape), config, f32)
    for kind, ftype in LLAMA_CPP_TYPES.items():
        path = folder / f"{kind}.gguf"
        quantize_gguf(f32, path, ftype, threads)
        size, elements = gguf_matrices(path)
        contenders[f"llama.cpp {kind}"] = {"kind": "llama_cpp", "path": str(path), "weight_bytes_per_token": size,
                                           "bytes_per_weight": size / elements}
    return contenders


def worker_measure(job: dict, name: str, contender: str) -> dict:
    """Build one contender in this fresh process, warm it up, time it."""
    shape, spec, repeats = job["shapes"][name], job["shapes"][name]["contenders"][contender], job["repeats"]
    prompt, decode = shape["prompt"], shape["decode"]
    kind = spec["kind"]
    if kind == "engine":
        engine = build_engine(student_model(shape), spec["bits"])
        scale_thresholds(engine, base_thresholds(engine), spec["threshold_factor"])
        rate, record = rate_at(engine, prompt)
        read = engine.weight_bytes(record)
        return {"firing_rate": round(rate, 4), **speeds(engine_run, engine, prompt, decode, repeats),
                "weight_bytes_per_token": round(read["blocks"] + read["head"])}
    if kind == "llama_cpp":
        llm = load_llama_cpp(Path(spec["path"]), len(prompt), job["threads"])
        return {**speeds(llama_cpp_run, llm, prompt, decode, repeats),
                "weight_bytes_per_token": spec["weight_bytes_per_token"]}
    model = ann_model(shape)
    dense = hf_weight_bytes(model, 4)
    if kind == "torch_dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        dense //= 4
    elif kind == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from torchao.quantization import quantize_ as torchao_quantize_

        torchao_quantize_(model, Int8DynamicActivationInt8WeightConfig())
        dense //= 4
    return {**speeds(opt_run, model, prompt, decode, repeats), "weight_bytes_per_token": dense}


def worker_quality(job: dict) -> dict:
    """Perplexity on a few WikiText-2 test windows and energy per token of each row of the quickstart shape."""
    from torch.ao.quantization import quantize_dynamic
    from transformers import PreTrainedTokenizerFast

    from bispikclm.data import encode, load_texts
    from bispikclm.energy import count_operations, energy_per_token
    from bispikclm.evaluation.perplexity import perplexity

    shape = job["shapes"][QUICKSTART]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(shape["tokenizer"])
    test = encode(load_texts(str(Path(job["data"]) / "wikitext-2"), "test"), tokenizer)
    test = test[:job["ppl_windows"] * PPL_CONTEXT]
    counted = test[None, :PPL_CONTEXT]
    rows: dict[str, dict] = {}

    def score(row: str, model, precision: str, bytes_per_weight: float, count=None) -> None:
        count = count or count_operations(model, counted)
        result = perplexity(model, test, PPL_CONTEXT, batch_size=8, progress=False)
        rows[row] = {"perplexity": round(result.perplexity, 3), "tokens": result.tokens,
                     "energy_precision": precision, "energy_bytes_per_weight": round(bytes_per_weight, 4),
                     "energy_mj_per_token": {c: energy_per_token(count, precision, c, bytes_per_weight=bytes_per_weight)
                                             for c in ("arithmetic", "sram", "dram")}}
        print(f"  {row}: perplexity {rows[row]['perplexity']}", flush=True)

    contenders = shape["contenders"]
    for row, spec in contenders.items():
        if spec["kind"] == "engine":       # the PyTorch model quantized as the engine runs it: the same spikes
            model = student_model(shape)
            quantize_(model, head=True, **({"bits": spec["bits"]} if spec["bits"] != 8 else {}))
            score(row, model, "int8", spec["bits"] / 8)
    ann = ann_model(shape, attn_implementation="eager")
    ann_count = count_operations(ann, counted)
    score("HF float32", ann, "float32", 4, ann_count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score("PyTorch dynamic int8", quantize_dynamic(ann_model(shape, "eager"), {torch.nn.Linear},
                                                       dtype=torch.qint8), "int8", 1, ann_count)
    for row, spec in contenders.items():
        if spec["kind"] == "llama_cpp":
            score(row, dequantized_ann(shape, Path(spec["path"])), "int8", spec["bytes_per_weight"], ann_count)
    return rows


def worker(args) -> None:
    job = json.loads(args.job.read_text())
    torch.set_num_threads(job["threads"])
    import numba
    numba.set_num_threads(job["threads"])
    if args.worker == "bandwidth":
        out = {"read_bandwidth_gb_per_s": round(read_bandwidth() / 1e9, 2)}
    elif args.worker == "kernel":
        out = {"rows": linear_bandwidth()}
    elif args.worker == "prepare":
        out = worker_prepare(job, args.shape)
    elif args.worker == "measure":
        out = worker_measure(job, args.shape, args.contender)
    else:
        out = worker_quality(job)
    print(MARK + json.dumps(out), flush=True)


def run_worker(job_path: Path, kind: str, shape: str | None = None, contender: str | None = None) -> dict:
    """Run this script as a worker in a fresh process; its result (the JSON of its last line)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--job", str(job_path)]
    command += ["--shape", shape] if shape else []
    command += ["--contender", contender] if contender else []
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    for line in lines:
        if not line.startswith(MARK):
            print("   ", line, flush=True)
    if done.returncode != 0 or not lines or not lines[-1].startswith(MARK):
        raise RuntimeError(f"worker {kind} {shape or ''} {contender or ''} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


# --------------------------------------------------------------------------------------------------- analysis
def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": values}


def aggregate(runs: list[dict], spec: dict) -> dict:
    """One row from the measurements of its rounds: median and min-max of each speed."""
    row = {k: v for k, v in spec.items() if k not in ("kind", "path")}
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
        stats = spread([r[key] for r in runs])
        row[key], row[f"{key}_range"] = stats["median"], [stats["min"], stats["max"]]
        row[f"{key}_rounds"] = stats["runs"]
    row["weight_bytes_per_token"] = int(statistics.median([r["weight_bytes_per_token"] for r in runs]))
    if "firing_rate" in runs[0]:
        row["firing_rate"] = runs[0]["firing_rate"]
    return row


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
    peers, engine = shape["peers"], shape["engine"]
    fastest = max(peers, key=lambda k: peers[k]["decode_tokens_per_s"])
    sweep = [p for p in engine if p["bits"] == 8]
    out = {"fastest_peer_decode": fastest, "crossover_rate_decode_vs": {}, "crossover_rate_prefill_vs": {},
           "rate_for_decode_goal_2x_fastest_peer": crossover(sweep, 2 * peers[fastest]["decode_tokens_per_s"],
                                                             "decode_tokens_per_s")}
    for name, peer in peers.items():
        out["crossover_rate_decode_vs"][name] = crossover(sweep, peer["decode_tokens_per_s"], "decode_tokens_per_s")
        out["crossover_rate_prefill_vs"][name] = crossover(sweep, peer["prefill_tokens_per_s"], "prefill_tokens_per_s")
    fastest_prefill = max(peers[k]["prefill_tokens_per_s"] for k in peers)
    out["goals"] = [{"at": p["name"], "firing_rate": p["firing_rate"],
                     "decode_over_fastest_peer": round(p["decode_tokens_per_s"]
                                                       / peers[fastest]["decode_tokens_per_s"], 3),
                     "decode_goal": 2.0,
                     "prefill_over_fastest_peer": round(p["prefill_tokens_per_s"] / fastest_prefill, 3),
                     "prefill_goal": 1.0, "decode_share_of_bandwidth": p["decode_share_of_bandwidth"],
                     "bandwidth_goal": 0.5}
                    for p in engine if p["target"].startswith(("trained", "quickstart"))]
    return out


def plot(result: dict, path: Path) -> None:
    """Decode and prefill tokens/s of the engine against the firing rate, each peer a band (its min-max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result["shapes"]
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 8), squeeze=False)
    for col, (name, shape) in enumerate(shapes.items()):
        for row, key in enumerate(("decode_tokens_per_s", "prefill_tokens_per_s")):
            ax = axes[row, col]
            for bits, style in ((8, "o-"), (4, "s--")):
                sweep = sorted((p for p in shape["engine"] if p["bits"] == bits), key=lambda p: p["firing_rate"])
                if sweep:
                    ax.errorbar([p["firing_rate"] for p in sweep], [p[key] for p in sweep],
                                yerr=np.abs(np.array([p[f"{key}_range"] for p in sweep]).T
                                            - [p[key] for p in sweep]), fmt=style,
                                color="black" if bits == 8 else "red",
                                capsize=3, label=f"packed engine ({'int8' if bits == 8 else '4-bit'}, T=2)")
            for i, (peer, value) in enumerate(shape["peers"].items()):
                ax.axhline(value[key], color=f"C{i}", linestyle="--", label=peer)
                ax.axhspan(*value[f"{key}_range"], color=f"C{i}", alpha=0.12)
            ax.set_xlabel("mean firing rate of the blocks' neurons")
            ax.set_ylabel(key.replace("_", " ") + " (median, min-max)")
            ax.set_title(f"{name}: {key.split('_')[0]} (batch 1, {result['machine']['threads']} threads)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trade_rows(result: dict) -> list[dict]:
    """Rows of the quickstart shape with a perplexity: name, perplexity, decode tok/s (median, range), energy."""
    shape = result["shapes"].get(QUICKSTART)
    if not shape or not shape.get("quality"):
        return []
    speed = {p["name"]: p for p in shape["engine"]} | shape["peers"]
    return [{"name": name, **quality, "decode_tokens_per_s": speed[name]["decode_tokens_per_s"],
             "decode_tokens_per_s_range": speed[name]["decode_tokens_per_s_range"]}
            for name, quality in shape["quality"].items() if name in speed]


def plot_trade(result: dict, path: Path) -> bool:
    """Perplexity against decode tokens/s and against energy per token (SRAM and DRAM conventions) of the
    quickstart student's engine rows and its ANN's rows. False when the result holds no quickstart shape."""
    rows = trade_rows(result)
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("decode_tokens_per_s", "decode tokens/s (batch 1, median, min-max)"),
              ("sram", "energy per token, mJ (arithmetic + bytes read at SRAM)"),
              ("dram", "energy per token, mJ (arithmetic + bytes read at DRAM)")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for ax, (key, label) in zip(axes, panels):
        for i, row in enumerate(rows):
            spiking = row["name"].startswith("engine")
            x = row[key] if key == "decode_tokens_per_s" else row["energy_mj_per_token"][key]
            xerr = (np.abs(np.array(row["decode_tokens_per_s_range"]) - x)[:, None]
                    if key == "decode_tokens_per_s" else None)
            ax.errorbar([x], [row["perplexity"]], xerr=xerr, fmt="*" if spiking else "o",
                        markersize=13 if spiking else 8, color=f"C{i}", capsize=3, label=row["name"])
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"WikiText-2 test perplexity ({rows[0]['tokens']} tokens)")
        ax.grid(alpha=0.3)
    axes[0].set_title("quickstart student (stars) and its same-shape ANN: speed")
    axes[1].set_title("energy per token (45 nm tables, bispikclm.energy)")
    axes[2].set_title("energy per token, weights from DRAM")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(result: dict) -> str:
    """The result as Markdown tables, one per shape, and the trade table of the quickstart shape."""
    lines = []
    if result.get("forced"):
        lines += [f"**Forced run: load average {result['machine']['load_average_before']} before, "
                  f"{result['machine']['load_average_after']} after (limit {LOAD_LIMIT}); not trustworthy.**", ""]
    band = result["machine"]["read_bandwidth_gb_per_s"]
    for name, shape in result["shapes"].items():
        lines += [f"**{name}** (batch 1, {result['machine']['threads']} threads, {result['setup']['rounds']} rounds, "
                  f"read bandwidth {band:.1f} GB/s)", "",
                  "| model | firing rate | decode tok/s, median (min-max) | prefill tok/s, median (min-max) | "
                  "weight MB read / token | decode GB/s (share of read bandwidth) |", "|---|---|---|---|---|---|"]
        rows = [(peer, "–", v) for peer, v in shape["peers"].items()]
        engine = sorted(shape["engine"], key=lambda p: (p["bits"], p["firing_rate"]))
        rows += [(p["name"], f"{p['firing_rate']:.3f}", p) for p in engine]
        for label, rate, v in rows:
            d, pf = v["decode_tokens_per_s_range"], v["prefill_tokens_per_s_range"]
            lines.append(f"| {label} | {rate} | {v['decode_tokens_per_s']:.1f} ({d[0]:.1f}-{d[1]:.1f}) | "
                         f"{v['prefill_tokens_per_s']:.1f} ({pf[0]:.1f}-{pf[1]:.1f}) | "
                         f"{v['weight_bytes_per_token'] / 1e6:.2f} | {v['decode_gb_per_s']:.2f} "
                         f"({100 * v['decode_share_of_bandwidth']:.0f}%) |")
        check = shape.get("harness_check")
        if check:
            lines.append(f"\nHarness check ({HARNESS_PEER}): alone {check['alone_decode_tokens_per_s']:.1f} tok/s, "
                         f"in the harness {check['in_harness_median_decode_tokens_per_s']:.1f} "
                         f"({100 * check['in_harness_over_alone'] - 100:+.0f}%): "
                         f"{'within' if check['within_tolerance'] else 'NOT within'} {100 * HARNESS_TOLERANCE:.0f}%.")
        lines.append("")
    rows = trade_rows(result)
    if rows:
        lines += [f"**The trade** ({QUICKSTART} and its ANN; perplexity on {rows[0]['tokens']} WikiText-2 test "
                  "tokens)", "",
                  "| model | perplexity | decode tok/s | energy mJ/token (SRAM) | energy mJ/token (DRAM) |",
                  "|---|---|---|---|---|"]
        for row in rows:
            e = row["energy_mj_per_token"]
            lines.append(f"| {row['name']} | {row['perplexity']:.2f} | {row['decode_tokens_per_s']:.1f} | "
                         f"{e['sram']:.2e} | {e['dram']:.2e} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def load_average(label: str, force: bool) -> list[float]:
    load = [round(x, 2) for x in os.getloadavg()]
    if max(load[0], 0) > LOAD_LIMIT and not force:
        sys.exit(f"error: load average {load[0]} {label} the run is above {LOAD_LIMIT}: the timings would not be "
                 f"trustworthy; run on an idle machine or pass --force (the results are then marked forced)")
    return load


def shapes_to_run(args, targets: dict) -> dict[str, dict]:
    """Every shape with its student, ANN and tokens (the trained quickstart student's own text when present)."""
    tokens = wikitext_tokens(args.data, args.prompt + args.decode)
    shapes = {name: {"preset": name, "prompt": tokens[:args.prompt], "decode": tokens[args.prompt:]}
              for name in args.shapes}
    student = args.run_dir / "student" / "model"
    if args.run_dir and (student / "config.json").is_file():
        from transformers import PreTrainedTokenizerFast

        from bispikclm.data import encode, load_texts
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.run_dir / "tokenizer"))
        ids = encode(load_texts(str(args.data / "wikitext-2"), "test")[:400], tokenizer).tolist()
        ann = args.run_dir / "ann_student" / "model"
        shapes[QUICKSTART] = {"student": str(student), "ann": str(ann) if (ann / "config.json").is_file() else None,
                              "tokenizer": str(args.run_dir / "tokenizer"),
                              "prompt": ids[:args.prompt], "decode": ids[args.prompt:args.prompt + args.decode]}
    elif args.run_dir:
        print(f"no trained student in {args.run_dir} (make quickstart first); its shape is left out", flush=True)
    return shapes


def main() -> None:
    parser = speed_arguments(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="random-weight shapes (presets)")
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all contenders (each a fresh process)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "quickstart",
                        help="a quickstart run: its trained student and ANN are measured when present")
    parser.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 test windows of 128 tokens")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait before the load average after the run")
    parser.add_argument("--force", action="store_true", help="write results taken above the load limit, marked")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "engine_peers.json")
    parser.add_argument("--plot", action="store_true", help="only redraw the plots and print the tables from --out")
    parser.add_argument("--worker", choices=("bandwidth", "kernel", "prepare", "measure", "quality"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    trade_path = args.out.with_name("engine_trade.png")
    if args.plot:
        if not args.out.is_file():
            sys.exit(f"error: {args.out} does not exist; run the benchmark first")
        result = json.loads(args.out.read_text())
        if "rounds" not in result.get("setup", {}):
            sys.exit(f"error: {args.out} was written by the single-process version of this benchmark (no medians "
                     f"over rounds); run the benchmark to replace it")
        plot(result, args.out.with_suffix(".png"))
        drew = plot_trade(result, trade_path)
        print(markdown(result))
        print(f"wrote {args.out.with_suffix('.png')}" + (f" and {trade_path}" if drew else
                                                          f" ({args.out} holds no perplexity: no trade plot)"))
        return
    if args.rounds < 1 or args.repeats < 1 or args.prompt < 8 or args.decode < 2:
        sys.exit("error: --rounds and --repeats must be >= 1, --prompt >= 8 and --decode >= 2")
    load_before = load_average("before", args.force)
    start = time.time()
    quickstart = json.loads((REPO / "results" / "quickstart.json").read_text())["student_firing_rates"]["all"]
    targets = {f"rate {r}": r for r in args.rates}
    targets[f"quickstart student's measured rate ({quickstart:.3f}, results/quickstart.json)"] = quickstart
    missing_4bit = four_bit_support()
    if missing_4bit:
        print(f"note: no 4-bit engine rows: {missing_4bit}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        job = {"threads": args.threads, "repeats": args.repeats, "data": str(args.data), "work": work,
               "ppl_windows": args.ppl_windows, "targets": targets,
               "engine_bits": [8] if missing_4bit else [8, 4], "shapes": shapes_to_run(args, targets)}
        job_path = Path(work) / "job.json"
        job_path.write_text(json.dumps(job))
        for name in job["shapes"]:
            print(f"preparing {name}", flush=True)
            job["shapes"][name]["contenders"] = run_worker(job_path, "prepare", name)
            job_path.write_text(json.dumps(job))
        alone = {}
        for name, shape in job["shapes"].items():      # before any other contender has run
            if HARNESS_PEER in shape["contenders"]:
                alone[name] = run_worker(job_path, "measure", name, HARNESS_PEER)
                print(f"{name}: {HARNESS_PEER} alone {json.dumps(alone[name])}", flush=True)
        bandwidths, runs = [], {name: {c: [] for c in s["contenders"]} for name, s in job["shapes"].items()}
        for round_ in range(args.rounds):
            bandwidths.append(run_worker(job_path, "bandwidth")["read_bandwidth_gb_per_s"])
            print(f"round {round_ + 1}/{args.rounds}: read bandwidth {bandwidths[-1]} GB/s", flush=True)
            for name, shape in job["shapes"].items():
                order = list(shape["contenders"])
                shift = round_ % len(order)
                for contender in order[shift:] + order[:shift]:
                    runs[name][contender].append(run_worker(job_path, "measure", name, contender))
                    print(f"  {name} | {contender}: {json.dumps(runs[name][contender][-1])}", flush=True)
        try:          # a diagnostic of the engine's linear kernel on its own, after the timed rounds
            kernel = run_worker(job_path, "kernel")["rows"]
        except RuntimeError as err:
            kernel = f"not measured: {str(err).splitlines()[0]}"
            print(f"note: linear kernel bandwidth {kernel}", flush=True)
        quality = run_worker(job_path, "quality") if QUICKSTART in job["shapes"] else {}
        if args.settle > 0:
            print(f"waiting {args.settle:.0f} s for the load average to settle", flush=True)
            time.sleep(args.settle)
        load_after = [round(x, 2) for x in os.getloadavg()]
    band = spread(bandwidths)
    result = {
        "command": " ".join(["OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/engine_peers.py", *sys.argv[1:]]),
        "forced": max(load_before[0], load_after[0]) > LOAD_LIMIT,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "cores": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after,
                    "load_limit": LOAD_LIMIT, "read_bandwidth_gb_per_s": band["median"],
                    "read_bandwidth_gb_per_s_range": [band["min"], band["max"]],
                    "read_bandwidth_gb_per_s_rounds": band["runs"]},
        "linear_kernel_bandwidth": kernel,
        "setup": {"prompt_tokens": args.prompt, "decode_tokens": args.decode, "batch": 1, "repeats": args.repeats,
                  "rounds": args.rounds, "process": "every measurement in a fresh process; contenders alternated, "
                  "the order rotated each round; medians and min-max over the rounds",
                  "engine": "T = 2; int8 blocks + int8 head" + ("" if missing_4bit else ", and 4-bit blocks + head")
                            + "; random shapes: random init (seed 0), thresholds scaled to hit each firing rate",
                  "four_bit": missing_4bit or "measured", "text": "WikiText-2 test",
                  "llama_cpp": llama_cpp_peer(),
                  "perplexity": f"{args.ppl_windows} windows of {PPL_CONTEXT} WikiText-2 test tokens "
                                "(quickstart shape)"},
        "shapes": {},
    }
    for name, shape_job in job["shapes"].items():
        shape = {"engine": [], "peers": {}}
        for contender, spec in shape_job["contenders"].items():
            row = aggregate(runs[name][contender], spec)
            row["decode_gb_per_s"] = round(row["weight_bytes_per_token"] * row["decode_tokens_per_s"] / 1e9, 3)
            row["decode_share_of_bandwidth"] = round(row["decode_gb_per_s"] / band["median"], 4)
            if spec["kind"] == "engine":
                shape["engine"].append({"name": contender, **row})
            else:
                shape["peers"][contender] = row
        if name in alone:
            harness = shape["peers"][HARNESS_PEER]["decode_tokens_per_s"]
            ratio = harness / alone[name]["decode_tokens_per_s"]
            shape["harness_check"] = {"peer": HARNESS_PEER,
                                      "alone_decode_tokens_per_s": alone[name]["decode_tokens_per_s"],
                                      "alone_prefill_tokens_per_s": alone[name]["prefill_tokens_per_s"],
                                      "in_harness_median_decode_tokens_per_s": harness,
                                      "in_harness_over_alone": round(ratio, 3), "tolerance": HARNESS_TOLERANCE,
                                      "within_tolerance": abs(ratio - 1) <= HARNESS_TOLERANCE}
        if name == QUICKSTART:
            shape["quality"] = quality
        shape["summary"] = summary(shape)
        result["shapes"][name] = shape
    result["runtime_s"] = round(time.time() - start, 1)
    print(json.dumps({k: v["summary"] for k, v in result["shapes"].items()}, indent=1))
    print(markdown(result))
    for name, shape in result["shapes"].items():
        if not shape.get("harness_check", {}).get("within_tolerance", True):
            print(f"FLAG: {name}: {HARNESS_PEER} in the harness is {shape['harness_check']['in_harness_over_alone']}x "
                  f"its speed alone (tolerance {HARNESS_TOLERANCE:.0%}): the harness slows a peer", flush=True)
    if result["forced"] and not args.force:
        sys.exit(f"error: load average {load_after[0]} after the run is above {LOAD_LIMIT}: results not written "
                 f"(another process ran meanwhile); rerun on an idle machine or pass --force")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    drew = plot_trade(result, trade_path)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}" + (f" and {trade_path}" if drew else "")
          + f" in {result['runtime_s']} s" + (" (FORCED: above the load limit)" if result["forced"] else ""))


if __name__ == "__main__":
    main()
