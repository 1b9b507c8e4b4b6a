"""Teachers of three architectures loaded with from_pretrained, frozen, with hidden states and attention maps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from bispikclm.distill import check_teacher, load_teacher, teacher_forward
from bispikclm.errors import UserError
from helpers import make_teacher, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(data_dir, tmp_path_factory):
    return make_tokenizer(data_dir, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_teacher_is_frozen_eager_and_returns_maps(arch, tokenizer, tmp_path):
    # saved with the default (sdpa) attention; loading switches to eager so that maps come back
    folder = make_teacher(arch, tmp_path / arch, tokenizer)
    teacher = load_teacher(str(folder))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config._attn_implementation == "eager"
    check_teacher(teacher, len(tokenizer), 64)
    ids = torch.tensor([tokenizer(" The game was praised for its story .")["input_ids"]])
    out = teacher_forward(teacher, ids)
    n = ids.shape[1]
    assert out.logits.shape == (1, n, len(tokenizer))
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (1, n, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, n, n)
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(1, 4, n), atol=1e-5)
    assert torch.equal(out.attentions[0].triu(1), torch.zeros_like(out.attentions[0].triu(1)))


def test_bad_teachers_are_user_errors(tokenizer, tmp_path):
    folder = make_teacher("opt", tmp_path / "opt", tokenizer)
    teacher = load_teacher(str(folder))
    with pytest.raises(UserError, match="vocabulary mismatch"):
        check_teacher(teacher, len(tokenizer) + 1, 32)
    with pytest.raises(UserError, match="beyond the teacher's 64 positions"):
        check_teacher(teacher, len(tokenizer), 65)
    sdpa = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
    with pytest.raises(UserError, match="no attention maps"):
        check_teacher(sdpa, len(tokenizer), 32)
    with pytest.raises(UserError, match="cannot load teacher"):
        load_teacher(str(tmp_path / "nowhere"))
