"""AR projector: BLIP-2 Q-Former over windows of encoder frames (MODEL_SPEC.md section 3).

Each window of `window_size` encoder frames is summarised by `num_queries` learned queries, so
[T, 1024] -> [num_queries * ceil(T / window_size), llm_hidden]. Windows never look at each
other, so a batch is just every request's windows concatenated: no padding between requests,
and each request's last window is zero-padded exactly as in the reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from .config import ARModelConfig, ARProjectorConfig, read_config_json
from .weights import load_module

if TYPE_CHECKING:
    from .nar import NARProjectorConfig


def split_windows(hidden: torch.Tensor, window: int) -> torch.Tensor:
    """[T, D] -> [ceil(T / window), window, D], zero-padding the tail."""
    num_windows = math.ceil(hidden.shape[0] / window)
    padded = F.pad(hidden, (0, 0, 0, num_windows * window - hidden.shape[0]))
    return padded.view(num_windows, window, hidden.shape[1])


def num_audio_tokens(encoder_frames: int, cfg: ARProjectorConfig) -> int:
    """Projector rows (= audio tokens in the prompt) for an utterance of `encoder_frames`."""
    return cfg.rows(encoder_frames)


def projector_config(checkpoint: Path, variant: str) -> ARProjectorConfig | NARProjectorConfig:
    """The checkpoint's projector config (variant 'ar' or 'nar'); its `rows(frames)` counts the audio
    rows the projector makes of `frames` encoder frames (the AUDIO_ROWS the feature extractor announces)."""
    from .nar import load_nar_config  # nar.py imports this module

    if variant == "nar":
        return load_nar_config(checkpoint).projector
    return ARModelConfig.from_dict(read_config_json(checkpoint)).projector


class QFormerProjector(nn.Module):
    """Encoder hidden states of several utterances -> audio embeddings for the LLM."""

    def __init__(self, cfg: ARProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(**cfg.qformer))
        self.linear = nn.Linear(cfg.hidden_size, cfg.llm_hidden_size)

    def forward(self, utterances: list[torch.Tensor]) -> list[torch.Tensor]:
        """[T_i, D_enc] per utterance -> [num_audio_tokens(T_i), D_llm] per utterance."""
        windows = [split_windows(h, self.cfg.window_size) for h in utterances]
        stacked = torch.cat(windows)  # [sum nb_i, window, D_enc]
        out = self.qformer(query_embeds=self.query, encoder_hidden_states=stacked, return_dict=True)
        rows = self.linear(out.last_hidden_state)  # [sum nb_i, num_queries, D_llm]
        sizes = [w.shape[0] for w in windows]
        return [r.reshape(-1, rows.shape[-1]) for r in rows.split(sizes)]


def load_projector(
    checkpoint: Path, cfg: ARProjectorConfig, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> QFormerProjector:
    """A QFormerProjector with the checkpoint's `projector.*` tensors, in eval mode."""
    return load_module(lambda: QFormerProjector(cfg), checkpoint, "projector.", device, dtype)
