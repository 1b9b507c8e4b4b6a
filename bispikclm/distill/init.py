"""Start a student from its teacher's weights instead of random ones (a quality lever; the paper trains from random
initialization, METHOD §5).

* ``"embeddings"``: token embedding (hence the tied head), learned positions and the final LayerNorm. A narrower
  student gets the teacher's token (and position) embedding projected onto its ``hidden_size`` leading principal
  directions, which keeps as much of the teacher's embedding geometry as that width can hold.
* ``"calibrated"``: thresholds and block linears fitted to the teacher's activations on calibration sequences
  (:mod:`bispikclm.distill.calibrate`; OPT-family teachers, ``per_channel_neurons``). An ANN student takes
  ``"all"``.
* ``"all"``: also every linear layer of the blocks when the widths agree (student layer ``i`` of ``Ls`` takes
  teacher layer ``round((i + 1) · Lt / Ls) - 1``). A spiking layer receives 0/1 spikes instead of normalized
  real activations, so each copied matrix keeps the teacher's pattern but is rescaled to the standard deviation of
  the student's own initialization (which makes currents cross the thresholds); biases are scaled alike.

The student's ``input_gain`` is reset so that the embedding current again has unit standard deviation.
OPT, Llama-family (Llama, SmolLM, Qwen, Mistral) and GPT-2 teachers are recognised; GPT-2's fused attention
projection is not copied into blocks.

An ANN student (:mod:`bispikclm.ann`) is initialized the same way, so that both students start from the same
information: ``"embeddings"`` sets its token and position embeddings and final norm, ``"all"`` also copies every
weight when the student has the teacher's architecture and shape (it then starts as the teacher itself).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling import BiSpikCLMForCausalLM
from .calibrate import calibrate
from .losses import layer_map

INIT_MODES = ("random", "embeddings", "all", "calibrated")

#: Student linear layer (inside a block) -> its counterpart in a teacher block, by family.
BLOCK_LINEARS = {
    "opt": {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
            "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.out_proj",
            "ffn.fc1": "fc1", "ffn.fc2": "fc2"},
    "llama": {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
              "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.o_proj",
              "ffn.gate_proj": "mlp.gate_proj", "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj"},
}


def teacher_layer_of(layer: int, student_layers: int, teacher_layers: int) -> int:
    """The teacher block that student block ``layer`` of ``student_layers`` is initialized (and calibrated) from:
    ``round((layer + 1) · teacher_layers / student_layers) - 1`` (the last student block takes the last teacher
    block)."""
    return layer_map(student_layers, teacher_layers)[layer] - 1


def calibration_sequences(sequences: torch.Tensor, count: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` training sequences drawn at random (with ``seed``) for ``init: calibrated``."""
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed))
    return sequences[order[:count]]


def student_section_for(section: dict, init: str) -> dict:
    """A recipe's ``student`` section as ``init`` needs it: ``calibrated`` sets per-channel neurons."""
    return {"per_channel_neurons": True, **section} if init == "calibrated" else section


def _teacher_parts(teacher: nn.Module) -> dict:
    """Positions (table, offset), final norm and list of blocks of an OPT, Llama-family or GPT-2 teacher."""
    modules = dict(teacher.named_modules())
    if "model.decoder" in modules:                                       # OPT
        decoder = modules["model.decoder"]
        table = decoder.embed_positions
        return dict(family="opt", positions=table.weight, offset=getattr(table, "offset", 0),
                    norm=decoder.final_layer_norm, blocks=decoder.layers)
    if "transformer.wpe" in modules:                                     # GPT-2
        return dict(family="gpt2", positions=modules["transformer.wpe"].weight, offset=0,
                    norm=modules["transformer.ln_f"], blocks=None)
    if "model.norm" in modules and "model.layers" in modules:            # Llama family (rotary: no table)
        return dict(family="llama", positions=None, offset=0, norm=modules["model.norm"],
                    blocks=modules["model.layers"])
    raise ValueError(f"cannot initialize from a {type(teacher).__name__}: not an OPT, Llama-family or GPT-2 model")


def _principal_directions(table: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """A map ``[D_teacher, width]`` onto the ``width`` leading principal directions of the rows of ``table``,
    each direction scaled so that the projected rows have standard deviation ``std`` along it.

    Equal spread per channel matters to a spiking student: along the raw principal directions the variance falls
    off fast, so most channels of the projected embedding would carry currents too small to ever fire (measured on
    SmolLM2-135M into width 384: firing rate 0.04 instead of 0.24 at random init). The scale ``std`` (the student's
    ``initializer_range``) keeps the tied head's logits as small as at random initialization."""
    centered = table.float() - table.float().mean(0)
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    spread = singular[:width] / (table.shape[0] - 1) ** 0.5
    return vh[:width].t() * (std / spread.clamp_min(1e-12))


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, mode: str = "all",
                      calibration: torch.Tensor | None = None) -> list[str]:
    """Copy ``teacher``'s weights into ``student`` (a :class:`BiSpikCLMForCausalLM` or an ANN student) as
    described in the module docstring; returns the student parameters that were set. ``mode``: ``"embeddings"``,
    ``"all"`` or ``"calibrated"`` (which needs ``calibration``, token ids ``[S, N]``); ``"random"`` does
    nothing."""
    if mode not in INIT_MODES:
        raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")
    if mode == "random":
        return []
    if not isinstance(student, BiSpikCLMForCausalLM):
        return _init_ann(student, teacher, "all" if mode == "calibrated" else mode)
    if mode == "calibrated" and calibration is None:
        raise ValueError("init 'calibrated' needs calibration sequences")
    parts, cfg = _teacher_parts(teacher), student.config
    tok_t = teacher.get_input_embeddings().weight
    if tok_t.shape[0] != cfg.vocab_size:
        raise ValueError(f"the teacher has {tok_t.shape[0]} token embeddings, the student {cfg.vocab_size}")
    width, same_width = cfg.hidden_size, tok_t.shape[1] == cfg.hidden_size
    directions = None if same_width else _principal_directions(tok_t, width, cfg.initializer_range)

    def project(table: torch.Tensor) -> torch.Tensor:
        return table.float() if directions is None else table.float() @ directions

    done = ["model.embed_tokens.weight"]
    emb = student.model.embed_tokens.weight
    emb.copy_(project(tok_t))
    if parts["positions"] is not None:
        table = parts["positions"][parts["offset"]:parts["offset"] + cfg.max_position_embeddings]
        student.model.embed_positions.weight[: table.shape[0]].copy_(project(table))
        done.append("model.embed_positions.weight")
    positions = student.model.embed_positions.weight
    gain = 1.0 / float((emb.var() + positions.var()).sqrt())
    student.config.input_gain = student.model.input_gain = gain
    norm = student.final_layer_norm
    if norm is not None and same_width:
        norm.weight.copy_(parts["norm"].weight)
        if getattr(parts["norm"], "bias", None) is not None:
            norm.bias.copy_(parts["norm"].bias)
        done += ["final_layer_norm.weight", "final_layer_norm.bias"]
    if not cfg.tie_word_embeddings:
        student.lm_head.weight.copy_(project(teacher.get_output_embeddings().weight))
        done.append("lm_head.weight")
    if mode == "all" and same_width and parts["blocks"] is not None:
        done += _copy_blocks(student, parts["blocks"], BLOCK_LINEARS[parts["family"]])
    if mode == "calibrated":
        calibrate(student, teacher, calibration)
        done = [name for name, _ in student.named_parameters()]
    return done


def _copy_blocks(student: BiSpikCLMForCausalLM, teacher_blocks: nn.ModuleList, names: dict[str, str]) -> list[str]:
    """Rescaled copies of the teacher's block linears (matching shapes only); returns the parameters set."""
    done, ls, lt = [], len(student.model.layers), len(teacher_blocks)
    for i, block in enumerate(student.model.layers):
        source = dict(teacher_blocks[teacher_layer_of(i, ls, lt)].named_modules())
        for name, module in block.named_modules():
            if name not in names or names[name] not in source:
                continue
            theirs = source[names[name]]
            if theirs.weight.shape != module.weight.shape:
                continue
            scale = float(module.weight.std()) / max(float(theirs.weight.std()), 1e-12)
            module.weight.copy_(theirs.weight * scale)
            done.append(f"model.layers.{i}.{name}.weight")
            if module.bias is not None and getattr(theirs, "bias", None) is not None:
                module.bias.copy_(theirs.bias * scale)
                done.append(f"model.layers.{i}.{name}.bias")
    return done


def _init_std(config) -> float:
    """The standard deviation a Hugging Face config initializes weights with (OPT calls it ``init_std``)."""
    for name in ("initializer_range", "init_std"):
        try:
            return float(getattr(config, name))
        except AttributeError:
            continue
    return 0.02


def _init_ann(student: nn.Module, teacher: nn.Module, mode: str) -> list[str]:
    """:func:`init_from_teacher` for an ANN student (OPT or Llama family)."""
    ours, theirs = _teacher_parts(student), _teacher_parts(teacher)
    tok_s, tok_t = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    if tok_s.shape[0] != tok_t.shape[0]:
        raise ValueError(f"the teacher has {tok_t.shape[0]} token embeddings, the student {tok_s.shape[0]}")
    params = dict(teacher.named_parameters())
    if mode == "all" and all(name in params and params[name].shape == p.shape for name, p in student.named_parameters()):
        for name, p in student.named_parameters():
            p.copy_(params[name])
        return [name for name, _ in student.named_parameters()]
    directions = (None if tok_s.shape[1] == tok_t.shape[1]
                  else _principal_directions(tok_t, tok_s.shape[1], _init_std(student.config)))

    def project(table: torch.Tensor) -> torch.Tensor:
        return table.float() if directions is None else table.float() @ directions

    tok_s.copy_(project(tok_t))
    done = ["token embedding"]
    if ours["positions"] is not None and theirs["positions"] is not None:
        rows = min(ours["positions"].shape[0] - ours["offset"], theirs["positions"].shape[0] - theirs["offset"])
        ours["positions"][ours["offset"]:ours["offset"] + rows].copy_(
            project(theirs["positions"][theirs["offset"]:theirs["offset"] + rows]))
        done.append("position embedding")
    if directions is None and ours["norm"].weight.shape == theirs["norm"].weight.shape:
        ours["norm"].weight.copy_(theirs["norm"].weight)
        done.append("final norm")
    return done
