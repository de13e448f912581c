"""CTC forced alignment: where each word of a finished transcript lies in its audio (Viterbi, in torch).

    pooled rows [P, D] --CTC head, only the blank and the transcript's labels--> scores [P, 1 + U]
    scores --Viterbi over (blank, t1, blank, t2, ..., tL, blank)--> each token's first and last frame
    token bytes --word starts: a space, or a CJK character--> words, each with its start and end time

The rows are the ones the encoder pools for its CTC draft (`draft.py`): one row per window of
`bpe_pooling_window` encoder frames of 20 ms, so one frame is 80 ms with the 4.1 checkpoints and
every time this module gives is a multiple of 80 ms. NAR aligns with its draft head `out_bpe` (label =
token id, blank = end of text); AR with `out_llm` (label = token id + 1, blank = label 0).

Scores are the head's logits, not log-probabilities: the softmax subtracts the same normaliser from
every label of a frame, and every path takes exactly one label per frame, so all paths shift by the
same sum and the best path is unchanged. That spares the [P, vocabulary] matmul: only the columns
of the blank and the transcript's own labels are computed.

A CTC path needs one frame per token plus a blank between two equal neighbours. A transcript
with more tokens than that (rare: fast speech, or a model that repeats itself) is aligned on frames
split into equal parts first, each part a frame of its own; its times then have the finer step.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .audio import HOP_LENGTH, SAMPLE_RATE, STACK
from .config import ARModelConfig, read_config_json
from .draft import OUT_LLM_BLANK, load_draft_head
from .errors import RequestError
from .nar import load_nar_bpe_head, load_nar_config

ENCODER_FRAME_SECONDS = STACK * HOP_LENGTH / SAMPLE_RATE  # 20 ms per encoder frame


def frame_seconds(pooling_window: int) -> float:
    """Duration of one pooled row: `pooling_window` encoder frames (80 ms for the 4.1 checkpoints)."""
    return pooling_window * ENCODER_FRAME_SECONDS


def min_frames(targets: Sequence[int]) -> int:
    """Frames a CTC path needs to read `targets`: one per token, plus a blank between equal neighbours."""
    return len(targets) + sum(a == b for a, b in zip(targets, targets[1:], strict=False))


def forced_align(scores: torch.Tensor, targets: Sequence[int], blank: int) -> list[tuple[int, int]]:
    """The best CTC path that reads exactly `targets`: (first frame, last frame) of each target.

    scores [T, C] (log-probabilities, or logits: see the module docstring); targets are column
    indices, none of them `blank`. ValueError when T < min_frames(targets).
    """
    num_frames = scores.shape[0]
    if num_frames < min_frames(targets):
        raise ValueError(f"{len(targets)} targets need {min_frames(targets)} frames, got {num_frames}")
    if not targets:
        return []
    tokens = torch.tensor(list(targets), dtype=torch.long)
    num_states = 2 * len(targets) + 1  # blank, t1, blank, t2, ..., tL, blank
    states = torch.full((num_states,), blank, dtype=torch.long)
    states[1::2] = tokens
    emit = scores.float()[:, states]  # [T, S]
    # t_{i-1} -> t_i may skip the blank between them unless the two are equal
    skip_cost = torch.full((num_states,), -math.inf)
    skip_cost[3::2] = torch.where(tokens[1:] != tokens[:-1], 0.0, -math.inf)
    best = torch.full((num_states + 2,), -math.inf)  # two unreachable states before the first
    best[2:4] = emit[0, :2]
    back = torch.zeros((num_frames, num_states), dtype=torch.uint8)  # states moved on: 0, 1 or 2
    for t in range(1, num_frames):  # elementwise ops only: small reductions stall on busy thread pools
        stay, step, skip = best[2:], best[1:-1], best[:-2] + skip_cost
        kept = torch.maximum(stay, step)
        back[t] = (step > stay).to(torch.uint8).masked_fill_(skip > kept, 2)
        best[2:] = torch.maximum(kept, skip) + emit[t]
    best = best[2:]
    state = num_states - 1 if best[-1] >= best[-2] else num_states - 2
    spans: list[list[int]] = [[-1, -1] for _ in targets]
    for t, moves in zip(range(num_frames - 1, -1, -1), reversed(back.tolist()), strict=True):
        if state % 2:
            span = spans[state // 2]
            span[0], span[1] = t, (t if span[1] < 0 else span[1])
        state -= moves[state]
    return [(first, last) for first, last in spans]


# ---- words ------------------------------------------------------------------------------------


@cache
def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins back to bytes: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def token_bytes(tokenizer, token_ids: Sequence[int]) -> list[bytes]:
    """What each token adds to the decoded text (special tokens add nothing, as when decoding)."""
    special = set(tokenizer.all_special_ids)
    table = byte_decoder()
    pieces = []
    for token_id, token in zip(token_ids, tokenizer.convert_ids_to_tokens(list(token_ids)), strict=True):
        if token_id in special or token is None:
            pieces.append(b"")
        elif all(c in table for c in token):
            pieces.append(bytes(table[c] for c in token))
        else:  # an added token that is not byte-level encoded: its text as it is
            pieces.append(token.encode("utf-8"))
    return pieces


def is_word_character(char: str) -> bool:
    """A character that is a word of its own: CJK ideographs, kana, hangul (wide, not punctuation)."""
    return unicodedata.east_asian_width(char) in ("W", "F") and not unicodedata.category(char).startswith("P")


def starts_word(text: bytes, offset: int) -> bool:
    """Whether the character at byte `offset` of `text` begins a word: a space, or a CJK character."""
    lead = text[offset]
    if lead < 0x80:
        return chr(lead).isspace()
    if lead < 0xC0:  # inside a character: a token that starts there cannot start a word
        return False
    length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    char = text[offset : offset + length].decode("utf-8", errors="replace")[:1]
    return is_word_character(char)


def word_spans(pieces: Sequence[bytes]) -> list[tuple[int, int]]:
    """Token index ranges [start, end) of the words; tokens that add no visible text join the next word."""
    text = b"".join(pieces)
    spans, start, offset, has_text = [], 0, 0, False
    for i, piece in enumerate(pieces):
        if piece and has_text and starts_word(text, offset):
            spans.append((start, i))
            start, has_text = i, False
        has_text = has_text or bool(piece.strip())
        offset += len(piece)
    if pieces:
        spans.append((start, len(pieces)))
    return spans


# ---- the aligner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTCLabels:
    """How LLM token ids map onto a CTC head's labels: label = token id + offset."""

    blank: int
    offset: int


@dataclass(frozen=True)
class AlignedWord:
    text: str  # as decoded, leading space included: the words joined are the transcript
    start_s: float
    end_s: float
    num_tokens: int  # the words' token counts add up to the transcript's


class CTCAligner:
    """A checkpoint's BPE CTC head and tokenizer: (pooled rows, token ids) -> timed words."""

    def __init__(self, head: nn.Linear, labels: CTCLabels, tokenizer, frame_s: float) -> None:
        self.head = head
        self.labels = labels
        self.tokenizer = tokenizer
        self.frame_s = frame_s

    @torch.inference_mode()
    def align(self, rows: torch.Tensor, token_ids: Sequence[int]) -> list[AlignedWord]:
        """rows [P, D] of one utterance, its transcript's token ids -> its words with their times."""
        if not token_ids:
            return []
        labels = [int(t) + self.labels.offset for t in token_ids]
        if any(not 0 <= label < self.head.out_features or label == self.labels.blank for label in labels):
            raise RequestError(f"TOKEN_IDS holds ids outside the CTC head's vocabulary ({self.head.out_features})")
        if rows.shape[0] == 0:
            raise RequestError("no pooled encoder rows to align the transcript with")
        columns = [self.labels.blank, *dict.fromkeys(labels)]  # blank first, then each label once
        index = {label: i for i, label in enumerate(columns)}
        targets = [index[label] for label in labels]
        weight, bias = self.head.weight[columns], self.head.bias[columns]
        # [P, 1 + U]; the Viterbi runs on the CPU: one small step per frame is no work for a GPU
        scores = F.linear(rows.to(weight.device, weight.dtype), weight, bias).float().cpu()
        split = -(-min_frames(targets) // scores.shape[0])  # parts per frame: 1 unless there are too few
        spans = forced_align(scores.repeat_interleave(split, dim=0), targets, 0)
        return self.words(token_ids, spans, self.frame_s / split)

    def words(self, token_ids: Sequence[int], spans: list[tuple[int, int]], step_s: float) -> list[AlignedWord]:
        pieces = token_bytes(self.tokenizer, token_ids)
        return [
            AlignedWord(
                b"".join(pieces[start:end]).decode("utf-8", errors="replace"),
                spans[start][0] * step_s,
                (spans[end - 1][1] + 1) * step_s,
                end - start,
            )
            for start, end in word_spans(pieces)
        ]


def load_aligner(
    checkpoint: Path, variant: str, tokenizer, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> CTCAligner | None:
    """The aligner of an AR (`out_llm.safetensors`) or NAR (`out_bpe`) checkpoint; None when an AR
    checkpoint has no out_llm.safetensors."""
    if variant == "nar":
        cfg = load_nar_config(checkpoint)
        head = load_nar_bpe_head(checkpoint, cfg, device, dtype)
        return CTCAligner(
            head, CTCLabels(cfg.blank_token_id, 0), tokenizer, frame_seconds(cfg.encoder.bpe_pooling_window)
        )
    encoder_cfg = ARModelConfig.from_dict(read_config_json(checkpoint)).encoder
    head = load_draft_head(checkpoint, encoder_cfg, device, dtype)
    if head is None:
        return None
    labels = CTCLabels(OUT_LLM_BLANK, 1)
    return CTCAligner(head, labels, tokenizer, frame_seconds(encoder_cfg.bpe_pooling_window))
