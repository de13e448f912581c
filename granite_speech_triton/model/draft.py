"""CTC drafts of the encoder: posterior-weighted pooling, then greedy CTC, one implementation for both models.

    final hidden [B, T, D] --pool windows of 4 frames, weighted by non-blank probability--> [B, ceil(T/4), D]
                           --BPE CTC head--> greedy CTC: argmax, collapse repeats, drop the blank

NAR (MODEL_SPEC.md section 4): the head is `out_bpe` over LLM token ids, blank = end of text; the
weights are 1 - the blank probability of the self-conditioning logits.
AR (section 3b, IBM's cascade): the head is `out_llm` from out_llm.safetensors (label 0 = blank,
label i = LLM token i - 1); the weights are 1 - the blank probability of the char-CTC head `out`
applied to layer 8's state after the self-conditioning add. Its draft also reports the largest
per-frame entropy of the head's distribution (the cascade's optional gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .config import EncoderConfig
from .ctc import ctc_collapse_segments
from .encoder import ConformerEncoder, EncoderOutput, frame_mask
from .weights import load_module

POOLING_EPS = 1e-8  # keeps an all-blank window's weights finite
CHAR_CTC_BLANK = 0  # blank label of the encoder's character CTC head (`out`)
OUT_LLM_FILE = "out_llm.safetensors"  # the AR checkpoint's BPE CTC head
OUT_LLM_BLANK = 0  # label 0 is the blank; label i is LLM token i - 1


def posterior_weighted_pool(
    hidden: torch.Tensor, keep_prob: torch.Tensor, lengths: torch.Tensor, window: int
) -> torch.Tensor:
    """Pool windows of `window` frames, weighting each frame by its normalised non-blank probability.

    hidden [B, T, D], keep_prob [B, T] (1 - blank probability), lengths [B] -> [B, ceil(T / window), D].
    Frames past an utterance's length weigh nothing and read as zeros, exactly like the zero-padded
    tail of that utterance alone.
    """
    bsz, num_frames, dim = hidden.shape
    mask = frame_mask(lengths, num_frames)  # [B, T]
    keep_prob = keep_prob.masked_fill(~mask, 0.0)
    hidden = hidden.masked_fill(~mask.unsqueeze(-1), 0.0)
    pad = -num_frames % window
    hidden = F.pad(hidden, (0, 0, 0, pad)).view(bsz, -1, window, dim)  # [B, P, W, D]
    keep_prob = F.pad(keep_prob, (0, pad)).view(bsz, -1, window)  # [B, P, W]
    weights = keep_prob / (keep_prob.sum(dim=-1, keepdim=True) + POOLING_EPS)
    return (hidden * weights.unsqueeze(-1)).sum(dim=2)  # [B, P, D]


def pooled_rows(
    hidden: torch.Tensor, keep_prob: torch.Tensor, lengths: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every utterance's pooled rows back to back [sum P_i, D] (in hidden's dtype; pooled in float32),
    and P_i = ceil(length_i / window) [B]: padding never reaches the CTC head. Tensors only (the
    export traces it)."""
    pooled = posterior_weighted_pool(hidden.float(), keep_prob, lengths, window).to(hidden.dtype)
    pooled_lengths = (lengths + window - 1) // window  # [B]
    return pooled[frame_mask(pooled_lengths, pooled.shape[1])], pooled_lengths


@dataclass(frozen=True)
class Draft:
    """One request's CTC draft: LLM token ids and the largest per-frame entropy of its head."""

    ids: list[int]
    max_entropy: float


def ar_pooled_rows(
    encoder: ConformerEncoder, out: EncoderOutput, lengths: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """The AR draft's pooled rows [sum P_i, D] and P_i, from an encoder batch run with keep_hidden_states=True."""
    cfg = encoder.cfg
    mid = out.hidden_states[cfg.self_conditioning_layer]  # after the self-conditioning add
    importance = 1.0 - torch.softmax(encoder.out(mid).float(), dim=-1)[..., CHAR_CTC_BLANK]  # [B, T]
    rows, pooled_lengths = pooled_rows(out.last_hidden_state, importance, lengths, cfg.bpe_pooling_window)
    return rows, pooled_lengths.tolist()


def drafts_from_rows(head: nn.Linear, rows: torch.Tensor, pooled_lengths: list[int]) -> list[Draft]:
    """The AR draft of each utterance whose pooled rows lie back to back in `rows` [sum P_i, D]."""
    logits = head(rows).float()  # [sum P, labels]
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1)  # [sum P]
    labels = ctc_collapse_segments(probs.argmax(dim=-1), pooled_lengths, OUT_LLM_BLANK)
    entropies = entropy.split(pooled_lengths)
    return [
        Draft([label - 1 for label in ids], float(e.max()) if e.numel() else 0.0)
        for ids, e in zip(labels, entropies, strict=True)
    ]


def ar_drafts(encoder: ConformerEncoder, head: nn.Linear, out: EncoderOutput, lengths: torch.Tensor) -> list[Draft]:
    """The AR draft of each utterance of an encoder batch run with keep_hidden_states=True."""
    return drafts_from_rows(head, *ar_pooled_rows(encoder, out, lengths))


def load_draft_head(
    checkpoint: Path, cfg: EncoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Linear | None:
    """`out_llm` of an AR checkpoint (hidden -> labels), or None when the checkpoint has none."""
    if not (Path(checkpoint) / OUT_LLM_FILE).is_file():
        return None
    with safe_open(Path(checkpoint) / OUT_LLM_FILE, framework="pt") as f:
        labels = f.get_slice("weight").get_shape()[0] if "weight" in f.keys() else 0  # noqa: SIM118
    return load_module(lambda: nn.Linear(cfg.hidden_dim, labels), checkpoint, "", device, dtype, filename=OUT_LLM_FILE)
