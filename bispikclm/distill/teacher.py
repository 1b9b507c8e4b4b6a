"""The teacher: any Hugging Face causal LM (OPT, Llama, GPT-2, ...), frozen, returning hidden states and
attention probabilities (METHOD §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..checkpoints import check_vocabulary, load_causal_lm
from ..configuration import max_positions
from ..errors import UserError


@dataclass
class TeacherOutput:
    """``logits`` ``[B, N, V]``; ``hidden_states``: ``L + 1`` tensors ``[B, N, D]`` (embedding output first);
    ``attentions``: ``L`` softmax maps ``[B, H, N, N]``."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Switch ``model`` to eager attention (softmax maps are only returned by it), eval mode, no gradients."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model.eval().requires_grad_(False)
    return model


def load_teacher(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM (a Hub name, a ``save_pretrained`` folder, a GGUF file or a short name such as
    ``smollm2-135m``: :func:`bispikclm.checkpoints.resolve`) in ``dtype`` (default float32), frozen."""
    try:
        model = load_causal_lm(name_or_path, dtype=dtype or torch.float32, attn_implementation="eager")
    except UserError as err:
        raise UserError(f"cannot load teacher: {err}") from None
    return freeze(model)


def check_teacher(teacher: PreTrainedModel, tokenizer_size: int, seq_len: int) -> None:
    """Raise :class:`UserError` unless ``teacher`` covers a tokenizer of ``tokenizer_size`` tokens (models may pad
    their vocabulary beyond it), takes sequences of ``seq_len`` tokens, and returns hidden states and attention
    maps."""
    name = type(teacher).__name__
    check_vocabulary(teacher, tokenizer_size, "teacher")
    positions = max_positions(teacher)
    if positions is not None and seq_len > positions:
        raise UserError(f"sequence length {seq_len} is beyond the teacher's {positions} positions")
    out = teacher_forward(teacher, torch.zeros(1, 2, dtype=torch.long, device=teacher.device))
    if not out.attentions or any(a is None for a in out.attentions) or not out.hidden_states:
        raise UserError(f"the teacher ({name}) returns no attention maps or hidden states; it needs an eager "
                        f"attention implementation and must be loaded with from_pretrained, not unpickled")


@torch.no_grad()
def teacher_forward(teacher: PreTrainedModel, input_ids: torch.Tensor) -> TeacherOutput:
    """Logits, hidden states and attention probabilities of the frozen teacher for ``input_ids`` ``[B, N]``."""
    out = teacher(input_ids=input_ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    return TeacherOutput(out.logits, tuple(out.hidden_states or ()), tuple(out.attentions or ()))
