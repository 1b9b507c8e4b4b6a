"""At initialization, on real WikiText-2 text, no neuron group is dead or saturated (METHOD §8)."""

import pytest
import torch

from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM


@pytest.mark.parametrize("preset, time_steps", [("tiny", 2), ("tiny", 4), ("opt-125m", 2), ("opt-125m", 4),
                                               ("smollm2-135m", 2)])
def test_no_dead_or_saturated_neuron_group_at_init(preset, time_steps, wikitext_word_ids):
    _, valid, _ = wikitext_word_ids
    torch.manual_seed(0)
    model = BiSpikCLMForCausalLM(BiSpikCLMConfig.from_preset(preset, time_steps=time_steps)).eval()
    ids = valid[: 2 * 256].view(2, 256)  # word ids < 4096 are valid in both vocabularies
    with torch.no_grad():
        rates = model(ids, use_cache=False, output_firing_rates=True).firing_rates
    per_block = 10 if model.config.ffn_type == "gated" else 9
    assert len(rates) == per_block * model.config.num_hidden_layers
    print(f"\n{preset} T={time_steps} firing rates at init:")
    for name, rate in rates.items():
        print(f"  {name:45s} {rate:.3f}")
    bad = {name: rate for name, rate in rates.items() if not 0.02 < rate < 0.95}
    assert not bad, f"dead or saturated at init: {bad}"
