"""Random-weight checkpoints (granite_speech_triton/tiny.py): the real-size code path at reduced dimensions.

REDUCED goes through exactly the code that writes the real-size checkpoints (meta device, tensors
filled in place, bfloat16, sharded AR weights, out_llm.safetensors, the real vocabulary and token
ids); only the layer dimensions are small. The REAL dimensions are checked on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from audio_samples import synthetic
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteSpeechConfig,
    GraniteSpeechForConditionalGeneration,
)

from granite_speech_triton.model.audio import Framing, LogMelFrontEnd
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.decoder import load_ar_decoder
from granite_speech_triton.model.encoder import ConformerEncoder, encode_batch, load_encoder
from granite_speech_triton.model.nar import (
    NARModel,
    NARModelConfig,
    load_nar_config,
    load_nar_model,
    load_nar_projector,
)
from granite_speech_triton.model.projector import QFormerProjector, load_projector, projector_config
from granite_speech_triton.model.prompts import SpeechRequest
from granite_speech_triton.model.weights import read_tensors, safetensors_files
from granite_speech_triton.reference import TransformersReference
from granite_speech_triton.tiny import (
    OUT_LLM_FILE,
    REAL,
    REDUCED,
    TINY,
    ar_config,
    make_ar_checkpoint,
    make_nar_checkpoint,
    nar_config,
)

# MODEL_SPEC.md: the ids every Granite Speech 4.1 checkpoint uses.
AR_VOCAB, NAR_VOCAB, AUDIO_ID, EOS_ID, PAD_ID = 100353, 100352, 100352, 100257, 100256


@pytest.fixture(scope="module")
def reduced_ar(tmp_path_factory) -> Path:
    return make_ar_checkpoint(tmp_path_factory.mktemp("reduced-ar"), REDUCED)


@pytest.fixture(scope="module")
def reduced_nar(tmp_path_factory) -> Path:
    return make_nar_checkpoint(tmp_path_factory.mktemp("reduced-nar"), REDUCED)


def test_reduced_ar_has_the_real_layout_ids_and_tokenizer(reduced_ar: Path):
    config = read_config_json(reduced_ar)
    text = config["text_config"]
    assert (text["vocab_size"], config["audio_token_index"]) == (AR_VOCAB, AUDIO_ID)
    assert (text["eos_token_id"], text["bos_token_id"], text["pad_token_id"]) == (EOS_ID, EOS_ID, PAD_ID)
    assert json.loads((reduced_ar / "generation_config.json").read_text())["eos_token_id"] == EOS_ID

    shards = set(safetensors_files(reduced_ar).values())
    assert len(shards) > 1 and (reduced_ar / "model.safetensors.index.json").is_file()
    with safe_open(next(iter(shards)), framework="pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} <= {"BF16", "I64"}  # noqa: SIM118 (I64: BatchNorm counts)
    with safe_open(reduced_ar / OUT_LLM_FILE, framework="pt") as f:
        head = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    assert head["weight"].shape == (AR_VOCAB, config["encoder_config"]["hidden_dim"])
    assert head["bias"].shape == (AR_VOCAB,) and int(head["bias"].float().argmax()) == 0  # label 0: the blank

    tokenizer = AutoTokenizer.from_pretrained(reduced_ar)
    assert len(tokenizer) == AR_VOCAB
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (EOS_ID, EOS_ID, PAD_ID)
    assert tokenizer.convert_tokens_to_ids("<|audio|>") == AUDIO_ID
    chat = [{"role": "user", "content": "<|audio|>can you transcribe the speech into a written format?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "USER: <|audio|>can you transcribe the speech into a written format?\n ASSISTANT:"
    assert tokenizer(prompt)["input_ids"].count(AUDIO_ID) == 1
    assert tokenizer.decode([EOS_ID, 99_000, AUDIO_ID], skip_special_tokens=True).strip()  # fillers decode


def test_reduced_ar_loads_in_transformers_and_ours_with_the_same_greedy_tokens(reduced_ar: Path):
    model, info = GraniteSpeechForConditionalGeneration.from_pretrained(reduced_ar, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.dtype == torch.bfloat16  # the checkpoint's own dtype
    saved = read_tensors(reduced_ar, "language_model.")
    torch.testing.assert_close(model.get_output_embeddings().weight, saved["lm_head.weight"], rtol=0, atol=0)
    assert float(saved["model.embed_tokens.weight"].float().std()) == pytest.approx(REDUCED.initializer_range, 0.05)

    cfg = ARModelConfig.from_dict(read_config_json(reduced_ar))
    audio = synthetic(1.3, 3)
    features = LogMelFrontEnd(Framing.AR)(torch.from_numpy(audio))
    with torch.inference_mode():
        hidden = encode_batch(load_encoder(reduced_ar, cfg.encoder), [features])
        embeds = load_projector(reduced_ar, cfg.projector)(hidden)[0]
    decoder = load_ar_decoder(reduced_ar)
    request = SpeechRequest(max_new_tokens=6)
    ours = decoder.transcribe([(request, embeds, None)])[0].token_ids
    reference = TransformersReference(reduced_ar).generate(audio, request.instruction(), 6)
    assert ours == reference and len(ours) == 6


def test_reduced_nar_has_the_real_layout_and_runs(reduced_nar: Path):
    config = read_config_json(reduced_nar)
    assert config["text_config"]["vocab_size"] == NAR_VOCAB and config["blank_token_id"] == EOS_ID
    assert config["encoder_config"]["bpe_output_dim"] == NAR_VOCAB and config["text_config"]["tie_word_embeddings"]
    assert set(safetensors_files(reduced_nar).values()) == {reduced_nar / "model.safetensors"}
    tokenizer = AutoTokenizer.from_pretrained(reduced_nar)
    assert len(tokenizer) == NAR_VOCAB and tokenizer.eos_token_id == EOS_ID and tokenizer.pad_token_id == PAD_ID

    cfg = load_nar_config(reduced_nar)
    model = load_nar_model(reduced_nar)
    features = [LogMelFrontEnd(Framing.NAR)(torch.from_numpy(synthetic(s, 5))) for s in (2.1, 0.9)]
    drafts = model.encoder.encode(*_padded(features)).drafts
    assert all(0 <= t < NAR_VOCAB and t != cfg.blank_token_id for d in drafts for t in d)
    ids = model.transcribe_ids(features)
    assert len(ids) == 2 and all(0 <= t < NAR_VOCAB for i in ids for t in i)


def _padded(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in features])
    return torch.nn.utils.rnn.pad_sequence(features, batch_first=True), lengths


def test_real_dimensions_match_the_model_spec():
    """The REAL size on the meta device, built by our loaders' modules: every shape of the 2b and 2b-nar."""
    ar_cfg = ARModelConfig.from_dict(ar_config(REAL, AR_VOCAB))
    with torch.device("meta"):
        full = GraniteSpeechForConditionalGeneration(GraniteSpeechConfig(**ar_config(REAL, AR_VOCAB)))
        llm = GraniteForCausalLM(GraniteConfig.from_dict(ar_cfg.text))
        encoder = ConformerEncoder(ar_cfg.encoder)
        projector = QFormerProjector(ar_cfg.projector)
        nar = NARModel.from_config(NARModelConfig.from_dict(nar_config(REAL, NAR_VOCAB)))
    # 2.31 B parameters, like the hub's 4.6 GB of bfloat16 shards (out_llm.safetensors aside)
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(2.313e9, rel=1e-3)
    shapes = {name: tuple(p.shape) for module in (llm, encoder, projector) for name, p in module.state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (AR_VOCAB, 2048)
    assert len(llm.model.layers) == 40 and shapes["model.layers.39.self_attn.k_proj.weight"] == (4 * 128, 2048)
    assert shapes["model.layers.39.mlp.gate_proj.weight"] == (4096, 2048)
    assert len(encoder.layers) == 16 and shapes["layers.15.attn.rel_pos_emb.weight"] == (1025, 128)
    assert shapes["out.weight"] == (348, 1024)
    assert shapes["qformer.encoder.layer.1.crossattention.attention.key.weight"] == (1024, 1024)
    assert shapes["linear.weight"] == (2048, 1024)
    text = llm.config
    multipliers = (text.embedding_multiplier, text.attention_multiplier, text.residual_multiplier, text.logits_scaling)
    assert multipliers == (12.0, 0.0078125, 0.22, 8.0)

    shapes = {name: tuple(p.shape) for name, p in nar.state_dict().items()}
    assert shapes["encoder.out_bpe.weight"] == (NAR_VOCAB, 1024)
    assert shapes["projector.layer_projector.weight"] == (2048, 4096)
    assert shapes["projector.window_positions"] == (1, 15, 2048)
    assert shapes["language_model.model.embed_tokens.weight"] == (NAR_VOCAB, 2048)
    assert "language_model.lm_head.weight" not in shapes  # tied
    assert nar.encoder.layer_indices == (4, 8, 12, -1) and nar.encoder.cfg.self_conditioning_layer == 8


@pytest.mark.parametrize("window", [15, 10])
def test_audio_rows_follow_the_checkpoint_window(tmp_path: Path, window: int):
    """AUDIO_ROWS (what the feature extractor announces) equals what each projector makes, whatever
    the checkpoint's window: 2 rows per 10 frames (AR) with window 10, not 3 per 15."""
    size = replace(TINY, projector_window=window)
    ar, nar = make_ar_checkpoint(tmp_path / "ar", size), make_nar_checkpoint(tmp_path / "nar", size)
    ar_cfg = ARModelConfig.from_dict(read_config_json(ar))
    ar_projector, nar_projector = load_projector(ar, ar_cfg.projector), load_nar_projector(nar, load_nar_config(nar))
    frames = [1, 9, 10, 11, 29, 30, 31, 250]
    with torch.inference_mode():
        ar_rows = [r.shape[0] for r in ar_projector([torch.randn(n, 32) for n in frames])]
        nar_rows = [r.shape[0] for r in nar_projector([torch.randn(n, 4 * 32) for n in frames])]
    assert [projector_config(ar, "ar").rows(n) for n in frames] == ar_rows
    assert [projector_config(nar, "nar").rows(n) for n in frames] == nar_rows
    if window == 10:
        assert ar_rows[:4] == [2, 2, 2, 4] and nar_rows[:4] == [0, 1, 2, 2]
