"""CTC forced alignment (model/align.py): optimal paths, word grouping, and timing accuracy.

The accuracy test plants the CTC head's scores from known word boundaries (espeak-ng words joined by
known silences): the tiny checkpoints have random weights, so their posteriors say nothing about
where a word is, and no real checkpoint is reachable here. What it measures is everything between
the head's scores and the reported times (Viterbi, label mapping, word grouping, frame bookkeeping),
with scores as clean as a perfect head's and as noisy as a head that is right on half the frames.
How well the real heads' peaks line up with words is not measured (docs/timestamps.md).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from granite_speech_triton.model.align import (
    CTCAligner,
    CTCLabels,
    forced_align,
    frame_seconds,
    min_frames,
    token_bytes,
    word_spans,
)
from granite_speech_triton.model.audio import ar_encoder_length
from granite_speech_triton.model.decoder import load_tokenizer
from granite_speech_triton.synth import spoken_words

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "band", "plays", "on"]
FRAME_S = frame_seconds(4)


def path_score(scores: torch.Tensor, spans: list[tuple[int, int]], targets: list[int], blank: int) -> float:
    labels = [blank] * scores.shape[0]
    for (first, last), target in zip(spans, targets, strict=True):
        labels[first : last + 1] = [target] * (last - first + 1)
    return float(sum(scores[t, label] for t, label in enumerate(labels)))


def best_path_score(scores: torch.Tensor, targets: list[int], blank: int) -> float:
    """Every label sequence of the frames that collapses to `targets`: the best one's score."""
    best = -math.inf
    for labels in itertools.product(range(scores.shape[1]), repeat=scores.shape[0]):
        runs = [label for i, label in enumerate(labels) if i == 0 or label != labels[i - 1]]
        if [label for label in runs if label != blank] == targets:
            best = max(best, float(sum(scores[t, label] for t, label in enumerate(labels))))
    return best


def test_viterbi_finds_the_best_path_of_every_small_case():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for frames, length in itertools.product(range(1, 7), range(1, 4)):
        for _ in range(3):
            targets = torch.randint(1, 4, (length,), generator=gen).tolist()
            if min_frames(targets) > frames:
                continue
            scores = torch.randn(frames, 4, generator=gen)
            spans = forced_align(scores, targets, 0)
            assert all(a <= b < c for (a, b), (c, _) in zip(spans, spans[1:], strict=False))
            assert path_score(scores, spans, targets, 0) == pytest.approx(best_path_score(scores, targets, 0), abs=1e-5)
            checked += 1
    assert checked > 30


def test_equal_neighbours_need_a_blank_between_them():
    scores = torch.zeros(3, 2)
    scores[:, 1] = 5.0  # the token everywhere: only the blank between the two copies separates them
    assert forced_align(scores, [1, 1], 0) == [(0, 0), (2, 2)]
    with pytest.raises(ValueError, match="need 3 frames"):
        forced_align(scores[:2], [1, 1], 0)
    assert min_frames([1, 1, 2, 2, 2]) == 8


def test_logits_and_log_probabilities_give_the_same_path():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 30, generator=gen) * 3
    targets = torch.randint(1, 30, (12,), generator=gen).tolist()
    assert forced_align(logits, targets, 0) == forced_align(torch.log_softmax(logits, dim=-1), targets, 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_ar_checkpoint):
    return load_tokenizer(tiny_ar_checkpoint)


def test_words_start_at_spaces_and_cjk_characters_and_join_to_the_text(tokenizer):
    text = " the quick brown fox, jumps 日本語です over"
    ids = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    ids += tokenizer.encode(" dog", add_special_tokens=False)
    pieces = token_bytes(tokenizer, ids)
    words = [b"".join(pieces[a:b]).decode() for a, b in word_spans(pieces)]
    assert words == [" the", " quick", " brown", " fox,", " jumps", " 日", "本", "語", "で", "す", " over", " dog"]
    assert "".join(words) == tokenizer.decode(ids, skip_special_tokens=True)
    assert sum(b - a for a, b in word_spans(pieces)) == len(ids)  # end of text joins the next word


def identity_aligner(tokenizer, labels: CTCLabels, size: int) -> CTCAligner:
    """An aligner whose head passes its rows through: rows are the planted scores."""
    head = nn.Linear(size, size)
    with torch.no_grad():
        head.weight.copy_(torch.eye(size))
        head.bias.zero_()
    return CTCAligner(head, labels, tokenizer, FRAME_S)


def planted_scores(tokenizer, bounds, frames: int, noise: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Scores of a head that hears each word's tokens over the word's frames and the blank elsewhere,
    plus N(0, noise) on every label; and the transcript's token ids (AR labels: token id + 1)."""
    size = len(tokenizer) + 1
    scores = torch.randn(frames, size, generator=torch.Generator().manual_seed(seed)) * noise
    planted = torch.zeros(frames, dtype=torch.long)  # blank
    ids = []
    for word, (start, end) in zip(WORDS, bounds, strict=True):
        tokens = tokenizer.encode(" " + word, add_special_tokens=False)
        first, last = math.floor(start / FRAME_S), math.ceil(end / FRAME_S) - 1
        span = last - first + 1
        for j, token in enumerate(tokens):
            planted[first + j * span // len(tokens) : first + (j + 1) * span // len(tokens)] = token + 1
        ids += tokens
    scores[torch.arange(frames), planted] += 3.0
    return scores, ids


@pytest.mark.parametrize(
    ("noise", "max_error_s", "mean_error_s"), [(0.0, FRAME_S, FRAME_S / 2), (1.0, 2 * FRAME_S, 0.06)]
)
def test_word_times_on_synthesised_speech_with_known_boundaries(tokenizer, noise, max_error_s, mean_error_s):
    """Words within one 80 ms frame of the truth with a perfect head; within two, and 60 ms on
    average, when the head's best label is wrong on about half the frames."""
    rng = np.random.default_rng(0)
    audio, bounds = spoken_words(WORDS, list(rng.uniform(0.05, 0.6, len(WORDS) + 1)))
    frames = -(-ar_encoder_length(audio.shape[0]) // 4)  # the pooled rows the AR encoder makes of it
    aligner = identity_aligner(tokenizer, CTCLabels(blank=0, offset=1), len(tokenizer) + 1)
    errors = []
    for seed in range(3):
        scores, ids = planted_scores(tokenizer, bounds, frames, noise, seed)
        words = aligner.align(scores, ids)
        assert [w.text.strip() for w in words] == WORDS
        errors += [abs(w.start_s - s) for w, (s, _) in zip(words, bounds, strict=True)]
        errors += [abs(w.end_s - e) for w, (_, e) in zip(words, bounds, strict=True)]
    print(f"noise {noise}: word boundary error mean {np.mean(errors) * 1000:.0f} ms, max {max(errors) * 1000:.0f} ms")
    assert max(errors) < max_error_s + 1e-6
    assert np.mean(errors) < mean_error_s


def test_nar_labels_map_token_ids_onto_the_draft_head(tokenizer):
    """NAR: label = token id and the blank is end of text; the same planted words come out."""
    blank = tokenizer.eos_token_id
    aligner = identity_aligner(tokenizer, CTCLabels(blank=blank, offset=0), len(tokenizer))
    ids = tokenizer.encode(" the lazy dog", add_special_tokens=False)
    scores = torch.zeros(3 * len(ids) + 1, len(tokenizer))
    scores[:, blank] = 1.0
    for i, token in enumerate(ids):
        scores[3 * i + 1, token] = 5.0  # token i at frame 3i + 1, blanks around it
    words = aligner.align(scores, ids)
    assert [w.text for w in words] == [" the", " lazy", " dog"]
    spans = word_spans(token_bytes(tokenizer, ids))
    assert [w.start_s for w in words] == pytest.approx([(3 * a + 1) * FRAME_S for a, _ in spans])
    assert [w.end_s for w in words] == pytest.approx([(3 * (b - 1) + 2) * FRAME_S for _, b in spans])
    aligner.head.to(torch.bfloat16)  # the GPU's dtype: float32 rows in, the same words out
    assert aligner.align(scores, ids) == words


def test_more_tokens_than_frames_split_the_frames(tokenizer):
    """A transcript longer than the audio allows is aligned on finer frames: ordered, inside the audio."""
    aligner = identity_aligner(tokenizer, CTCLabels(blank=0, offset=1), len(tokenizer) + 1)
    ids = tokenizer.encode(" the quick brown fox jumps over the lazy dog" * 2, add_special_tokens=False)
    scores = torch.randn(5, len(tokenizer) + 1, generator=torch.Generator().manual_seed(0))
    words = aligner.align(scores, ids)
    assert sum(w.num_tokens for w in words) == len(ids)
    assert all(0 <= w.start_s < w.end_s <= 5 * FRAME_S + 1e-9 for w in words)
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(words, words[1:], strict=False))
