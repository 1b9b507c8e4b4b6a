"""A real learning test: plain cross-entropy on WikiText-2 must beat a unigram model on held-out text."""

import collections
import math

import torch

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM

CONTEXT, BATCH, STEPS = 64, 16, 400


def unigram_perplexity(train: torch.Tensor, held_out: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held_out].mean().item())


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    windows = ids[: len(ids) // CONTEXT * CONTEXT].view(-1, CONTEXT)
    losses = [model(w, labels=w, use_cache=False).loss for w in windows.split(32)]
    return math.exp(torch.stack(losses).mean().item())


def test_cross_entropy_training_beats_unigram(wikitext_word_ids):
    train, valid, vocab = wikitext_word_ids
    valid = valid[: 64 * CONTEXT]
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset("tiny", vocab_size=vocab, time_steps=2))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=STEPS, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        starts = torch.randint(0, len(train) - CONTEXT, (BATCH,), generator=gen)
        batch = torch.stack([train[s:s + CONTEXT] for s in starts.tolist()])
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    model.eval()
    student = perplexity(model, valid)
    # the unigram model scores the same predicted tokens (every window position but the first)
    targets = valid[: len(valid) // CONTEXT * CONTEXT].view(-1, CONTEXT)[:, 1:].reshape(-1)
    unigram = unigram_perplexity(train, targets, vocab)
    print(f"held-out perplexity: student {student:.1f}, unigram {unigram:.1f}")
    assert student < 0.75 * unigram
