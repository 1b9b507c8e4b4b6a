"""The teacher cache: top-k soft targets, cached outputs equal to the live teacher's, resumable build, and training
from the cache through ``bispikclm train`` on real WikiText-2 text with a small Llama teacher (grouped-query, tied)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from bispikclm.configuration import BiSpikCLMConfig
from bispikclm.distill import load_teacher
from bispikclm.distill.losses import SoftTargetLoss, SpADLoss, TopKLogits, topk_kl
from bispikclm.distill.teacher import teacher_forward
from bispikclm.distill.teacher_cache import CacheSpec, TeacherCache
from bispikclm.errors import UserError
from helpers import cli, make_teacher, make_tokenizer, write_recipe


def test_topk_kl_with_every_token_is_the_full_kl_and_has_its_gradient():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 40, requires_grad=True)
    teacher = torch.randn(2, 5, 40) * 3
    values, indices = teacher.topk(40, dim=-1)
    full = SoftTargetLoss(tau=2.0, chunk_size=16)(student, teacher)
    top = topk_kl(student, TopKLogits(values, indices), tau=2.0, chunk=16)
    assert torch.allclose(full, top, rtol=1e-5)
    (g_full,) = torch.autograd.grad(full, student)
    (g_top,) = torch.autograd.grad(top, student)
    assert torch.allclose(g_full, g_top, atol=1e-6)
    # a peaked teacher: a few tokens carry almost all of the mass, the top-8 KL is close to the full one
    teacher = torch.randn(2, 5, 40) + 12 * torch.nn.functional.one_hot(torch.randint(0, 40, (2, 5)), 40)
    values, indices = teacher.topk(8, dim=-1)
    full = SoftTargetLoss(tau=1.0)(student, teacher)
    assert torch.allclose(full, topk_kl(student, TopKLogits(values, indices), tau=1.0), rtol=0.05)


@pytest.fixture(scope="module")
def llama(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tokenizer = make_tokenizer(data_dir, root / "tok")
    return root, make_teacher("llama-gqa", root / "llama", tokenizer), data_dir


def test_cached_outputs_equal_the_live_teacher_and_a_killed_build_resumes(llama):
    root, folder, _ = llama
    teacher = load_teacher(str(folder))
    student = BiSpikCLMConfig.from_teacher_config(teacher.config, num_attention_heads=2, num_key_value_heads=1,
                                                  num_hidden_layers=1, max_position_embeddings=32)
    spad = SpADLoss(student, teacher.config)
    spec = CacheSpec.for_loss(spad, student, teacher.config, top_k=16)
    assert spec.hidden_layers == [0, 2] and spec.attention_layers == [2] and spec.average_heads
    seqs = torch.randint(0, teacher.config.vocab_size, (10, 32), generator=torch.Generator().manual_seed(1))
    cache = TeacherCache.build(teacher, seqs, root / "c", spec, "llama", batch_size=4, progress=False)
    live = teacher_forward(teacher, seqs[[7, 2]])
    got = cache.outputs([7, 2])
    values, indices = live.logits.topk(16, dim=-1)
    assert torch.equal(got.logits.indices, indices)
    assert torch.allclose(got.logits.values, values, rtol=2e-3, atol=2e-3)
    for j in (0, 2):
        assert torch.allclose(got.hidden_states[j], live.hidden_states[j], rtol=2e-3, atol=2e-3)
    assert got.hidden_states[1] is None
    assert torch.allclose(got.attentions[1], live.attentions[1].mean(1, keepdim=True), atol=1e-3)

    # a build killed after its first batch: meta says 4 done; what follows is garbage and gets rewritten
    before = {name: np.load(root / "c" / f"{name}.npy").copy() for name in ("topk_values", "hidden", "attentions")}
    meta = json.loads((root / "c" / "meta.json").read_text())
    (root / "c" / "meta.json").write_text(json.dumps({**meta, "done": 4}))
    hidden = np.load(root / "c" / "hidden.npy", mmap_mode="r+")
    hidden[4:] = 0
    hidden.flush()
    with pytest.raises(UserError, match="incomplete"):
        TeacherCache(root / "c")
    TeacherCache.build(teacher, seqs, root / "c", spec, "llama", batch_size=4, progress=False)
    for name, array in before.items():
        assert np.array_equal(np.load(root / "c" / f"{name}.npy"), array)
    with pytest.raises(UserError, match="other sequences"):
        TeacherCache.build(teacher, seqs.flip(0), root / "c", spec, "llama", progress=False)
    with pytest.raises(UserError, match="other training sequences"):
        cache.check(seqs[:5], spec)


def test_training_from_the_cache_follows_training_from_the_teacher(llama):
    """With every token kept (top_k = vocabulary), the cached run's losses track the live run's (float16 storage
    is the only difference); a second student reuses the cache without running the teacher."""
    root, teacher, data_dir = llama
    recipe = write_recipe(root / "live.yaml", teacher, data_dir, tokens=4 * 32 * 6, eval_batches=2)
    values = yaml.safe_load(recipe.read_text())
    values["data"]["train"]["max_tokens"] = 4 * 32 * 6
    recipe.write_text(yaml.safe_dump(values))
    cached = root / "cached.yaml"
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    cached.write_text(yaml.safe_dump({**values, "teacher_cache": {"folder": str(root / "tc"), "top_k": vocab}}))
    for name, path in (("live", recipe), ("cached", cached)):
        done = cli("train", str(path), "--out", str(root / name))
        assert done.returncode == 0, done.stderr

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    live, cached_losses = losses(root / "live"), losses(root / "cached")
    assert len(live) == len(cached_losses) == 6
    assert np.allclose(live, cached_losses, rtol=1e-2), (live, cached_losses)
    assert json.loads((root / "tc" / "meta.json").read_text())["done"] == 6 * 4

    ann = root / "ann.yaml"
    ann.write_text(yaml.safe_dump({**yaml.safe_load(cached.read_text()), "student": {"kind": "ann"}}))
    done = cli("train", str(ann), "--out", str(root / "ann"))
    assert done.returncode == 0, done.stderr
    assert "teacher cache" not in done.stderr    # reused: no new teacher pass
