"""One forward of transformers' Granite for the decoding engine: a packed prefill, or one decode step.

The runner knows nothing of requests' modes: a prefill takes token positions of interest per
sequence and returns their logits; a decode step takes each row's input token and returns every
row's logits. The KV pool rows the forwards read and fill are chosen by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GraniteForCausalLM

from .kv_cache import DecodeWriter, KVPool, PrefillWriter
from .nar import PackedLayout


@dataclass(frozen=True)
class PrefillInput:
    """One sequence of a packed prefill: what to embed, which KV row to fill, which logits to return."""

    prompt_ids: list[int]
    audio_embeds: torch.Tensor  # [n_audio_tokens, D], in place of the prompt's audio tokens
    extra_ids: list[int]  # tokens after the prompt (a draft to verify), embedded as tokens
    row: int
    logit_positions: list[int]  # positions within this sequence whose next-token logits are wanted


class GraniteRunner:
    """transformers' GraniteForCausalLM driven by the engine over a KV row pool."""

    def __init__(self, llm: GraniteForCausalLM, audio_token_index: int, pool: KVPool) -> None:
        self.llm = llm
        self.audio_token_index = audio_token_index
        self.pool = pool

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def embed(self, item: PrefillInput) -> torch.Tensor:
        """[L + E] ids -> [L + E, D] embeddings, audio rows in place of the prompt's audio tokens."""
        ids = torch.tensor(item.prompt_ids + item.extra_ids, device=self.device)
        is_audio = torch.zeros_like(ids, dtype=torch.bool)
        is_audio[: len(item.prompt_ids)] = ids[: len(item.prompt_ids)] == self.audio_token_index
        embeds = self.llm.get_input_embeddings()(torch.where(is_audio, 0, ids))
        embeds[is_audio] = item.audio_embeds.to(embeds.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prefill(self, items: list[PrefillInput]) -> list[torch.Tensor]:
        """Sequences packed into one [1, sum L] forward -> logits [P_i, vocab] per sequence at its
        `logit_positions`; fills each sequence's KV row with all of its positions."""
        lengths = [len(i.prompt_ids) + len(i.extra_ids) for i in items]
        embeds = torch.cat([self.embed(item) for item in items])[None]  # [1, T, D]
        layout = PackedLayout.from_lengths(lengths, self.device)
        ids = layout.sequence_ids[0]
        order = torch.arange(ids.shape[0], device=self.device)
        mask = (ids[:, None] == ids[None, :]) & (order[:, None] >= order[None, :])  # [T, T] block-diagonal causal
        starts = layout.cu_seqlens[:-1].tolist()
        keep = torch.tensor([s + p for s, i in zip(starts, items, strict=True) for p in i.logit_positions])
        writer = PrefillWriter(self.pool, [i.row for i in items], lengths)
        logits = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask[None, None],
            position_ids=layout.position_ids,
            past_key_values=writer,
            use_cache=True,
            logits_to_keep=keep.to(self.device),
            packed_lengths=lengths,  # packed_attention.py: each prompt's attention alone (the mask is its meaning)
        ).logits[0]  # [sum P_i, vocab]
        writer.commit()
        return list(logits.split([len(i.logit_positions) for i in items]))

    @torch.inference_mode()
    def decode(self, tokens: list[int], audio_as_zero: list[bool]) -> torch.Tensor:
        """Each row's input token (rows 0..n-1) -> logits [n, vocab]; appends one position to each row.

        A generated audio placeholder is embedded as token 0 where `audio_as_zero` says so, as the
        composite model's generate does; GraniteForCausalLM.generate embeds it as itself.
        """
        writer = DecodeWriter(self.pool, len(tokens))
        ids = torch.tensor(tokens, device=self.device)
        zero = torch.tensor(audio_as_zero, device=self.device) & (ids == self.audio_token_index)
        logits = self.llm(
            input_ids=torch.where(zero, 0, ids)[:, None],  # [n, 1]
            attention_mask=writer.attention_mask(),
            position_ids=writer.positions[:, None],
            past_key_values=writer,
            use_cache=True,
        ).logits[:, -1]  # [n, vocab]
        writer.commit()
        return logits
