"""Rendering the Triton templates: every placeholder filled, unknown settings rejected."""

import re
from pathlib import Path

import pytest

from granite_speech_triton.serving.repository import MODELS, DeploySettings, render


def test_render_fills_every_template(tmp_path: Path):
    settings = DeploySettings(ar_checkpoint="/ckpt/ar", device="cuda", dtype="bfloat16", max_batch_size=64)
    models, ensembles = render(tmp_path, settings, ("ar", "nar"))
    rendered = {
        p.parent.name: p.read_text() for p in [*models.glob("*/config.pbtxt"), *ensembles.glob("*/config.pbtxt")]
    }
    assert set(rendered) == {*MODELS["ar"], *MODELS["nar"], "granite_speech", "granite_speech_nar"}
    for name, text in rendered.items():
        assert "$" not in text, f"{name} has an unfilled placeholder"
        assert re.search(rf'^name: "{name}"$', text, re.M)
        assert "max_batch_size: 64" in text
    encoder = rendered["ar_conformer_encoder"]
    assert "kind: KIND_GPU" in encoder and 'string_value: "bfloat16"' in encoder and "/ckpt/ar" in encoder
    # On a GPU, float tensors between steps stay there in the serving dtype.
    assert (
        '"HIDDEN", data_type: TYPE_BF16' in encoder and '"AUDIO_EMBEDS", data_type: TYPE_BF16' in rendered["nar_head"]
    )
    assert 'FORCE_CPU_ONLY_INPUT_TENSORS", value: { string_value: "no"' in rendered["ar_llm_decoder"]
    assert "/ckpt/ar" in rendered["ar_feature_extractor"]  # its AUDIO_ROWS follow the checkpoint's projector
    for name in MODELS["ar"]:
        assert "dynamic_batching" in rendered[name]
        assert (models / name / "1" / "model.py").is_file()


def test_render_only_the_requested_variant(tmp_path: Path):
    models, ensembles = render(tmp_path, DeploySettings(), ("ar",))
    encoder = (models / "ar_conformer_encoder" / "config.pbtxt").read_text()
    assert '"HIDDEN", data_type: TYPE_FP32' in encoder and 'INPUT_TENSORS", value: { string_value: "yes"' in encoder
    assert sorted(p.name for p in models.iterdir()) == sorted(MODELS["ar"])
    assert [p.name for p in ensembles.iterdir()] == ["granite_speech"]


def test_variable_length_inputs_allow_ragged_batches(tmp_path: Path):
    models, _ = render(tmp_path, DeploySettings(), ("ar",))
    for config in models.glob("*/config.pbtxt"):
        inputs = config.read_text().split("input [")[1].split("]\n")[0]
        for line in inputs.splitlines():
            if "dims: [ -1" in line:
                assert "allow_ragged_batch: true" in line, f"{config.parent.name}: {line.strip()}"


def test_unknown_and_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown setting"):
        DeploySettings.from_strings({"max_batchsize": "8"})
    with pytest.raises(ValueError, match="device"):
        DeploySettings.from_strings({"device": "tpu"})
    assert DeploySettings.from_strings({"max_batch_size": "8", "max_audio_seconds": "30"}).max_batch_size == 8
