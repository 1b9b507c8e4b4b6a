"""Perplexity: our tool against a direct computation from the model's loss; window bookkeeping; chunked SFSA."""

import math

import pytest
import torch

from helpers import eval_models
from bispikclm.checkpoints import load_pretrained
from bispikclm.evaluation.perplexity import encode_corpus, perplexity, wikitext2_text, windows


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory):
    return eval_models(data_dir, tmp_path_factory.mktemp("eval-ppl"))


@pytest.mark.parametrize("variant", ["raw", "tokenized"])
def test_hf_perplexity_equals_direct_loss(folders, data_dir, variant):
    model, tokenizer = load_pretrained(str(folders[0]))
    ids = encode_corpus(tokenizer, wikitext2_text(variant, data_dir))[:6000]
    ours = perplexity(model, ids, 512, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), 512):
            window = ids[begin:begin + 512][None]
            if window.shape[1] > 1:
                loss = model(input_ids=window, labels=window, use_cache=False).loss
                total, count = total + float(loss) * (window.shape[1] - 1), count + window.shape[1] - 1
    assert ours.tokens == count
    assert ours.perplexity == pytest.approx(math.exp(total / count), rel=1e-3)


def test_sliding_windows_score_every_token_once():
    for length, context, stride in [(1000, 128, 128), (1000, 128, 32), (129, 128, 100), (7, 8, 3)]:
        scored = [j for _, end, first in windows(length, context, stride) for j in range(first, end)]
        assert all(end - begin <= context and first > begin for begin, end, first in windows(length, context, stride))
        assert len(scored) == len(set(scored))
        if stride < context:
            assert sorted(scored) == list(range(1, length))
        else:
            assert len(scored) == length - len(windows(length, context, stride))


def test_sliding_stride_scores_every_token(folders, data_dir):
    """With a sliding stride every token but the first is scored; non-overlapping windows skip window starts."""
    model, tokenizer = load_pretrained(str(folders[0]))
    ids = encode_corpus(tokenizer, wikitext2_text("raw", data_dir))[:3000]
    full = perplexity(model, ids, 256, progress=False)
    sliding = perplexity(model, ids, 256, stride=64, batch_size=4, progress=False)
    assert sliding.tokens == ids.numel() - 1 > full.tokens
    assert sliding.windows > full.windows


def test_student_chunked_attention_is_exact(folders, data_dir):
    """Query chunks (bounded memory) give the same binary maps, so the same perplexity and firing rate."""
    whole, tokenizer = load_pretrained(str(folders[1]))
    chunked, _ = load_pretrained(str(folders[1]), attn_chunk_size=64)
    ids = encode_corpus(tokenizer, wikitext2_text("raw", data_dir))[:1500]
    a = perplexity(whole, ids, 512, progress=False)
    b = perplexity(chunked, ids, 512, progress=False)
    assert chunked.model.layers[0].self_attn.chunk_size == 64
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)
    assert a.firing_rate == pytest.approx(b.firing_rate, rel=1e-9) and 0 < a.firing_rate < 1
