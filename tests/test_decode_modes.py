"""Beam, cascade and speculative decoding in-process, against references built without our package.

beam:        GraniteForCausalLM.generate(num_beams=n, early_stopping=True) on the checkpoint's LLM;
cascade:     tests/cascade_reference.py, IBM's pipeline written out from transformers' modules;
speculative: transformers' greedy generate (it must be identical to greedy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from audio_samples import mixed_lengths
from cascade_reference import ASR, beam, cascade, prompt_embeddings
from reference import reference_generate

from granite_speech_triton.model.audio import Framing, LogMelFrontEnd
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.decoder import ARDecoder, load_ar_decoder
from granite_speech_triton.model.draft import Draft, ar_drafts, load_draft_head
from granite_speech_triton.model.encoder import load_encoder, pad_batch
from granite_speech_triton.model.engine import EngineConfig, Finish, speculative_tokens
from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.projector import load_projector
from granite_speech_triton.model.prompts import SpeechRequest

NEW_TOKENS = 20


class Pipeline:
    """Our encoder, draft head, projector and decoder, in-process (what the served steps run)."""

    def __init__(self, checkpoint: Path, **engine) -> None:
        cfg = ARModelConfig.from_dict(read_config_json(checkpoint))
        self.front_end = LogMelFrontEnd(Framing.AR)
        self.encoder = load_encoder(checkpoint, cfg.encoder)
        self.head = load_draft_head(checkpoint, cfg.encoder)
        self.projector = load_projector(checkpoint, cfg.projector)
        self.decoder: ARDecoder = load_ar_decoder(checkpoint, engine=EngineConfig(**engine))

    @torch.inference_mode()
    def encode(self, audios: list[np.ndarray]) -> list[tuple[torch.Tensor, Draft]]:
        """Audio rows and CTC draft of each audio, encoded as one padded batch."""
        padded, lengths = pad_batch([self.front_end(torch.from_numpy(a)) for a in audios])
        out = self.encoder(padded, lengths, keep_hidden_states=True)
        drafts = ar_drafts(self.encoder, self.head, out, lengths)
        rows = self.projector([out.last_hidden_state[i, :n] for i, n in enumerate(lengths.tolist())])
        return list(zip(rows, drafts, strict=True))


@pytest.fixture(scope="module")
def pipeline(tiny_ar_checkpoint) -> Pipeline:
    return Pipeline(tiny_ar_checkpoint, max_rows=12)


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return mixed_lengths()[:7]


def test_drafts_equal_the_reference_pipeline_and_some_are_not_empty(pipeline, tiny_ar_checkpoint, audios):
    """The draft of each audio, encoded in one batch, equals IBM's draft of it alone."""
    from cascade_reference import draft

    ours = pipeline.encode(audios)
    lengths = []
    for audio, (_, our_draft) in zip(audios, ours, strict=True):
        _, hidden, importance = prompt_embeddings(tiny_ar_checkpoint, audio, ASR)
        ids, entropy = draft(tiny_ar_checkpoint, hidden, importance)
        assert pipeline.decoder.draft_tokens(our_draft.ids) == ids
        assert our_draft.max_entropy == pytest.approx(entropy, rel=1e-5)
        lengths.append(len(ids))
    assert sum(n > 0 for n in lengths) >= 3, f"the tiny head should draft something: {lengths}"


@pytest.mark.parametrize("beams", [2, 3, 4])
def test_beam_search_equals_transformers_for_each_request_alone(pipeline, tiny_ar_checkpoint, audios, beams):
    encoded = pipeline.encode(audios)
    budgets = [NEW_TOKENS, 7, 1, 33, 12, 20, 5]
    requests = [SpeechRequest(decode_mode="beam", num_beams=beams, max_new_tokens=n) for n in budgets]
    results = pipeline.decoder.transcribe([(r, rows, None) for r, (rows, _) in zip(requests, encoded, strict=True)])
    for audio, request, result in zip(audios, requests, results, strict=True):
        embeds, _, _ = prompt_embeddings(tiny_ar_checkpoint, audio, ASR)
        assert result.token_ids == beam(tiny_ar_checkpoint, embeds, beams, request.max_new_tokens)


@pytest.mark.parametrize("confidences", [(0.0,), (1.0,), (0.0, 1.0)])
def test_cascade_equals_ibms_pipeline_accepting_and_rejecting_in_one_batch(
    pipeline, tiny_ar_checkpoint, audios, confidences
):
    """Threshold 0 accepts every non-empty draft, 1 rejects every draft (beam search runs); the
    thresholds alternating between requests of one batch mix both branches."""
    encoded = pipeline.encode(audios)
    thresholds = [confidences[i % len(confidences)] for i in range(len(audios))]
    requests = [SpeechRequest(decode_mode="cascade", confidence=c, max_new_tokens=NEW_TOKENS) for c in thresholds]
    seqs = [pipeline.decoder.sequence(r, rows, d) for r, (rows, d) in zip(requests, encoded, strict=True)]
    pipeline.decoder.engine.generate(seqs)
    expected = [cascade(tiny_ar_checkpoint, a, NEW_TOKENS, c, beams=2) for a, c in zip(audios, thresholds, strict=True)]
    for seq, want in zip(seqs, expected, strict=True):
        assert seq.tokens == want.tokens
        assert (seq.finish is Finish.DRAFT) == want.accepted
        assert seq.passes == 1 if want.accepted else seq.passes > 1  # verification, then beam steps
    accepted = [w.accepted for w in expected]
    assert accepted == [bool(w.draft) and c == 0.0 for w, c in zip(expected, thresholds, strict=True)]
    if len(confidences) == 2:
        assert any(accepted) and not all(accepted), "the test needs both branches in one batch"


def test_the_entropy_gate_answers_with_the_draft_without_the_llm(pipeline, tiny_ar_checkpoint, audios):
    encoded = pipeline.encode(audios)
    entropy = max(d.max_entropy for _, d in encoded)
    request = SpeechRequest(decode_mode="cascade", confidence=1.0, entropy_gate=entropy, max_new_tokens=NEW_TOKENS)
    seqs = [pipeline.decoder.sequence(request, rows, d) for rows, d in encoded]
    pipeline.decoder.engine.generate(seqs)
    for audio, seq in zip(audios, seqs, strict=True):
        want = cascade(tiny_ar_checkpoint, audio, NEW_TOKENS, 1.0, beams=2, gate=entropy)
        assert seq.tokens == want.tokens
        if seq.draft_ids:  # every draft's entropy is at most the gate
            assert seq.finish is Finish.DRAFT and seq.passes == 0
        else:  # nothing to take: beam search from the prompt
            assert seq.finish is not Finish.DRAFT and seq.passes >= 1


def test_speculative_equals_greedy_with_real_and_planted_drafts(pipeline, tiny_ar_checkpoint, audios):
    """Whatever the draft (the CTC head's, the greedy answer itself, or the greedy answer cut
    short or altered), the tokens are greedy's; a planted correct draft saves LLM passes."""
    encoded = pipeline.encode(audios)
    greedy = [reference_generate(tiny_ar_checkpoint, a, ASR, NEW_TOKENS) for a in audios]
    planted = [g[:-1] for g in greedy]  # the draft ends where the LLM's own last token begins
    altered = [g[:3] + [(g[3] + 1) % 300] + g[4:] if len(g) > 4 else g for g in greedy]
    request = SpeechRequest(decode_mode="speculative", max_new_tokens=NEW_TOKENS)
    decoder = pipeline.decoder
    runs = {}
    for name, drafts in (("ctc", None), ("planted", planted), ("altered", altered)):
        seqs = []
        for index, (rows, ctc) in enumerate(encoded):
            seq = decoder.sequence(request, rows, ctc)
            if drafts is not None:
                seq.draft_ids = drafts[index]
            seqs.append(seq)
        decoder.engine.generate(seqs)
        runs[name] = seqs
        for seq, want in zip(seqs, greedy, strict=True):
            assert seq.tokens == want, name
    for seq, want in zip(runs["planted"], greedy, strict=True):
        assert seq.draft_accepted == len(want) - 1 and seq.passes == 1  # the whole answer in one pass
    assert sum(s.passes for s in runs["altered"]) < sum(len(g) for g in greedy)


def test_speculative_tokens_keep_the_agreed_prefix_and_the_next_choice():
    assert speculative_tokens([5, 6, 7], [5, 6, 7, 8]) == ([5, 6, 7, 8], 3)
    assert speculative_tokens([5, 6, 7], [5, 9, 7, 8]) == ([5, 9], 1)
    assert speculative_tokens([5], [4, 4]) == ([4], 0)
    assert speculative_tokens([], [3]) == ([3], 0)


def test_modes_are_validated(pipeline, tiny_ar_checkpoint):
    rows, ctc = pipeline.encode([mixed_lengths()[2]])[0]
    bad = [
        (dict(decode_mode="nucleus"), "unknown DECODE_MODE 'nucleus'"),
        (dict(decode_mode="beam", num_beams=5), "NUM_BEAMS must be in 1..4"),
        (dict(decode_mode="beam", num_beams=0), "NUM_BEAMS must be in 1..4"),
        (dict(decode_mode="cascade", confidence=1.5), "CONFIDENCE must be in 0..1"),
        (dict(decode_mode="cascade", confidence=float("nan")), "CONFIDENCE must be in 0..1"),
        (dict(decode_mode="cascade", entropy_gate=-1.0), "ENTROPY_GATE"),
        (dict(decode_mode="speculative", task="translate", target_language="fr"), "needs TASK 'transcribe'"),
    ]
    for options, message in bad:
        with pytest.raises(RequestError, match=message):
            SpeechRequest(**options).validate(256)
    with pytest.raises(RequestError, match="needs the encoder's CTC draft"):
        pipeline.decoder.sequence(SpeechRequest(decode_mode="cascade"), rows, None)
    no_head = ARDecoder(pipeline.decoder.engine, pipeline.decoder.tokenizer, drafts_available=False)
    with pytest.raises(RequestError, match="out_llm.safetensors"):
        no_head.sequence(SpeechRequest(decode_mode="speculative"), rows, ctc)
