"""Each AR component against its transformers counterpart, in-process and served alone."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from reference import load_reference
from safetensors.torch import load_file, save_file

from granite_speech_triton.model.audio import Framing, LogMelFrontEnd
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.decoder import load_ar_decoder
from granite_speech_triton.model.encoder import encode_batch, length_groups, load_encoder, pad_batch, padding_waste
from granite_speech_triton.model.errors import CheckpointError
from granite_speech_triton.model.projector import load_projector, num_audio_tokens
from granite_speech_triton.model.prompts import SpeechRequest
from granite_speech_triton.serving import server

FRAME_COUNTS = [3, 15, 199, 200, 201, 457]  # around the 200-frame attention blocks


def features(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(frames, 160, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ar(tiny_ar_checkpoint: Path):
    cfg = ARModelConfig.from_dict(read_config_json(tiny_ar_checkpoint))
    reference, _ = load_reference(tiny_ar_checkpoint)
    return cfg, reference.model


def test_encoder_matches_transformers_per_utterance_and_in_a_batch(tiny_ar_checkpoint, ar):
    cfg, reference = ar
    encoder = load_encoder(tiny_ar_checkpoint, cfg.encoder)
    inputs = [features(n, i) for i, n in enumerate(FRAME_COUNTS)]
    with torch.inference_mode():  # one batch, every utterance padded to the longest: the masks at work
        hidden = encoder(*pad_batch(inputs)).last_hidden_state
    batched = [hidden[i, :n] for i, n in enumerate(FRAME_COUNTS)]
    with torch.inference_mode():
        for x, ours in zip(inputs, batched, strict=True):
            expected = reference.encoder(x[None]).last_hidden_state[0]
            alone = encode_batch(encoder, [x])[0]
            torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_projector_matches_transformers(tiny_ar_checkpoint, ar):
    cfg, reference = ar
    projector = load_projector(tiny_ar_checkpoint, cfg.projector)
    hidden = [torch.randn(n, cfg.encoder.hidden_dim) for n in FRAME_COUNTS]
    with torch.inference_mode():
        ours = projector(hidden)
        for h, out in zip(hidden, ours, strict=True):
            assert out.shape[0] == num_audio_tokens(h.shape[0], cfg.projector)
            torch.testing.assert_close(out, reference.projector(h[None])[0], atol=1e-5, rtol=1e-5)


def broken_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_missing_and_misshaped_tensors_are_named(tiny_ar_checkpoint, tmp_path, ar):
    cfg, _ = ar
    key = "encoder.layers.1.attn.to_q.weight"
    missing = broken_copy(tiny_ar_checkpoint, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        load_encoder(missing, cfg.encoder)

    def reshape(t: dict) -> None:
        t["projector.linear.weight"] = t["projector.linear.weight"][:, :-1].contiguous()

    misshaped = broken_copy(tiny_ar_checkpoint, tmp_path / "misshaped", reshape)
    with pytest.raises(CheckpointError, match=r"'projector.linear.weight' has shape \[64, 31\]"):
        load_projector(misshaped, cfg.projector)


def test_config_without_encoder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "granite"}))
    with pytest.raises(CheckpointError, match="encoder_config"):
        ARModelConfig.from_dict(read_config_json(tmp_path))


@pytest.mark.server
def test_served_components_match_transformers(ar_server, tiny_ar_checkpoint, ar):
    _, reference = ar
    client = grpcclient.InferenceServerClient(ar_server.grpc_url)
    x = features(457, 3)
    hidden = call(client, "ar_conformer_encoder", "FEATURES", x.numpy(), "HIDDEN")
    with torch.inference_mode():
        expected_hidden = reference.encoder(x[None]).last_hidden_state[0]
        np.testing.assert_allclose(hidden, expected_hidden.numpy(), atol=1e-5, rtol=1e-5)
        embeds = call(client, "ar_qformer_projector", "HIDDEN", hidden, "AUDIO_EMBEDS")
        expected = reference.projector(torch.from_numpy(hidden.copy())[None])[0]
        np.testing.assert_allclose(embeds, expected.numpy(), atol=1e-5, rtol=1e-5)


def call(client, model: str, name: str, value: np.ndarray, output: str) -> np.ndarray:
    tensor = grpcclient.InferInput(name, [1, *value.shape], "FP32")
    tensor.set_data_from_numpy(value[None].astype(np.float32))
    return client.infer(model, [tensor]).as_numpy(output)[0]


@pytest.mark.server
def test_a_request_failing_in_the_forward_pass_fails_alone(ar_server, ar):
    """A projector input of the wrong width (only a direct call can send one: the ensemble never
    does) passes decode but breaks the batched forward pass. The batch is split until the failing
    request stands alone: only it gets the error, INTERNAL as for any failure past decode, and
    its batch-mates get their solo outputs."""
    cfg, _ = ar
    rng = np.random.default_rng(3)
    goods = [rng.standard_normal((frames, cfg.encoder.hidden_dim)).astype(np.float32) for frames in (30, 45, 15, 60)]
    bad = np.zeros((30, cfg.encoder.hidden_dim + 1), np.float32)
    wave = [goods[0], goods[1], bad, goods[2], goods[3]]

    def one(value: np.ndarray):
        client = grpcclient.InferenceServerClient(ar_server.grpc_url)
        try:
            return call(client, "ar_qformer_projector", "HIDDEN", value, "AUDIO_EMBEDS")
        except grpcclient.InferenceServerException as exc:
            return exc
        finally:
            client.close()

    with ThreadPoolExecutor(len(wave)) as pool:
        results = list(pool.map(one, wave))
    assert isinstance(results[2], grpcclient.InferenceServerException)
    assert results[2].status() == "StatusCode.INTERNAL" and "internal error" in results[2].message()
    for result, good in zip(results[:2] + results[3:], goods, strict=True):
        np.testing.assert_allclose(result, one(good), atol=1e-5, rtol=1e-5)


@pytest.mark.server
def test_broken_checkpoint_leaves_model_unavailable_with_the_key_named(tiny_ar_checkpoint, tmp_path):
    """Loading through Triton fails with the key in the error; the model is not half-ready."""
    from conftest import TEST_SETTINGS

    from granite_speech_triton.serving.repository import DeploySettings, render

    key = "encoder.layers.0.conv.depth_conv.conv.weight"
    broken = broken_copy(tiny_ar_checkpoint, tmp_path / "broken", lambda t: t.pop(key))
    repos = render(tmp_path / "repo", DeploySettings(ar_checkpoint=str(broken), **TEST_SETTINGS), ("ar",))
    http, grpc_port = server.free_port(), server.free_port()
    options = server.ServerOptions(
        repositories=repos,
        build_dir=Path("build"),
        http_port=http,
        grpc_port=grpc_port,
        metrics_port=server.free_port(),
        model_control_mode="explicit",
    )
    process = server.start(options, tmp_path / "server.log")
    try:
        server.wait_ready(http, process, tmp_path / "server.log")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(grpcclient.InferenceServerException, match=key):
            client.load_model("ar_conformer_encoder")
        assert not client.is_model_ready("ar_conformer_encoder")
    finally:
        server.stop(process)


def test_generated_audio_placeholders_are_embedded_like_transformers(tiny_ar_checkpoint, ar):
    """The tiny model generates the <|audio|> id on this input; transformers embeds it as token 0."""
    from audio_samples import synthetic
    from reference import reference_generate

    cfg, _ = ar
    audio = synthetic(0.3, 1)
    features = LogMelFrontEnd(Framing.AR)(torch.from_numpy(audio))
    with torch.inference_mode():
        hidden = encode_batch(load_encoder(tiny_ar_checkpoint, cfg.encoder), [features])
        embeds = load_projector(tiny_ar_checkpoint, cfg.projector)(hidden)[0]
    decoder = load_ar_decoder(tiny_ar_checkpoint)
    request = SpeechRequest(max_new_tokens=200)
    ours = decoder.transcribe([(request, embeds, None)])[0].token_ids
    assert cfg.audio_token_index in ours
    assert ours == reference_generate(tiny_ar_checkpoint, audio, request.instruction(), 200)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("lengths", [[1500, 15, 40, 900, 880, 1450, 100, 95], [100] * 5, [7], [3, 457, 201, 200]])
def test_length_groups_bound_padding_and_cover_every_request(lengths, device):
    waste = padding_waste(device)
    groups = length_groups(lengths, waste)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or longest * len(group) <= (1 + waste) * sum(lengths[i] for i in group)
    assert len(length_groups([100] * 5, waste)) == 1  # equal lengths share one forward


def test_a_cpu_batch_is_grouped_by_equal_length_and_a_gpu_batch_may_pad():
    lengths = [929, 929, 688, 688, 380, 380, 292, 292]
    assert length_groups(lengths, padding_waste("cpu")) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert length_groups(lengths, padding_waste("cuda")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
