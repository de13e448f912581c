"""The transformers reference for the AR model, used by the tests and the benchmark.

Stock `GraniteSpeechForConditionalGeneration` and its tokenizer, fed by our log-mel front end
(proven equal to torchaudio's, which transformers' feature extractor needs), one audio at a
time, greedy. The prompt is built here from the chat template and the model card's rule for the
number of audio tokens, independently of `model/prompts.py`, so the tests check that too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration

from .model.audio import Framing, LogMelFrontEnd

AUDIO_TOKEN = "<|audio|>"


class TransformersReference:
    """`generate(audio, instruction, max_new_tokens)` -> the new token ids of transformers' greedy search."""

    def __init__(self, checkpoint: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model = GraniteSpeechForConditionalGeneration.from_pretrained(str(checkpoint), dtype=dtype)
        self.model = self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        self.front_end = LogMelFrontEnd(Framing.AR, device)
        self.dtype = dtype
        config = self.model.config
        self.queries_per_window = config.window_size // config.downsample_rate
        self.window = config.window_size

    def prompt_ids(self, instruction: str, frames: int) -> torch.Tensor:
        """[1, prompt] ids with one audio token per projector row (3 per 15 encoder frames)."""
        chat = [{"role": "user", "content": AUDIO_TOKEN + instruction}]
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        n_audio = self.queries_per_window * math.ceil(frames / self.window)
        ids = self.tokenizer(text.replace(AUDIO_TOKEN, AUDIO_TOKEN * n_audio), return_tensors="pt")["input_ids"]
        return ids.to(self.model.device)

    @torch.inference_mode()
    def generate(self, audio: np.ndarray, instruction: str, max_new_tokens: int, streamer=None) -> list[int]:
        features = self.front_end(torch.from_numpy(audio)).to(self.dtype)[None]  # [1, frames, 160]
        ids = self.prompt_ids(instruction, features.shape[1])
        out = self.model.generate(
            input_ids=ids,
            input_features=features,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            streamer=streamer,
        )  # [1, prompt + new]
        return out[0, ids.shape[1] :].tolist()
