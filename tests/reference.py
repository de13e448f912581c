"""The transformers reference: stock GraniteSpeechForConditionalGeneration, one audio at a time."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

from granite_speech_triton.model.audio import Framing, LogMelFrontEnd

# The model card's instructions, written out here independently of prompts.py.
CARD_INSTRUCTIONS = {
    "asr": "can you transcribe the speech into a written format?",
    "asr_punct": "transcribe the speech with proper punctuation and capitalization.",
    "translate_fr": "translate the speech to French.",
    "translate_en_punct": "translate the speech to English with proper punctuation and capitalization.",
}


@lru_cache(maxsize=2)
def load_reference(checkpoint: Path):
    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    return model, AutoTokenizer.from_pretrained(str(checkpoint))


def reference_generate(checkpoint: Path, audio: np.ndarray, instruction: str, max_new_tokens: int) -> list[int]:
    """New token ids of greedy `generate` for one audio (features from the torchaudio-exact front end)."""
    model, tokenizer = load_reference(checkpoint)
    features = LogMelFrontEnd(Framing.AR)(torch.from_numpy(audio))[None]  # [1, frames, 160]
    n_audio = 3 * -(-features.shape[1] // 15)
    chat = [{"role": "user", "content": "<|audio|>" + instruction}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt.replace("<|audio|>", "<|audio|>" * n_audio), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            input_features=features,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
    return out[0, ids.shape[1] :].tolist()
