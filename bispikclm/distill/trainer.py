"""Training loop on Hugging Face Accelerate: SpAD distillation (or plain cross-entropy) of a causal LM.

One process or several (``torchrun --nproc_per_node N``; gloo on CPU, NCCL/FSDP on GPUs). ``batch_size`` is the
global number of sequences per optimizer step; each step's sequences are split evenly over processes and
gradient-accumulation micro-steps, so the result does not depend on how many processes share the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .. import runfolder
from ..configuration import NEURON_GROUPS
from ..errors import UserError
from ..validation import check_types, need
from . import sharded
from .losses import DEFAULT_WEIGHTS, RATE_TARGETS, FiringRateLoss, SpADLoss, SpikeCostLoss
from .teacher import teacher_forward


class TrainingDiverged(UserError):
    """Several optimizer steps in a row had a NaN/Inf loss or gradient norm."""


#: ``train.teacher_dtype`` -> the dtype the teacher is loaded in (float32 by default, whatever the checkpoint says)
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_train_settings(values: dict, annotations: dict[str, str], where: str = "train") -> None:
    """UserError unless ``values`` (a recipe's ``train`` section, see :class:`bispikclm.distill.TrainConfig`
    and its ``annotations``) has known keys, values of the declared types, and values in range."""
    check_types(where, values, annotations)
    at_least = {"tokens": 1, "seq_len": 1, "batch_size": 1, "micro_batch_size": 1, "vocab_chunk_size": 1,
                "log_every": 1, "keep_checkpoints": 1, "max_bad_steps": 1, "eval_every": 0, "eval_batches": 0,
                "save_every": 0, "weight_decay": 0, "clip": 0, "spike_cost": 0,
                "rate_cost": 0}
    for key, low in at_least.items():
        if values.get(key) is not None:
            need(values[key] >= low, f"{where}.{key}", f"must be >= {low}", values[key])
    for key in ("lr", "tau"):
        if key in values:
            need(values[key] > 0, f"{where}.{key}", "must be > 0", values[key])
    if "warmup_ratio" in values:
        need(0 <= values["warmup_ratio"] <= 1, f"{where}.warmup_ratio", "must be in [0, 1]", values["warmup_ratio"])
    if "betas" in values:
        need(all(0 <= b < 1 for b in values["betas"]), f"{where}.betas", "must be two numbers in [0, 1)",
             values["betas"])
    if values.get("rate_exempt"):
        need(set(values["rate_exempt"]) <= set(NEURON_GROUPS), f"{where}.rate_exempt",
             f"must list neuron groups of {NEURON_GROUPS}", values["rate_exempt"])
        need(values.get("rate_cost", 0) > 0, f"{where}.rate_exempt", "only applies with rate_cost > 0",
             values["rate_exempt"])
    choices = {"mixed_precision": ("auto", "no", "bf16", "fp16"), "rate_targets": RATE_TARGETS}
    for key, known in choices.items():
        if key in values:
            need(values[key] in known, f"{where}.{key}", f"must be one of {known}", values[key])
    weights = values.get("weights", {})
    check_types(f"{where}.weights", weights, {name: "float" for name in DEFAULT_WEIGHTS})
    need(all(w >= 0 for w in weights.values()) and any(w > 0 for w in {**DEFAULT_WEIGHTS, **weights}.values()),
         f"{where}.weights", "must be >= 0 with at least one > 0", weights)


@dataclass
class TrainConfig:
    """Optimization settings of a run (the ``train:`` section of a recipe)."""

    tokens: int = 1_000_000                 # token budget: steps = tokens // (batch_size * seq_len)
    seq_len: int = 128
    batch_size: int = 16                    # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None     # sequences per process and forward pass (None: batch_size / processes)
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.2
    clip: float = 0.7
    weights: dict = field(default_factory=dict)   # SpAD λ per term (see losses.DEFAULT_WEIGHTS); 0 switches off
    tau: float = 2.0
    rate_targets: str = "paper"             # Rate-MSE targets, see losses.RATE_TARGETS
    vocab_chunk_size: int = 8192
    seed: int = 0
    mixed_precision: str = "auto"           # "auto": bf16 on GPU, none on CPU; or "no", "bf16", "fp16"
    log_every: int = 1
    eval_every: int = 0                     # 0: only at the end
    eval_batches: int = 8
    early_stopping: int = 0                 # stop after this many evaluations without a better val loss (0: off)
    min_tokens: int = 0                     # never stop early before this many tokens
    save_every: int = 0                     # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 5                  # stop after this many NaN/Inf steps in a row
    firing_rates: bool = True               # log per-layer firing rates (spiking students)
    spike_cost: float = 0.0                 # weight of losses.SpikeCostLoss (fewer spikes where they cost most)
    rate_cost: float = 0.0                  # weight of losses.FiringRateLoss (the mean firing rate of every neuron)
    rate_exempt: list[str] = field(default_factory=list)   # neuron groups rate_cost leaves out, e.g. [attn]
    teacher_dtype: str = "float32"          # dtype the teacher is loaded and run in, see TEACHER_DTYPES
    gradient_checkpointing: bool = False    # recompute each block in backward instead of keeping its activations
    fsdp: bool = False                      # shard each block and the model over the processes (FSDP2)
    fsdp_offload: bool = False              # with fsdp: keep the shards and their optimizer state in CPU memory

    # settings that may change between a run and its resumption
    OPERATIONAL = ("log_every", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "max_bad_steps",
                   "firing_rates", "micro_batch_size", "gradient_checkpointing")

    @classmethod
    def from_dict(cls, values: dict, where: str = "train") -> "TrainConfig":
        check_train_settings(values, cls.__annotations__, where)
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        if values.get("teacher_dtype", "float32") not in TEACHER_DTYPES:
            raise UserError(f"train.teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got "
                            f"{values['teacher_dtype']!r}")
        config = cls(**values)
        if config.fsdp or config.fsdp_offload:    # before anything loads
            check_fsdp(config, config.resolved_mixed_precision)
        return config

    @property
    def resolved_mixed_precision(self) -> str:
        """``mixed_precision`` with "auto" resolved: bf16 on GPU, no on CPU."""
        if self.mixed_precision == "auto":
            return "bf16" if torch.cuda.is_available() else "no"
        return self.mixed_precision

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


def grad_norm_fp32(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients, accumulated in float32 (half-precision norms overflow)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def tied_weights(model) -> dict[str, str]:
    """The weights ``model`` ties to another (name: the one it is tied to), saved once."""
    return dict(model._tied_weights_keys) if model.config.tie_word_embeddings else {}


def check_fsdp(config: TrainConfig, mixed: str) -> None:
    """UserError unless sharded training (``train.fsdp``) can run as asked: under torchrun (torch.distributed),
    without fp16 (bf16 parameters or none), CPU offload only on GPUs."""
    import os

    if config.fsdp_offload and not torch.cuda.is_available():
        raise UserError("train.fsdp_offload keeps GPU shards in CPU memory and needs GPUs")
    if "WORLD_SIZE" not in os.environ:
        raise UserError("train.fsdp needs torch.distributed: launch with torchrun --nproc_per_node N (1 is allowed)")
    if mixed not in ("no", "bf16"):
        raise UserError(f"train.fsdp supports mixed_precision no or bf16, got {mixed!r}")
    if config.fsdp_offload and not config.fsdp:
        raise UserError("train.fsdp_offload needs train.fsdp: true")


def shard(model, device: torch.device, mixed: str, offload: bool):
    """``model`` sharded with FSDP2 over every process: each ``BiSpikCLMBlock`` (or transformer layer) and then
    the model, bf16 parameters with float32 gradient reduction under ``mixed`` bf16, shards in CPU memory under
    ``offload``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():      # one process under torchrun: accelerate leaves the process group to us
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    options = {}
    if mixed == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy()
    else:
        model.to(device)
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):    # the blocks (BiSpikCLMBlock, teacher-shaped layers)
            fully_shard(module, **options)
    return fully_shard(model, **options)


def _clean_name(name: str) -> str:
    """A parameter's name without the prefixes DDP and FSDP wrappers add."""
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return name.removeprefix("module.")


def decay_groups(original: torch.nn.Module, prepared: torch.nn.Module, extra: torch.nn.Module,
                 weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the matrices (linear and embedding weights) only; biases, norm
    weights, residual gains, thresholds and leaks (every parameter with fewer than 2 dimensions, judged on the
    unwrapped ``original`` model) are not decayed. Parameters are taken from ``prepared`` (the model as
    ``accelerator.prepare`` returned it, whose parameters FSDP replaces) and from ``extra`` (the SpAD
    projectors)."""
    shapes = {name: p.ndim for name, p in original.named_parameters()}
    decay, no_decay = [], []
    for module, wrapped in ((prepared, True), (extra, False)):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            ndim = shapes.get(_clean_name(name)) if wrapped else p.ndim
            if ndim is None:
                raise UserError(f"cannot tell the shape of parameter {name!r} of the wrapped model; under FSDP set "
                                f"use_orig_params (FSDP1) or use FSDP2")
            (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_rates(firing_rates: dict[str, float]) -> dict[str, float]:
    """Mean firing rate over all neurons and per block (``model.layers.<i>.``) from ``{neuron path: rate}``."""
    per_layer: dict[int, list[float]] = {}
    for name, rate in firing_rates.items():
        parts = name.split(".")
        if "layers" in parts:
            per_layer.setdefault(int(parts[parts.index("layers") + 1]), []).append(rate)
    out = {"firing_rate": sum(firing_rates.values()) / len(firing_rates)}
    out.update({f"firing_rate_layer{i}": sum(r) / len(r) for i, r in sorted(per_layer.items())})
    return out


@contextlib.contextmanager
def _quiet_tensorboard_thread():
    """TensorBoard writes its event file from a thread of its own, which prints a traceback when that write fails
    (a full disk); the next ``add_scalar`` raises the same ``OSError`` in the training thread, where it becomes the
    run's one-line error. Silence the thread's copy."""
    previous = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class Trainer:
    """Trains ``model`` on packed sequences ``train_data`` ``[num_seqs, seq_len]`` with SpAD against
    ``teacher`` (or cross-entropy only when the loss needs no teacher), writing to ``out_dir``:
    ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/step-<n>/``, ``best/step-<n>/`` (early stopping) and the
    final model in ``model/`` (with ``tokenizer`` saved beside it when given, so that the folder loads on its own).
    Every folder is written through :mod:`bispikclm.runfolder`: verified, atomic, one writer at a time; SIGTERM and
    SIGINT stop the run after a checkpoint (:class:`bispikclm.runfolder.Interrupted`)."""

    def __init__(self, model, config: TrainConfig, train_data: torch.Tensor, val_data: torch.Tensor | None,
                 out_dir: str | Path, teacher=None, fingerprint: dict | None = None, progress: bool = True, tokenizer=None,
                 teacher_cache=None) -> None:
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress
        self.tokenizer = tokenizer
        mixed = config.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        if config.fsdp or config.fsdp_offload:
            check_fsdp(config, mixed)
        # cpu=True lets accelerate see torchrun's processes on machines without GPUs (gloo backend); under fsdp the
        # parameters carry their own precision (shard), so accelerate adds no autocast
        self.accelerator = Accelerator(mixed_precision="no" if config.fsdp else mixed,
                                       cpu=not torch.cuda.is_available())
        acc = self.accelerator
        world = acc.num_processes
        micro = config.micro_batch_size or config.batch_size // world
        if micro < 1 or config.batch_size % (micro * world):
            raise UserError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size {micro} x "
                            f"{world} processes")
        self.micro, self.accum = micro, config.batch_size // (micro * world)
        if train_data.shape[1] != config.seq_len:
            raise UserError(f"training sequences have length {train_data.shape[1]}, the config says {config.seq_len}")
        self.train_data, self.val_data = train_data, val_data
        if teacher is not None:
            teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
            if teacher_vocab != model.config.vocab_size:
                raise UserError(f"vocabulary mismatch: the student has {model.config.vocab_size} output tokens, the "
                                f"teacher {teacher_vocab}")
        self.spad = SpADLoss(model.config, teacher.config if teacher is not None else None, config.weights,
                             config.tau, config.vocab_chunk_size, config.rate_targets)
        self.teacher_cache = teacher_cache if self.spad.needs_teacher else None
        if self.teacher_cache is not None:   # the teacher's outputs are read from the cache, the teacher never runs
            from .teacher_cache import CacheSpec

            self.teacher_cache.check(train_data, CacheSpec.for_loss(self.spad, model.config, teacher.config,
                                                                    self.teacher_cache.spec.top_k))
            teacher = None
        self.teacher = teacher.to(acc.device) if teacher is not None and self.spad.needs_teacher else None
        self.spiking = hasattr(model, "neurons")
        if config.spike_cost < 0 or (config.spike_cost > 0 and not self.spiking):
            raise UserError(f"spike_cost must be >= 0 and needs a spiking student (got {config.spike_cost})")
        if config.rate_cost < 0 or (config.rate_cost > 0 and not self.spiking):
            raise UserError(f"rate_cost must be >= 0 and needs a spiking student (got {config.rate_cost})")
        self.cost = SpikeCostLoss(model) if self.spiking else None
        self.rate_loss = FiringRateLoss(model, config.rate_exempt) if config.rate_cost else None
        torch.manual_seed(config.seed)
        if config.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        self.fsdp = config.fsdp
        if self.fsdp:      # FSDP2 itself, not accelerate's plugin (which runs plain data parallelism on CPU)
            self.model = shard(model, acc.device, mixed, config.fsdp_offload)
            groups = decay_groups(model, self.model, self.spad, config.weight_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
        else:
            # the optimizer sees the parameters of the prepared model (FSDP replaces them when it wraps the model)
            self.model = acc.prepare(model)
            groups = decay_groups(model, self.model, self.spad, config.weight_decay)
            self.optimizer = acc.prepare(torch.optim.AdamW(groups, lr=config.lr, betas=config.betas))
        self.spad.to(acc.device)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, round(config.warmup_ratio * config.steps), config.steps)
        run = {k: v for k, v in dataclasses.asdict(config).items() if k not in TrainConfig.OPERATIONAL}
        for name, default in (("spike_cost", 0.0), ("rate_cost", 0.0), ("rate_exempt", []), ("rate_targets", "paper"),
                              ("teacher_dtype", "float32"), ("early_stopping", 0), ("min_tokens", 0), ("fsdp", False),
                              ("fsdp_offload", False)):
            if run[name] == default:    # checkpoints written before the setting existed still resume
                del run[name]
        self.fingerprint = {"train": run, "model": model.config.to_diff_dict(), **(fingerprint or {})}
        self.step, self.bad_steps, self.skipped = 0, 0, 0
        self.best_val, self.evals_since_best, self.stopped = math.inf, 0, False   # early stopping (checkpointed)
        self.best_step: int | None = None
        self._saved_step = -1
        self._perm: tuple[int, torch.Tensor] | None = None

    # ---- data -------------------------------------------------------------------------------------------------
    def _sample(self, k: int) -> int:
        """Index of the ``k``-th training sequence: a fresh seeded permutation per epoch."""
        n = len(self.train_data)
        epoch = k // n
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=gen))
        return int(self._perm[1][k % n])

    def micro_indices(self, step: int, micro: int) -> list[int]:
        """Indices of this process's share of micro-step ``micro`` of optimizer step ``step``."""
        acc = self.accelerator
        first = step * self.config.batch_size + (micro * acc.num_processes + acc.process_index) * self.micro
        return [self._sample(k) for k in range(first, first + self.micro)]

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        """This process's share ``[micro_batch_size, seq_len]`` of micro-step ``micro`` of optimizer step ``step``."""
        return torch.as_tensor(self.train_data[self.micro_indices(step, micro)]).to(self.accelerator.device)

    # ---- one step ---------------------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, record_rates: bool, indices: list[int] | None = None):
        extra = self.spad.student_outputs()
        if self.spiking:
            extra["output_firing_rates"] = record_rates
        else:
            extra.pop("output_spike_rates", None)
        rates = self.rate_loss.recording() if self.rate_loss else contextlib.nullcontext()
        with self.cost.recording() if self.cost else contextlib.nullcontext(), rates:
            out = self.model(input_ids, use_cache=False, **extra)
            cost = self.cost.value(input_ids.numel()) if self.cost else None
            rate = self.rate_loss.value() if self.rate_loss else None
        if self.teacher_cache is not None:
            teacher_out = self.teacher_cache.outputs(indices, input_ids.device)
        else:
            teacher_out = teacher_forward(self.teacher, input_ids) if self.teacher is not None else None
        loss, terms = self.spad(out, teacher_out, input_ids)
        if cost is not None:
            terms["cost"] = cost.detach()
            if self.config.spike_cost:
                loss = loss + self.config.spike_cost * cost
        if rate is not None:
            terms["rate"] = rate.detach()
            loss = loss + self.config.rate_cost * rate
        return out, (loss, terms)

    def clip_gradients(self) -> torch.Tensor:
        """Global L2 norm of the unscaled gradients of the model and the SpAD projectors, and every gradient scaled
        by ``min(1, clip / norm)`` (``clip`` 0: not scaled). ``accelerator.clip_grad_norm_`` unscales fp16
        gradients first and knows how FSDP shards them; it gets exactly the prepared model's parameters (as FSDP
        requires), and the replicated projectors' norm is added to it."""
        acc, clip = self.accelerator, self.config.clip
        model_params = list(self.model.parameters())
        if self.fsdp:    # each process holds a shard of every gradient: the norm of the full ones
            norm = torch.nn.utils.get_total_norm([p.grad for p in model_params if p.grad is not None]).full_tensor()
            norm = norm.float()
        else:
            norm = acc.clip_grad_norm_(model_params, float("inf")).float()
        extra = [p for p in self.spad.parameters() if p.grad is not None]
        if extra:
            norm = torch.linalg.vector_norm(torch.stack([norm.to(acc.device), grad_norm_fp32(extra).to(acc.device)]))
        if clip > 0 and torch.isfinite(norm):
            params = [p for p in model_params + extra if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm.to(params[0].grad.device))
        return norm

    def train_step(self) -> dict:
        """One optimizer step (all micro-steps); returns its metrics. NaN/Inf steps are skipped and counted."""
        acc, cfg = self.accelerator, self.config
        self.model.train()
        totals: dict[str, torch.Tensor] = {}
        rates: dict[str, float] = {}
        for m in range(self.accum):
            last = m == self.accum - 1 or self.fsdp     # FSDP2 reduce-scatters the gradients of every micro-step
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            with sync:
                idx = self.micro_indices(self.step, m)
                input_ids = torch.as_tensor(self.train_data[idx]).to(acc.device)
                out, (loss, terms) = self._forward(input_ids, cfg.firing_rates and m == 0, idx)
                acc.backward(loss / self.accum)
            for name, value in {"loss": loss.detach(), **terms}.items():
                totals[name] = totals.get(name, 0.0) + value.float() / self.accum
            if self.spiking and out.firing_rates:
                rates = layer_rates(out.firing_rates)
        totals = {k: acc.reduce(v, "mean") for k, v in totals.items()}
        for p in self.spad.parameters():   # projectors live outside the wrapped model: average their gradients here
            if p.grad is not None:
                p.grad = acc.reduce(p.grad, "mean")
        norm = self.clip_gradients()
        loss_finite = bool(torch.isfinite(totals["loss"]))
        finite = loss_finite and bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            if acc.scaler is not None:
                acc.scaler.update()     # fp16: no update; the loss scaler lowers its scale after an Inf
            # an overflow of the fp16 loss scale is not divergence: the scaler recovers from it
            self.bad_steps += 1 if acc.scaler is None or not loss_finite else 0
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        metrics = {"step": self.step, "tokens": self.step * cfg.batch_size * cfg.seq_len, "lr": lr,
                   "grad_norm": float(norm), "skipped": not finite,
                   **{("loss" if k == "loss" else f"loss_{k}"): float(v) for k, v in totals.items()}, **rates}
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Cross-entropy and perplexity of the student on the first ``eval_batches`` batches of validation data."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        data = self.val_data[: self.config.eval_batches * self.micro]
        losses = [self.spad.hard(model(b.to(self.accelerator.device), use_cache=False).logits, b.to(
            self.accelerator.device)) for b in data.split(self.micro)]
        loss = float(torch.stack(losses).mean())
        return {"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # ---- early stopping ---------------------------------------------------------------------------------------
    @property
    def best_dir(self) -> Path:
        return self.out_dir / "best"

    @property
    def best_path(self) -> Path | None:
        """The weights with the lowest validation loss so far (``best/step-<n>/model.safetensors``), if any."""
        return None if self.best_step is None else self.best_dir / f"step-{self.best_step:08d}" / "model.safetensors"

    def _track_best(self, val_loss: float) -> bool:
        """Keep the weights with the lowest validation loss (``best/step-<n>/``, a verified folder written
        atomically, the earlier best kept until the new one is complete) and return whether training should stop:
        ``early_stopping`` evaluations in a row without improvement, once ``min_tokens`` tokens are behind."""
        cfg = self.config
        if not cfg.early_stopping:
            return False
        if val_loss < self.best_val:
            self.best_val, self.best_step, self.evals_since_best = val_loss, self.step, 0
            weights = self.full_weights()
            runfolder.on_main_process(lambda: self._write_best(weights))
            return False
        self.evals_since_best += 1
        tokens = self.step * cfg.batch_size * cfg.seq_len
        return self.evals_since_best >= cfg.early_stopping and tokens >= cfg.min_tokens

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """Every process calls it: under fsdp, the full (gathered) weights on the main process, in CPU memory;
        ``None`` without fsdp (the model holds them whole)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_weights(self, weights: dict[str, torch.Tensor] | None, path: Path) -> None:
        """The model's weights as one safetensors file (tied weights once), from ``full_weights`` under fsdp."""
        model = self.accelerator.unwrap_model(self.model)
        if weights is None:
            save_model(model, str(path))
            return
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items() if k not in tied_weights(model)}, str(path), metadata={"format": "pt"})

    def _write_best(self, weights: dict[str, torch.Tensor] | None) -> None:
        folder = self.best_path.parent
        with runfolder.committing(folder, f"the best weights {folder}",
                                  f"; the earlier best weights in {self.best_dir} are kept") as tmp:
            self._save_weights(weights, tmp / "model.safetensors")
        self._prune_best()

    def _prune_best(self) -> None:
        """Remove the best-weight versions that neither this run nor a resumption from one of its checkpoints can
        end with (each checkpoint records the best step it has seen)."""
        needed = {self.best_step}
        for folder in self.checkpoint_dir.glob("step-*"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                needed.add(json.loads((folder / "trainer_state.json").read_text()).get("best_step"))
        with runfolder.writing(f"the best weights in {self.best_dir}"):
            for version in self.best_dir.glob("step-*"):
                step = version.name[len("step-"):]
                if step.isdigit() and int(step) not in needed:
                    shutil.rmtree(version)

    # ---- checkpoints ------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    #: under fsdp, checkpoints hold each process's shards (:mod:`.sharded`); False gathers the full state on the
    #: main process instead (the format benchmarks/fsdp_checkpoint.py compares it with)
    sharded_checkpoints = True

    def save_checkpoint(self) -> None:
        """Every process calls it; the main one writes ``checkpoints/step-<n>/``: weights (``model.safetensors``),
        optimizer, scheduler, SpAD projectors and RNG (``state.safetensors``, no pickle), step, early-stopping
        state and config fingerprint (``trainer_state.json``), with a manifest of sizes and sha256, fsynced and
        renamed into place (:func:`bispikclm.runfolder.committing`); then ``checkpoints/latest`` names it and the
        oldest beyond ``keep_checkpoints`` are removed. Under fsdp every process writes its shards of the weights
        and of AdamW's moments into the folder first (``shards/``, :mod:`.sharded`), which the manifest covers.
        A failed write is a one-line error on every process, the earlier checkpoints kept."""
        self.accelerator.wait_for_everyone()
        if self.fsdp and self.sharded_checkpoints:
            self._save_sharded()
        else:
            weights, optimizer = self.full_weights(), self.optimizer_state()
            runfolder.on_main_process(lambda: self._write_checkpoint(weights, optimizer))
        self._saved_step = self.step

    def optimizer_state(self) -> dict:
        """Every process calls it: the optimizer's state, under fsdp gathered whole (keyed by parameter name)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _checkpoint_names(self) -> tuple[Path, str]:
        """The folder of this step's checkpoint, and what a failed write of it says is kept."""
        kept = f"; the earlier checkpoints in {self.checkpoint_dir} are kept"
        return self.checkpoint_dir / f"step-{self.step:08d}", kept

    def _fill_checkpoint(self, tmp: Path, weights: dict[str, torch.Tensor] | None, optimizer: dict) -> None:
        """The main process's files of a checkpoint: weights (unless sharded), state and trainer state."""
        if weights is not None or not self.fsdp:
            self._save_weights(weights, tmp / "model.safetensors")
        runfolder.save_state({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                              "spad": self.spad.state_dict(), "rng": torch.get_rng_state(),
                              "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                             tmp / "state.safetensors")
        state = {"step": self.step, "skipped": self.skipped, "fingerprint": self.fingerprint,
                 "best_val": self.best_val if math.isfinite(self.best_val) else None, "best_step": self.best_step,
                 "evals_since_best": self.evals_since_best, "stopped": self.stopped}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))

    def _publish_checkpoint(self, final: Path) -> None:
        """``checkpoints/latest`` names the complete checkpoint ``final``; the oldest beyond ``keep_checkpoints``
        go."""
        with runfolder.writing(f"{self.checkpoint_dir / 'latest'}", f"; checkpoint {final} is complete"):
            runfolder.write_file(self.checkpoint_dir / "latest", final.name)
            for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
            self._prune_best()

    def _write_checkpoint(self, weights: dict[str, torch.Tensor] | None, optimizer: dict) -> None:
        final, kept = self._checkpoint_names()
        with runfolder.committing(final, f"checkpoint {final}", kept) as tmp:
            self._fill_checkpoint(tmp, weights, optimizer)
        self._publish_checkpoint(final)

    def _save_sharded(self) -> None:
        """A sharded checkpoint: the main process makes the temporary folder, every process writes its shards into
        it, the main process adds its files, seals the folder (manifest, fsync, rename) and names it in ``latest``.
        A failure on any process removes the temporary folder and is the same one-line error on every process."""
        final, kept = self._checkpoint_names()
        tmp, what = runfolder.temporary_folder(final), f"checkpoint {final}"

        def prepare() -> None:
            with runfolder.writing(what, kept):
                runfolder.discard(tmp)
                tmp.mkdir(parents=True)

        def finish(rest: dict) -> None:
            with runfolder.writing(what, kept):
                try:
                    self._fill_checkpoint(tmp, None, rest)
                    runfolder.seal(tmp, final)
                except BaseException:
                    runfolder.discard(tmp)
                    raise
            self._publish_checkpoint(final)

        runfolder.on_main_process(prepare)
        model = self.accelerator.unwrap_model(self.model)
        try:
            rest = sharded.save(self.model, self.optimizer, tmp, tied_weights(model), what, kept)
        except runfolder.WriteFailed:
            if self.accelerator.is_main_process:
                runfolder.discard(tmp)
            raise
        runfolder.on_main_process(lambda: finish(rest))

    @staticmethod
    def _check_checkpoint(folder: Path) -> str | None:
        """Why checkpoint ``folder`` cannot be resumed from, or ``None``: its manifest must match every file, its
        ``trainer_state.json`` parse and both safetensors files open (read as data, never as code)."""
        reason = runfolder.check_manifest(folder)
        if reason:
            return reason
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
            int(state["step"]), state["fingerprint"]
        except FileNotFoundError:
            return "trainer_state.json is missing"
        except (OSError, ValueError, KeyError, TypeError):
            return "trainer_state.json is unreadable"
        names = ["state.safetensors"]
        if (folder / sharded.SHARDS).is_dir():
            reason = sharded.check(folder)
            if reason:
                return reason
        else:
            names.insert(0, "model.safetensors")
        for name in names:
            try:
                with safe_open(str(folder / name), framework="pt") as f:
                    if name == "state.safetensors" and "structure" not in (f.metadata() or {}):
                        return f"{name} holds no saved state"
            except FileNotFoundError:
                return f"{name} is missing"
            except Exception:
                return f"{name} is not a safetensors file"
        return None

    def _choose_checkpoint(self) -> str | None:
        """On the main process: the newest usable checkpoint's name (``None``: the folder holds none). Newer
        damaged ones are moved aside to ``checkpoints/damaged-step-<n>`` and named on one line with the reason."""
        folder, skipped = runfolder.newest_usable(self.checkpoint_dir, self._check_checkpoint)
        why = "; ".join(f"{name} ({reason})" for name, reason in skipped)
        if folder is None:
            if skipped:
                raise UserError(f"no usable checkpoint in {self.checkpoint_dir}: {why}; train again into another "
                                f"folder")
            return None
        state = json.loads((folder / "trainer_state.json").read_text())
        if state["fingerprint"] != json.loads(json.dumps(self.fingerprint)):
            raise UserError(f"checkpoint {folder} was written by a different config; resume with the same recipe "
                            f"or use another output folder")
        if skipped:
            with runfolder.writing(f"checkpoints in {self.checkpoint_dir}"):
                for name, _ in skipped:
                    if (self.checkpoint_dir / name).is_dir():
                        runfolder.discard(self.checkpoint_dir / f"damaged-{name}")
                        (self.checkpoint_dir / name).rename(self.checkpoint_dir / f"damaged-{name}")
            runfolder.warn(f"resuming from {folder.name}; skipped {why}; the skipped folders are kept as damaged-*")
        return folder.name

    def _load_weights(self, path: Path) -> None:
        if self.fsdp:      # every process reads the full weights and keeps its shards
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            weights = load_file(str(path))
            model = self.accelerator.unwrap_model(self.model)
            for name, source in tied_weights(model).items():
                weights[name] = weights[source]
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
            return
        device = self.accelerator.device      # "cpu:0" under several CPU processes, a name safetensors refuses
        load_model(self.accelerator.unwrap_model(self.model), str(path),
                   device="cpu" if device.type == "cpu" else str(device))

    def load_checkpoint(self) -> bool:
        """Restore the newest usable checkpoint of ``out_dir`` (every process loads the one the main process chose
        and verified); ``False`` if the folder holds none. A folder whose checkpoints are all damaged is a one-line
        error, nothing changed."""
        name = runfolder.on_main_process(self._choose_checkpoint)
        if name is None:
            return False
        folder = self.checkpoint_dir / name
        state = json.loads((folder / "trainer_state.json").read_text())
        try:
            extra = runfolder.load_state(folder / "state.safetensors")
            if (folder / sharded.SHARDS).is_dir():
                if not self.fsdp:
                    raise ValueError("it holds the shards of a sharded run; resume it with train.fsdp: true")
                sharded.load(self.model, self.optimizer, folder, extra["optimizer"],
                             tied_weights(self.accelerator.unwrap_model(self.model)))
            elif self.fsdp:
                self._load_weights(folder / "model.safetensors")
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.model, self.optimizer, extra["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self._load_weights(folder / "model.safetensors")
                self.optimizer.load_state_dict(extra["optimizer"])
            self.scheduler.load_state_dict(extra["scheduler"])
            self.spad.load_state_dict(extra["spad"])
            torch.set_rng_state(extra["rng"])
            if extra["cuda_rng"]:
                torch.cuda.set_rng_state_all(extra["cuda_rng"])
        except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
            raise UserError(f"checkpoint {folder} cannot be loaded: {str(err).splitlines()[0]}") from None
        self.step, self.skipped = state["step"], state["skipped"]
        best = state.get("best_val")
        self.best_val = math.inf if best is None else best
        self.best_step = state.get("best_step")
        self.evals_since_best = state.get("evals_since_best", 0)
        self.stopped = state.get("stopped", False)
        self._saved_step = self.step
        return True

    def _write_model(self, weights: dict[str, torch.Tensor] | None) -> None:
        """The final model (and tokenizer) as ``model/``, a verified folder written atomically; under fsdp from the
        gathered weights, an ordinary folder that loads on one process."""
        folder = self.out_dir / "model"
        with runfolder.committing(folder, f"the final model {folder}",
                                  f"; the checkpoints in {self.checkpoint_dir} are kept") as tmp:
            self.accelerator.unwrap_model(self.model).save_pretrained(str(tmp), state_dict=weights)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _log(self, metrics: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        path = self.out_dir / "metrics.jsonl"
        with runfolder.writing(f"metrics {path}", f"; the checkpoints in {self.checkpoint_dir} are kept"):
            with path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, metrics["step"])

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint a run resumes from."""
        path = self.out_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
            with runfolder.writing(f"metrics {path}"):
                runfolder.write_file(path, "".join(ln + "\n" for ln in lines))

    def _start(self, resume: bool) -> None:
        """Under the run folder's lock: restore the newest usable checkpoint (``resume``) or make sure the folder
        holds no run, and clear what interrupted writes left."""
        if resume:
            self.load_checkpoint()
            self._truncate_metrics()
        elif (self.checkpoint_dir / "latest").is_file() or any(self.checkpoint_dir.glob("step-*")):
            raise UserError(f"{self.out_dir} already holds a run; pass --resume to continue it or use another folder")
        if self.accelerator.is_main_process:
            with runfolder.writing(f"the run folder {self.out_dir}"):
                for parent in (self.out_dir, self.checkpoint_dir, self.best_dir):
                    runfolder.remove_unfinished(parent)
                self._prune_best()

    def _stop(self, signum: int) -> None:
        """Write a checkpoint of the step just finished (unless it has one) and stop with
        :class:`bispikclm.runfolder.Interrupted`."""
        if self._saved_step != self.step:
            self.save_checkpoint()
        if self.writer is not None:
            self.writer.close()
        raise runfolder.Interrupted(signum, f"stopped by {runfolder.signal_name(signum)} after step {self.step}; "
                                            f"checkpoint {self.checkpoint_dir / f'step-{self.step:08d}'} is complete")

    def fit(self, resume: bool = False) -> dict:
        """Train until the token budget is spent; returns the final metrics (and the last evaluation). Holds the
        run folder's lock throughout; on SIGTERM or SIGINT the run finishes its step, writes a checkpoint and
        raises :class:`bispikclm.runfolder.Interrupted`, from which ``fit(resume=True)`` continues bit for bit."""
        with runfolder.locked(self.out_dir, "training"), runfolder.StopSignals() as stop, _quiet_tensorboard_thread():
            return self._fit(resume, stop)

    def _fit(self, resume: bool, stop: runfolder.StopSignals) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        acc, cfg = self.accelerator, self.config
        self._start(resume)
        self.writer = None
        if acc.is_main_process:
            with runfolder.writing(f"the TensorBoard log in {self.out_dir}"):
                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not (self.progress and acc.is_main_process))
        start, start_step, last_eval = time.perf_counter(), self.step, {}
        metrics = {"step": self.step, "tokens": self.step * tokens_per_step}
        while self.step < cfg.steps and not self.stopped:
            metrics = self.train_step()
            elapsed = time.perf_counter() - start
            metrics["tokens_per_s"] = (self.step - start_step) * tokens_per_step / elapsed
            metrics["elapsed_s"] = elapsed
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(metrics)
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingDiverged(f"{self.bad_steps} steps in a row had a NaN/Inf loss or gradient (step "
                                       f"{self.step}); the last good checkpoint in {self.checkpoint_dir} is intact")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.val_data is not None:
                last_eval = self.evaluate()
                self._log(last_eval)
                self.stopped = self._track_best(last_eval["val_loss"])
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.stopped:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix_str(" ".join(
                [f"tok/s={metrics['tokens_per_s']:.0f}", f"loss={metrics['loss']:.3f}"]
                + [f"{k[5:]}={v:.3f}" for k, v in metrics.items() if k.startswith("loss_")]
                + ([f"rate={metrics['firing_rate']:.3f}"] if "firing_rate" in metrics else [])))
            signum = stop.agreed() if stop.received or acc.num_processes > 1 else 0
            if signum:
                bar.close()
                self._stop(signum)
        bar.close()
        if self.val_data is not None and (not cfg.eval_every or self.step % cfg.eval_every):
            last_eval = self.evaluate()
            self._log(last_eval)
            self._track_best(last_eval["val_loss"])
        if self._saved_step != self.step:
            self.save_checkpoint()
        if cfg.early_stopping and self.best_path is not None:    # the final model is the best one seen
            reason = runfolder.on_main_process(lambda: runfolder.check_manifest(self.best_path.parent))
            if reason:
                raise UserError(f"the best weights {self.best_path.parent} cannot be used ({reason}); the "
                                f"checkpoints in {self.checkpoint_dir} are intact")
            self._load_weights(self.best_path)
            last_eval = {**last_eval, "val_loss": self.best_val, "val_ppl": math.exp(min(self.best_val, 50.0))}
        weights = self.full_weights()
        runfolder.on_main_process(lambda: self._write_model(weights))
        if self.writer is not None:
            with runfolder.writing(f"the TensorBoard log in {self.out_dir}"):
                self.writer.close()
        return {**metrics, **last_eval, "skipped_steps": self.skipped, "processes": acc.num_processes,
                "stopped_early": self.stopped}
