"""AR decoder: Granite LLM with audio embeddings spliced into the prompt, batched greedy search.

The LLM itself is transformers' GraniteForCausalLM (layers, rotary embeddings, KV cache). This
module adds what a server needs: several prompts of different lengths decoded together
(left-padded, masked), and finished sequences dropped from the batch so they cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, DynamicCache, GenerationConfig, GraniteConfig, GraniteForCausalLM

from .config import ARModelConfig, read_config_json
from .errors import RequestError
from .prompts import SpeechRequest, build_prompt_ids
from .weights import load_component


@dataclass
class DecodeItem:
    """One request: prompt ids (audio placeholders included), its audio rows, a token budget."""

    prompt_ids: list[int]
    audio_embeds: torch.Tensor  # [n_audio_tokens, llm_hidden]
    max_new_tokens: int


class SpeechDecoder:
    """Greedy generation for a batch of prompts with audio, equal to one-at-a-time `generate`."""

    def __init__(self, llm: GraniteForCausalLM, audio_token_index: int, eos_token_ids: list[int]) -> None:
        self.llm = llm
        self.audio_token_index = audio_token_index
        self.eos = torch.tensor(eos_token_ids, device=llm.device)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def embed_prompt(self, item: DecodeItem) -> torch.Tensor:
        """[L] prompt ids -> [L, D] embeddings with audio rows in place of the audio tokens."""
        ids = torch.tensor(item.prompt_ids, device=self.device)
        is_audio = ids == self.audio_token_index
        if int(is_audio.sum()) != item.audio_embeds.shape[0]:
            raise ValueError(
                f"prompt has {int(is_audio.sum())} audio tokens but {item.audio_embeds.shape[0]} audio rows"
            )
        embeds = self.llm.get_input_embeddings()(torch.where(is_audio, 0, ids))
        embeds[is_audio] = item.audio_embeds.to(embeds.device, embeds.dtype)
        return embeds

    def _left_pad(self, items: list[DecodeItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> embeddings [B, L, D] left-padded with zeros, attention mask [B, L]."""
        embeds = [self.embed_prompt(item) for item in items]
        longest = max(e.shape[0] for e in embeds)
        batch = embeds[0].new_zeros(len(items), longest, embeds[0].shape[1])
        mask = torch.zeros(len(items), longest, dtype=torch.long, device=self.device)
        for row, e in enumerate(embeds):
            batch[row, longest - e.shape[0] :] = e
            mask[row, longest - e.shape[0] :] = 1
        return batch, mask

    @torch.inference_mode()
    def generate(self, items: list[DecodeItem]) -> list[list[int]]:
        """Greedy new tokens per item (the eos token included when produced), in input order."""
        inputs, mask = self._left_pad(items)
        budgets = torch.tensor([item.max_new_tokens for item in items], device=self.device)
        outputs: list[list[int]] = [[] for _ in items]
        active = torch.arange(len(items), device=self.device)  # original index of each live row
        cache = DynamicCache(config=self.llm.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        step_input = {"inputs_embeds": inputs}
        for step in range(1, max(item.max_new_tokens for item in items) + 1):
            logits = self.llm(
                **step_input,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]  # [B_live, vocab]
            tokens = logits.argmax(dim=-1)  # [B_live]
            for row, token in zip(active.tolist(), tokens.tolist(), strict=True):
                outputs[row].append(token)
            # every live row has produced `step` tokens
            done = torch.isin(tokens, self.eos) | (budgets[active] <= step)
            if bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                active, tokens, mask, positions = self._select(keep, active, tokens, mask, positions, cache)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
            # transformers embeds a generated audio placeholder as token 0, like those of the prompt
            step_input = {"input_ids": torch.where(tokens == self.audio_token_index, 0, tokens).unsqueeze(1)}
        return outputs

    @staticmethod
    def _select(keep, active, tokens, mask, positions, cache):
        """Keep only the `keep` rows of every per-row tensor and of the KV cache."""
        for layer in cache.layers:
            layer.batch_select_indices(keep)
        return active[keep], tokens[keep], mask[keep], positions[keep]


def load_llm(
    checkpoint: Path, text_config: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GraniteForCausalLM:
    """transformers' Granite LLM with the checkpoint's `language_model.*` tensors."""
    config = GraniteConfig.from_dict(text_config)
    llm = GraniteForCausalLM(config)
    if config.tie_word_embeddings:
        llm.tie_weights()
    load_component(llm, checkpoint, "language_model.")
    return llm.to(device=device, dtype=dtype).eval()


def eos_token_ids(checkpoint: Path, text_config: dict) -> list[int]:
    """The ids that end generation: generation_config.json's eos_token_id, else the LLM's."""
    path = checkpoint / "generation_config.json"
    eos = GenerationConfig.from_pretrained(str(checkpoint)).eos_token_id if path.is_file() else None
    if eos is None:
        eos = text_config.get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer(checkpoint: Path):
    """The checkpoint's own tokenizer (chat template and special tokens included).

    AutoTokenizer reads config.json too. For a model type transformers has no class for
    (granite_speech_nar) it falls back to a generic config and warns that the types differ; handed
    that same generic config, it loads the same tokenizer without the warning.
    """
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = read_config_json(checkpoint)
    config = None if values.get("model_type") in CONFIG_MAPPING else PreTrainedConfig.from_dict(values)
    return AutoTokenizer.from_pretrained(str(checkpoint), config=config)


@dataclass
class Transcript:
    text: str
    token_ids: list[int]


class PromptedDecoder:
    """Request options + audio embeddings -> text: prompt building, batched greedy, detokenising."""

    def __init__(self, decoder: SpeechDecoder, tokenizer, max_positions: int) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.max_positions = max_positions

    def prepare(self, request: SpeechRequest, audio_embeds: torch.Tensor) -> DecodeItem:
        """The request's prompt; RequestError if prompt plus budget exceed the LLM context."""
        ids = build_prompt_ids(self.tokenizer, request, audio_embeds.shape[0])
        if len(ids) + request.max_new_tokens > self.max_positions:
            raise RequestError(
                f"prompt ({len(ids)} tokens) plus MAX_NEW_TOKENS ({request.max_new_tokens}) exceeds the "
                f"model's {self.max_positions} positions: send shorter audio or fewer tokens"
            )
        return DecodeItem(ids, audio_embeds, request.max_new_tokens)

    def run(self, items: list[DecodeItem]) -> list[Transcript]:
        generated = self.decoder.generate(items)
        return [Transcript(self.tokenizer.decode(ids, skip_special_tokens=True), ids) for ids in generated]


def load_prompted_decoder(
    checkpoint: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> PromptedDecoder:
    """Tokenizer, Granite LLM and greedy decoder of an AR checkpoint."""
    config = ARModelConfig.from_dict(read_config_json(checkpoint))
    llm = load_llm(checkpoint, config.text, device, dtype)
    decoder = SpeechDecoder(llm, config.audio_token_index, eos_token_ids(checkpoint, config.text))
    return PromptedDecoder(decoder, load_tokenizer(checkpoint), llm.config.max_position_embeddings)
