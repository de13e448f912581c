"""An independent implementation of IBM's decoding of granite-speech-4.1-2b (MODEL_SPEC.md 3b), for tests.

Built only from transformers' modules (the composite model's encoder, projector and language model,
wrapped as GraniteForCausalLM with the composite's LM head) and a plain torch.nn.Linear head loaded
from out_llm.safetensors: nothing from granite_speech_triton except the log-mel front end, which is
tested against torchaudio on its own. One request at a time, as IBM's script does for a batch of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from reference import load_reference
from safetensors.torch import load_file
from torch import nn
from transformers import GraniteForCausalLM

from granite_speech_triton.model.audio import Framing, LogMelFrontEnd

AUDIO_TOKEN = "<|audio|>"
ASR = "can you transcribe the speech into a written format?"
WINDOW = 4  # frames pooled per draft position


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]
    draft: list[int]  # the re-tokenised CTC draft
    entropy: float  # its largest per-frame entropy
    accepted: bool  # the cascade took the draft


@lru_cache(maxsize=2)
def causal_lm(checkpoint: Path) -> GraniteForCausalLM:
    """GraniteForCausalLM on the checkpoint's LLM weights: logits divided by logits_scaling."""
    model, _ = load_reference(checkpoint)
    lm = GraniteForCausalLM(model.config.text_config)
    lm.model, lm.lm_head = model.model.language_model, model.lm_head
    return lm.eval()


@lru_cache(maxsize=2)
def ctc_head(checkpoint: Path) -> nn.Linear:
    tensors = load_file(Path(checkpoint) / "out_llm.safetensors")
    head = nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head.eval()


@torch.inference_mode()
def prompt_embeddings(
    checkpoint: Path, audio: np.ndarray, instruction: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ([1, L, D] prompt embeddings with the projector's rows, [1, T, 1024] final encoder state,
    [1, T] importance) for one audio."""
    model, tokenizer = load_reference(checkpoint)
    features = LogMelFrontEnd(Framing.AR)(torch.from_numpy(audio))[None]  # [1, frames, 160]
    encoder = model.model.encoder
    captured = {}
    middle = encoder.layers[encoder.num_layers // 2 - 1]
    hook = middle.register_forward_hook(lambda module, args, output: captured.__setitem__("mid", output))
    hidden = encoder(features).last_hidden_state  # [1, T, 1024]; the hook's tensor got the in-place add
    hook.remove()
    importance = 1.0 - torch.softmax(encoder.out(captured["mid"]).float(), dim=-1)[..., 0]  # [1, T]
    rows = model.model.projector(hidden)  # [1, n_audio, D]
    chat = [{"role": "user", "content": AUDIO_TOKEN + instruction}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text.replace(AUDIO_TOKEN, AUDIO_TOKEN * rows.shape[1]), return_tensors="pt")["input_ids"]
    return model.model.get_merged_audio_embeddings(ids, rows), hidden, importance


@torch.inference_mode()
def draft(checkpoint: Path, hidden: torch.Tensor, importance: torch.Tensor) -> tuple[list[int], float]:
    """Steps 2-3: pooled windows of 4 frames weighted by normalised importance, out_llm, greedy CTC,
    decoded and tokenised again; and the largest per-frame entropy."""
    _, tokenizer = load_reference(checkpoint)
    frames = hidden.shape[1]
    pooled = []
    for start in range(0, math.ceil(frames / WINDOW) * WINDOW, WINDOW):
        h = torch.zeros(WINDOW, hidden.shape[2])
        w = torch.zeros(WINDOW)
        n = min(WINDOW, frames - start)
        h[:n], w[:n] = hidden[0, start : start + n].float(), importance[0, start : start + n]
        pooled.append(((w / (w.sum() + 1e-8))[:, None] * h).sum(0))
    logits = ctc_head(checkpoint)(torch.stack(pooled)).float()  # [P, labels]
    probs = torch.softmax(logits, dim=-1)
    entropy = float((-(probs * torch.log_softmax(logits, dim=-1)).sum(-1)).max())
    labels, previous = [], None
    for label in probs.argmax(-1).tolist():
        if label != previous and label != 0:
            labels.append(label - 1)
        previous = label
    text = tokenizer.decode(labels)
    return tokenizer.encode(text.strip(), add_special_tokens=False), entropy


@torch.inference_mode()
def cascade(checkpoint: Path, audio: np.ndarray, max_new_tokens: int, confidence: float, beams: int,
            gate: float = 0.0) -> Decoded:  # fmt: skip
    """IBM's cascade for one audio: draft, one verification forward, beam search if rejected."""
    embeds, hidden, importance = prompt_embeddings(checkpoint, audio, ASR)
    ids, entropy = draft(checkpoint, hidden, importance)
    lm = causal_lm(checkpoint)
    if ids and entropy <= gate:
        return Decoded(ids, ids, entropy, True)
    if ids:
        draft_embeds = lm.model.embed_tokens(torch.tensor([ids]))
        logits = lm(inputs_embeds=torch.cat([embeds, draft_embeds], dim=1)).logits[0].float()  # [L + m, V]
        start = embeds.shape[1] - 1
        probs = torch.softmax(logits[start : start + len(ids)], dim=-1)
        if bool((probs[torch.arange(len(ids)), ids] >= confidence).all()):
            return Decoded(ids, ids, entropy, True)
    return Decoded(beam(checkpoint, embeds, beams, max_new_tokens), ids, entropy, False)


@torch.inference_mode()
def beam(checkpoint: Path, embeds: torch.Tensor, beams: int, max_new_tokens: int) -> list[int]:
    """GraniteForCausalLM.generate with beams on prompt embeddings: the reference of beam mode."""
    out = causal_lm(checkpoint).generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        num_beams=beams,
        early_stopping=True,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    return out[0].tolist()
