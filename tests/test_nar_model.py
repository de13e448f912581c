"""NAR model code (granite_speech_triton.model.nar and .ctc) on tiny checkpoints, CPU float32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GraniteSpeechEncoderConfig
from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechCTCEncoder

from granite_speech_triton.model.audio import SAMPLE_RATE, Framing, LogMelFrontEnd
from granite_speech_triton.model.config import CheckpointError
from granite_speech_triton.model.ctc import ctc_collapse, ctc_collapse_segments
from granite_speech_triton.model.draft import posterior_weighted_pool
from granite_speech_triton.model.nar import (
    NARModel,
    NARModelConfig,
    NARProjector,
    PackedLayout,
    insertion_slots,
    load_nar_config,
    load_nar_model,
)
from granite_speech_triton.model.ragged import pack_groups
from granite_speech_triton.model.weights import read_tensors
from granite_speech_triton.tiny import make_tiny_nar_checkpoint

NAR_ONLY_ENCODER_KEYS = ("self_conditioning_layer", "bpe_output_dim", "bpe_pooling_window")


def tones(seed: int, segments: int) -> torch.Tensor:
    """Tone bursts of random pitch, loudness and length: audio whose frames differ from each other."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(segments):
        n = int(torch.randint(SAMPLE_RATE // 10, SAMPLE_RATE // 2, (1,), generator=gen))
        freq = float(torch.randint(100, 4000, (1,), generator=gen))
        amp = float(torch.rand(1, generator=gen))
        t = torch.arange(n) / SAMPLE_RATE
        parts.append(amp * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, generator=gen))
    return torch.cat(parts)


@pytest.fixture(scope="module")
def nar_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_nar_checkpoint(tmp_path_factory.mktemp("nar"))


@pytest.fixture(scope="module")
def nar_model(nar_checkpoint) -> NARModel:
    return load_nar_model(nar_checkpoint)


@pytest.fixture(scope="module")
def nar_features() -> list[torch.Tensor]:
    """Stacked log-mel features [T_i, 160] of utterances of different lengths."""
    front_end = LogMelFrontEnd(Framing.NAR)
    return [front_end(tones(seed, segments)) for seed, segments in [(0, 4), (1, 8), (2, 2), (3, 12)]]


def padded(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in features])
    return torch.nn.utils.rnn.pad_sequence(features, batch_first=True), lengths


# --- CTC collapse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([], []),
        ([7, 7, 7], [7]),
        ([0, 0, 0], []),
        ([7, 0, 7], [7, 7]),  # a blank keeps a repeated token
        ([0, 3, 3, 0, 0, 4, 4, 3, 0], [3, 4, 3]),
        ([5, 6, 5, 6], [5, 6, 5, 6]),
    ],
)
def test_ctc_collapse(ids, expected):
    assert ctc_collapse(ids, blank=0) == expected
    assert ctc_collapse(torch.tensor(ids, dtype=torch.long), blank=0) == expected


def test_ctc_collapse_segments_keeps_runs_apart():
    ids = torch.tensor([4, 4, 4, 9, 9, 4, 9])
    # [4, 4] | [] | [4] | [9, 9, 4, 9]: the run of 4s crossing the first boundary counts twice.
    assert ctc_collapse_segments(ids, [2, 0, 1, 4], blank=9) == [[4], [], [4], [4]]
    assert ctc_collapse_segments(torch.tensor([], dtype=torch.long), [0, 0], blank=0) == [[], []]
    with pytest.raises(ValueError, match="add up"):
        ctc_collapse_segments(ids, [3], blank=9)


# --- BPE draft pooling --------------------------------------------------------------------------


def test_posterior_weighted_pool_hand_computed():
    hidden = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0], [2.0, 8.0], [4.0, 0.0]])[None]
    keep = torch.tensor([[0.5, 0.5, 0.0, 1.0, 0.25, 0.75]])
    pooled = posterior_weighted_pool(hidden, keep, torch.tensor([6]), window=4)
    # Window 1 weights (0.5, 0.5, 0, 1) / 2; window 2 holds frames 5-6 and two zero frames of weight 0.
    expected = torch.tensor([[(0.5 * 1 + 0.5 * 3 + 7) / 2, (0.5 * 2 + 6) / 2], [0.25 * 2 + 0.75 * 4, 0.25 * 8]])
    torch.testing.assert_close(pooled[0], expected / (1 + 1e-8 / torch.tensor([[2.0], [1.0]])))
    assert pooled.shape == (1, 2, 2)


def test_posterior_weighted_pool_all_blank_window_and_padding():
    hidden = torch.arange(8.0).reshape(1, 4, 2)
    pooled = posterior_weighted_pool(hidden, torch.zeros(1, 4), torch.tensor([4]), window=4)
    torch.testing.assert_close(pooled, torch.zeros(1, 1, 2))  # weights 0 / (0 + 1e-8)

    # A padded batch row pools exactly as the utterance alone; frames past its length are ignored.
    short = torch.randn(1, 5, 3)
    keep = torch.rand(1, 5)
    alone = posterior_weighted_pool(short, keep, torch.tensor([5]), window=4)  # [1, 2, 3]
    batch = torch.full((2, 11, 3), 1e6)
    batch[0, :5], batch[1] = short[0], torch.randn(11, 3)
    batch_keep = torch.ones(2, 11)
    batch_keep[0, :5] = keep[0]
    pooled = posterior_weighted_pool(batch, batch_keep, torch.tensor([5, 11]), window=4)  # [2, 3, 3]
    torch.testing.assert_close(pooled[0, :2], alone[0])
    assert pooled.shape == (2, 3, 3)


# --- insertion slots and packing ----------------------------------------------------------------


def test_insertion_slots():
    b = 99
    assert insertion_slots([], b, 8) == [b] * 8  # empty hypothesis: blanks only
    assert insertion_slots([5, 6], b, 8) == [b, 5, b, 6, b, b, b, b]  # 2n + 1 = 5 < 8
    assert insertion_slots([1, 2, 3, 4], b, 8) == [b, 1, b, 2, b, 3, b, 4, b]  # 2n + 1 = 9 > 8
    assert insertion_slots([1, 2, 3, 4, 5], b, 8) == [b, 1, b, 2, b, 3, b, 4, b, 5, b]


def test_packed_layout_and_groups():
    layout = PackedLayout.from_lengths([3, 1, 2], torch.device("cpu"))
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert layout.sequence_ids.tolist() == [[0, 0, 0, 1, 2, 2]]
    assert layout.cu_seqlens.tolist() == [0, 3, 4, 6] and layout.max_length == 3
    assert pack_groups([3, 4, 2, 9, 1], budget=7) == [[0, 1], [2], [3], [4]]
    assert pack_groups([3, 4, 2, 9, 1], budget=100) == [[0, 1, 2, 3, 4]]


# --- config and encoder -------------------------------------------------------------------------


def test_config_reads_section_4_keys(nar_checkpoint, nar_model):
    cfg = load_nar_config(nar_checkpoint)
    raw = json.loads((nar_checkpoint / "config.json").read_text())
    assert cfg.encoder_layer_indices == (1, 2, 3, -1)
    assert cfg.blank_token_id == raw["blank_token_id"] == raw["text_config"]["eos_token_id"]
    assert cfg.min_edit_sequence_length == 8 and cfg.scale_projected_embeddings
    assert cfg.encoder.self_conditioning_layer == 2 and cfg.encoder.bpe_pooling_window == 4
    assert cfg.encoder.bpe_output_dim == cfg.vocab_size and not cfg.legacy_bpe_head
    assert (cfg.projector.num_heads, cfg.projector.num_queries, cfg.audio_divisor) == (4, 3, 12.0)
    assert all(layer.self_attn.is_causal is False for layer in nar_model.language_model.model.layers)
    bad = dict(raw, encoder_config=dict(raw["encoder_config"], bpe_output_dim=7))
    with pytest.raises(CheckpointError, match="bpe_output_dim"):
        NARModelConfig.from_dict(bad)
    with pytest.raises(CheckpointError, match="text_config"):
        NARModelConfig.from_dict({k: v for k, v in raw.items() if k != "text_config"})
    with pytest.raises(CheckpointError, match="projector_config"):
        NARModelConfig.from_dict(dict(raw, encoder_layer_indices=[1, 2, -1]))


def test_encoder_matches_transformers(nar_checkpoint, nar_model, nar_features):
    """Batched, masked encoder = transformers' GraniteSpeechCTCEncoder on each utterance alone."""
    encoder_config = json.loads((nar_checkpoint / "config.json").read_text())["encoder_config"]
    reference = GraniteSpeechCTCEncoder(
        GraniteSpeechEncoderConfig(**{k: v for k, v in encoder_config.items() if k not in NAR_ONLY_ENCODER_KEYS})
    ).eval()
    tensors = read_tensors(nar_checkpoint, "encoder.")
    reference.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("out_bpe.")}, strict=True)

    encoded = nar_model.encoder.encode(*padded(nar_features))
    for feats, projector_input in zip(nar_features, encoded.projector_inputs, strict=True):
        with torch.no_grad():
            states = reference(feats[None], output_hidden_states=True).hidden_states
        expected = torch.cat([states[i] for i in nar_model.encoder.layer_indices], dim=-1)[0]  # [T, 4*32]
        torch.testing.assert_close(projector_input, expected, rtol=1e-4, atol=1e-4)


def test_drafts_are_input_dependent_and_batch_invariant(nar_model, nar_features):
    encoder = nar_model.encoder
    drafts = encoder.encode(*padded(nar_features)).drafts
    assert drafts == [encoder.encode(*padded([f])).drafts[0] for f in nar_features]
    assert all(drafts) and len({len(d) for d in drafts}) > 1  # the tiny head's drafts are not degenerate
    window = encoder.cfg.bpe_pooling_window
    assert all(len(d) <= math.ceil(f.shape[0] / window) for d, f in zip(drafts, nar_features, strict=True))
    assert all(encoder.blank not in d for d in drafts)


def test_draft_follows_section_4_step_2(nar_model, nar_features):
    """One utterance by hand: frame weights 1 - P(char blank), windows of 4, out_bpe, greedy CTC."""
    encoder, feats = nar_model.encoder, nar_features[2]
    with torch.no_grad():
        out = encoder(feats[None], torch.tensor([feats.shape[0]]), keep_hidden_states=True)
        keep = 1.0 - torch.softmax(out.self_conditioning_logits[0], dim=-1)[:, 0]  # [T]
        hidden = out.last_hidden_state[0]  # [T, D]
        ids = []
        for start in range(0, feats.shape[0], 4):  # the last window is short: its missing frames weigh 0
            w = keep[start : start + 4]
            pooled = (hidden[start : start + 4] * (w / (w.sum() + 1e-8))[:, None]).sum(0)
            ids.append(int(encoder.out_bpe(pooled).argmax()))
    draft = [t for i, t in enumerate(ids) if t != encoder.blank and (i == 0 or t != ids[i - 1])]
    assert encoder.encode(*padded([feats])).drafts[0] == draft


# --- projector ----------------------------------------------------------------------------------


def reference_projector(projector: NARProjector, x: torch.Tensor) -> torch.Tensor:
    """MODEL_SPEC.md section 4 step 4 for one utterance [T, 4*D], one window and one head at a time."""
    cfg = projector.cfg
    layers = x.view(x.shape[0], cfg.num_encoder_layers, cfg.encoder_dim)
    h = torch.cat([norm(layers[:, i]) for i, norm in enumerate(projector.layer_norms)], dim=-1)
    h = F.gelu(projector.layer_projector(h))  # [T, H]
    h = F.pad(h, (0, 0, 0, -x.shape[0] % 15))
    rows = []
    for window in h.split(15):  # [15, H]
        queries = projector.query[0] + torch.stack([window[5 * j : 5 * j + 5].mean(0) for j in range(3)])
        kv = window + projector.window_positions[0]
        for layer in projector.qformer.layers:
            attn, q_in = layer.cross_attention, layer.attn_norm(queries)
            q, k, v = attn.q_proj(q_in), attn.k_proj(kv), attn.v_proj(kv)  # [3, H], [15, H], [15, H]
            heads = []
            for sl in torch.arange(cfg.hidden_size).split(cfg.hidden_size // cfg.num_heads):
                scores = q[:, sl] @ k[:, sl].T / math.sqrt(len(sl))  # [3, 15]
                heads.append(torch.softmax(scores, dim=-1) @ v[:, sl])
            queries = queries + attn.o_proj(torch.cat(heads, dim=-1))
            queries = queries + layer.mlp.fc2(F.silu(layer.mlp.fc1(layer.mlp_norm(queries))))
        rows.append(projector.out_linear(projector.out_norm(queries)))
    return torch.cat(rows)[: x.shape[0] // 5] / 12.0


def test_projector_rows_and_batch_invariance(nar_model, nar_features):
    inputs = nar_model.encoder.encode(*padded(nar_features)).projector_inputs
    rows = nar_model.projector(inputs)
    assert [r.shape for r in rows] == [(f.shape[0] // 5, 64) for f in nar_features]
    for x, r in zip(inputs, rows, strict=True):
        torch.testing.assert_close(nar_model.projector([x])[0], r, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(reference_projector(nar_model.projector, x), r, rtol=1e-4, atol=1e-5)


# --- NAR head -----------------------------------------------------------------------------------


def stage_outputs(model: NARModel, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Audio rows and drafts, through the encoder and projector stages."""
    encoded = model.encoder.encode(*padded(features))
    return model.projector(encoded.projector_inputs), encoded.drafts


def test_packed_head_equals_unpacked(nar_model, nar_features):
    audio, drafts = stage_outputs(nar_model, nar_features)
    head = nar_model.language_model
    packed = head.slot_logits(audio, drafts)  # one packed sequence
    split = head.slot_logits(audio, drafts, pack_budget=1)  # one sequence per utterance
    vocab = head.model.config.vocab_size
    for p, s, d in zip(packed, split, drafts, strict=True):
        assert p.shape == (max(2 * len(d) + 1, 8), vocab)
        torch.testing.assert_close(p, s, rtol=1e-4, atol=1e-4)
    ids = head(audio, drafts)
    assert ids == head(audio, drafts, pack_budget=1)
    assert ids == [head([a], [d])[0] for a, d in zip(audio, drafts, strict=True)]
    assert ids != drafts  # the tiny head edits the drafts: the comparisons above are not of copies


def test_packed_mask_for_eager_attention(nar_checkpoint, nar_model, nar_features):
    """transformers builds the block-diagonal mask in each backend's format (bool for sdpa, additive for eager)."""
    eager = load_nar_model(nar_checkpoint, attn_implementation="eager").language_model
    assert eager.model.config._attn_implementation == "eager"
    audio, drafts = stage_outputs(nar_model, nar_features)
    expected = nar_model.language_model.slot_logits(audio, drafts)
    got = eager.slot_logits(audio, drafts)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_head_is_bidirectional_and_isolated(nar_model, nar_features):
    audio, drafts = stage_outputs(nar_model, nar_features[:2])
    head = nar_model.language_model
    base = head.slot_logits(audio, drafts)
    # Changing the last draft token of utterance 0 changes its first slot's logits (no causal mask) ...
    changed = [drafts[0][:-1] + [drafts[0][-1] + 1], drafts[1]]
    after = head.slot_logits(audio, changed)
    assert not torch.allclose(after[0][0], base[0][0])
    # ... and nothing of utterance 1, packed in the same sequence (block-diagonal mask).
    torch.testing.assert_close(after[1], base[1], rtol=1e-5, atol=1e-5)


def test_transcribe_ids_composes_the_stages(nar_model, nar_features):
    ids = nar_model.transcribe_ids(nar_features)
    audio, drafts = stage_outputs(nar_model, nar_features)
    assert ids == nar_model.language_model(audio, drafts)
    assert ids == [nar_model.transcribe_ids([f])[0] for f in nar_features]
    assert all(len(i) <= max(2 * len(d) + 1, 8) for i, d in zip(ids, drafts, strict=True))
    empty = nar_model.language_model.slot_logits(audio[:1], [[]])  # an empty draft still gets 8 slots
    assert empty[0].shape[0] == 8


# --- checkpoints --------------------------------------------------------------------------------


def test_old_layout_converts(tmp_path, nar_model, nar_features):
    old = make_tiny_nar_checkpoint(tmp_path / "old", old_layout=True)  # same seed, same weights
    raw = json.loads((old / "config.json").read_text())
    assert "llm_config" in raw and "text_config" not in raw
    vocab = raw["llm_config"]["vocab_size"]
    assert load_file(old / "model.safetensors")["encoder.out_bpe.weight"].shape[0] == vocab + 1
    converted = load_nar_model(old)
    assert converted.encoder.cfg.bpe_output_dim == vocab
    torch.testing.assert_close(converted.encoder.out_bpe.weight, nar_model.encoder.out_bpe.weight)
    torch.testing.assert_close(converted.encoder.out_bpe.bias, nar_model.encoder.out_bpe.bias)
    assert converted.transcribe_ids(nar_features) == nar_model.transcribe_ids(nar_features)


@pytest.mark.parametrize(
    ("key", "action"),
    [
        ("encoder.out_bpe.bias", "drop"),
        ("encoder.layers.3.conv.batch_norm.running_var", "drop"),
        ("projector.qformer.layers.1.cross_attention.k_proj.weight", "drop"),
        ("projector.window_positions", "reshape"),
        ("language_model.model.layers.0.mlp.up_proj.weight", "reshape"),
        ("language_model.model.embed_tokens.weight", "drop"),
    ],
)
def test_bad_tensor_is_named(tmp_path, nar_checkpoint, key, action):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in nar_checkpoint.iterdir():
        if file.name != "model.safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(nar_checkpoint / "model.safetensors")
    if action == "drop":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_nar_model(broken)
