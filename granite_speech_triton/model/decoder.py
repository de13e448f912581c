"""AR decoder: request options and audio rows -> prompt -> the decoding engine -> text.

The LLM itself is transformers' GraniteForCausalLM (layers, rotary embeddings). `engine.py` runs
the greedy search for many requests at once (in-flight batching); this module builds each
request's prompt from the model card's instructions, checks it fits, and turns tokens into text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, GraniteConfig, GraniteForCausalLM

from .audio import SAMPLE_RATE, ar_encoder_length
from .config import ARModelConfig, read_config_json
from .draft import OUT_LLM_FILE, Draft
from .engine import DecodeEngine, EngineConfig, Mode, Sequence, engine_for
from .errors import RequestError
from .linear import use_rows_linears
from .packed_attention import use_packed_attention
from .projector import num_audio_tokens
from .prompts import DRAFT_MODES, SpeechRequest, build_prompt_ids
from .weights import load_module

PROMPT_ALLOWANCE = 256  # tokens of chat template, instruction and keywords around the audio tokens


def load_llm(
    checkpoint: Path, text_config: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GraniteForCausalLM:
    """transformers' Granite LLM with the checkpoint's `language_model.*` tensors, built without random init
    and loaded straight into `device` and `dtype`; its attention takes packed prefills (packed_attention.py)."""
    config = use_packed_attention(GraniteConfig.from_dict(text_config))
    llm = load_module(lambda: GraniteForCausalLM(config), checkpoint, "language_model.", device, dtype)
    if config.tie_word_embeddings:
        llm.tie_weights()
    return llm


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


class ARDecoder:
    """Request options, audio rows and the encoder's draft -> engine sequences; tokens -> text."""

    def __init__(self, engine: DecodeEngine, tokenizer, drafts_available: bool) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.drafts_available = drafts_available  # the checkpoint has a CTC draft head (out_llm)

    def sequence(
        self, request: SpeechRequest, audio_embeds: torch.Tensor, draft: Draft | None = None, **fields
    ) -> Sequence:
        """The request's engine sequence; RequestError if it cannot be served. `fields` set Sequence fields."""
        ids = build_prompt_ids(self.tokenizer, request, audio_embeds.shape[0])
        mode = Mode(request.decode_mode)
        if mode.value in DRAFT_MODES:
            if draft is None or not self.drafts_available:
                raise RequestError(
                    f"DECODE_MODE {mode.value} needs the encoder's CTC draft: the checkpoint has no "
                    f"{OUT_LLM_FILE} (or the encoder runs on the libtorch backend, which makes no drafts)"
                )
            fields |= {"draft_ids": self.draft_tokens(draft.ids), "draft_entropy": draft.max_entropy}
        seq = Sequence(
            ids,
            audio_embeds,
            request.max_new_tokens,
            mode=mode,
            num_beams=request.num_beams,
            confidence=request.confidence,
            entropy_gate=request.entropy_gate,
            **fields,
        )
        self.engine.check(seq)
        return seq

    def draft_tokens(self, ctc_ids: list[int]) -> list[int]:
        """The draft as the LLM would write it: its text, stripped, tokenized again (MODEL_SPEC.md 3b)."""
        text = self.tokenizer.decode(ctc_ids)
        return self.tokenizer.encode(text.strip(), add_special_tokens=False)

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def transcribe(self, requests: list[tuple[SpeechRequest, torch.Tensor, Draft | None]]) -> list[Transcript]:
        """In-process: decode every (options, audio rows, draft) to the end, together."""
        generated = self.engine.generate([self.sequence(r, e, d) for r, e, d in requests])
        return [Transcript(self.text(ids), ids) for ids in generated]


def positions_per_request(checkpoint: Path, max_audio_seconds: float, max_new_tokens: int) -> int:
    """KV positions that the longest allowed audio with the largest allowed budget needs."""
    config = ARModelConfig.from_dict(read_config_json(checkpoint))
    frames = ar_encoder_length(int(max_audio_seconds * SAMPLE_RATE))
    return num_audio_tokens(frames, config.projector) + PROMPT_ALLOWANCE + max_new_tokens


def load_ar_decoder(
    checkpoint: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    engine: EngineConfig = EngineConfig(),  # noqa: B008 (frozen dataclass)
    rows_kernel: bool = True,
) -> ARDecoder:
    """Tokenizer, Granite LLM and decoding engine of an AR checkpoint.

    A request may hold at most the model's context, whatever `engine.max_tokens_per_row` says.
    On the CPU the decode steps multiply with the rows kernel where it runs and `rows_kernel` asks
    for it, else with oneMKL (model/linear.py).
    """
    config = ARModelConfig.from_dict(read_config_json(checkpoint))
    llm = use_rows_linears(load_llm(checkpoint, config.text, device, dtype), rows_kernel)  # few-row products
    bounded = replace(engine, max_tokens_per_row=min(engine.max_tokens_per_row, llm.config.max_position_embeddings))
    decoding = engine_for(llm, config.audio_token_index, eos_token_ids(checkpoint, config.text), bounded)
    return ARDecoder(decoding, load_tokenizer(checkpoint), (Path(checkpoint) / OUT_LLM_FILE).is_file())
