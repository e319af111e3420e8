"""generate() with the KV cache and with left-padded batches gives the same tokens as without the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from peft import get_peft_model

from peft_isaerft import ISaeRFTConfig


@pytest.mark.parametrize("component", ["scale", "bias", "scale_bias"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_generate_with_and_without_cache_and_left_padding(arch, component, sae_factory) -> None:
    saes = [
        {"path": str(sae_factory(hook="blocks.1.hook_resid_post"))},
        {"path": str(sae_factory(hook="blocks.2.attn.hook_z", seed=3))},
    ]
    model = get_peft_model(make_model(arch), ISaeRFTConfig(saes=saes, component=component, init_weights=False))
    prompt = torch.tensor([[5, 9, 17, 23, 31, 8]])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        short = torch.tensor([[0, 0, 11, 12, 13, 14]])
        batch = torch.cat([prompt, short])
        mask = (batch != 0).long()
        batch_cached = model.generate(input_ids=batch, attention_mask=mask, use_cache=True, **kwargs)
        batch_uncached = model.generate(input_ids=batch, attention_mask=mask, use_cache=False, **kwargs)
        assert torch.equal(batch_cached, batch_uncached)
        assert torch.equal(batch_cached[0], cached[0])
        with model.disable_adapter():
            base_logits = model(cached).logits
        assert (model(cached).logits - base_logits).abs().max() > 1e-3
