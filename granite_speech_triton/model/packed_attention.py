"""Attention for the engine's packed prefill: each prompt attends to itself alone, one SDPA call each.

The engine prefills several prompts packed into one sequence. Their linear layers then multiply
many rows at once, but a block-diagonal mask over the whole pack makes attention cost the square
of the pack's length: on the 2-core CPU of docs/benchmarks.md, 16 prompts packed into 1780
positions took 190 ms per layer of masked SDPA against 25 ms one prompt at a time, about 6 s of
a 40-layer prefill. `packed_sdpa` is transformers' SDPA attention that, given `packed_lengths`,
runs each prompt's causal attention on its own (as transformers does for one prompt alone) and
ignores the mask; without it, as in a decode step, it is transformers' SDPA unchanged.

`use_packed_attention` registers it with transformers under `ATTENTION` and selects it in a
config; the LLM's forward passes `packed_lengths` through to every attention layer.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "granite_speech_packed_sdpa"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packed_lengths: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] -> [1, T, heads, d] (as SDPA's).

    With `packed_lengths` (summing to T) each segment is one prompt, attended causally alone."""
    if packed_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(
            query.split(packed_lengths, dim=2),
            key.split(packed_lengths, dim=2),
            value.split(packed_lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outputs, dim=1), None


def use_packed_attention(config: PretrainedConfig) -> PretrainedConfig:
    """Register `packed_sdpa` with transformers (idempotent) and select it in `config`; returns it."""
    AttentionInterface.register(ATTENTION, packed_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks of SDPA, which it runs
    config._attn_implementation = ATTENTION
    return config
