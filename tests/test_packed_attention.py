"""The packed prefill's attention: each prompt alone, whatever the mask says (model/packed_attention.py)."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from granite_speech_triton.model.decoder import load_ar_decoder
from granite_speech_triton.model.packed_attention import ATTENTION, packed_sdpa

LENGTHS = [5, 1, 9, 3]


class Attention(torch.nn.Module):
    """What SDPA reads from an attention layer: grouped KV heads, causal."""

    num_key_value_groups = 2
    is_causal = True


def qkv(total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    order = torch.arange(len(ids))
    return ((ids[:, None] == ids[None, :]) & (order[:, None] >= order[None, :]))[None, None]


def test_each_prompt_attends_to_itself_alone_as_the_block_diagonal_mask_says():
    query, key, value = qkv(sum(LENGTHS))
    module = Attention()
    packed, _ = packed_sdpa(module, query, key, value, None, packed_lengths=LENGTHS, scaling=0.3)
    masked, _ = sdpa_attention_forward(module, query, key, value, block_causal_mask(LENGTHS), scaling=0.3)
    assert packed.shape == masked.shape == (1, sum(LENGTHS), 4, 8)
    torch.testing.assert_close(packed, masked, rtol=1e-5, atol=1e-6)
    start = 0
    for n in LENGTHS:  # and each segment is exactly that prompt's causal attention alone
        alone, _ = sdpa_attention_forward(
            module, *(t[:, :, start : start + n] for t in (query, key, value)), None, scaling=0.3
        )
        assert torch.equal(packed[:, start : start + n], alone)
        start += n


def test_without_packed_lengths_it_is_transformers_sdpa():
    query, key, value = qkv(6)
    mask = torch.rand(1, 1, 6, 6) > 0.3
    mask[..., 0] = True
    module = Attention()
    assert torch.equal(
        packed_sdpa(module, query, key, value, mask)[0], sdpa_attention_forward(module, query, key, value, mask)[0]
    )


@pytest.fixture(scope="module")
def llm(tiny_ar_checkpoint):
    return load_ar_decoder(tiny_ar_checkpoint).engine.runner.llm


def test_the_engine_s_llm_uses_it_and_the_lengths_reach_every_layer(llm):
    assert llm.config._attn_implementation == ATTENTION
    torch.manual_seed(1)
    embeds = torch.randn(1, sum(LENGTHS), llm.config.hidden_size)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    causal = torch.ones(sum(LENGTHS), sum(LENGTHS), dtype=torch.bool).tril()[None, None]  # one long prompt
    with torch.inference_mode():
        packed = llm(inputs_embeds=embeds, attention_mask=causal, position_ids=positions, packed_lengths=LENGTHS).logits
        unpacked = llm(inputs_embeds=embeds, attention_mask=causal, position_ids=positions).logits
        start, alone = 0, []
        for n in LENGTHS:
            alone.append(llm(inputs_embeds=embeds[:, start : start + n]).logits)
            start += n
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed, unpacked, atol=1e-3), "the lengths, not the mask, decided"
