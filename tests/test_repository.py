"""Rendering the Triton templates: every placeholder filled, unknown settings rejected."""

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from granite_speech_triton.serving.repository import (
    ENSEMBLE_FOLDERS,
    ENSEMBLES,
    MODELS,
    STREAMING,
    DeploySettings,
    render,
)


def test_render_fills_every_template(tmp_path: Path):
    settings = DeploySettings(ar_checkpoint="/ckpt/ar", device="cuda", dtype="bfloat16", max_batch_size=64)
    models, ensembles = render(tmp_path, settings, ("ar", "nar"))
    rendered = {
        p.parent.name: p.read_text() for p in [*models.glob("*/config.pbtxt"), *ensembles.glob("*/config.pbtxt")]
    }
    assert set(rendered) == {*MODELS["ar"], *MODELS["nar"], *ENSEMBLE_FOLDERS["ar"], *ENSEMBLE_FOLDERS["nar"]}
    for name, text in rendered.items():
        assert "$" not in text, f"{name} has an unfilled placeholder"
        assert re.search(rf'^name: "{name}"$', text, re.M)
        assert "max_batch_size: 64" in text or name == STREAMING["ar"]  # decoupled, unbatched
    encoder = rendered["ar_conformer_encoder"]
    assert "kind: KIND_GPU" in encoder and 'string_value: "bfloat16"' in encoder and "/ckpt/ar" in encoder
    # On a GPU, float tensors between steps stay there in the serving dtype.
    assert (
        '"HIDDEN", data_type: TYPE_BF16' in encoder and '"AUDIO_EMBEDS", data_type: TYPE_BF16' in rendered["nar_head"]
    )
    assert 'FORCE_CPU_ONLY_INPUT_TENSORS", value: { string_value: "no"' in rendered["ar_llm_decoder"]
    assert "/ckpt/ar" in rendered["ar_feature_extractor"]  # its AUDIO_ROWS follow the checkpoint's projector
    for name in MODELS["ar"]:
        assert "dynamic_batching" in rendered[name] or name == STREAMING["ar"]
        assert (models / name / "1" / "model.py").is_file()
    engine = rendered["ar_llm_engine"]
    assert "decoupled: true" in engine and 'key: "scheduler", value: { string_value: "inflight" }' in engine


def test_render_only_the_requested_variant(tmp_path: Path):
    models, ensembles = render(tmp_path, DeploySettings(), ("ar",))
    encoder = (models / "ar_conformer_encoder" / "config.pbtxt").read_text()
    assert '"HIDDEN", data_type: TYPE_FP32' in encoder and 'INPUT_TENSORS", value: { string_value: "yes"' in encoder
    assert sorted(p.name for p in models.iterdir()) == sorted(MODELS["ar"])
    assert sorted(p.name for p in ensembles.iterdir()) == ["ar_encode", "granite_speech"]


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_every_ensemble_step_matches_its_model_and_streaming_takes_the_ensemble_inputs(tmp_path: Path):
    models, ensembles = render(tmp_path, DeploySettings(), ("ar", "nar"))
    configs = {p.parent.name: parse(p) for p in [*models.glob("*/config.pbtxt"), *ensembles.glob("*/config.pbtxt")]}
    for ensemble in ENSEMBLE_FOLDERS["ar"] + ENSEMBLE_FOLDERS["nar"]:
        for step in configs[ensemble].ensemble_scheduling.step:
            model = configs[step.model_name]
            assert set(step.input_map) <= {i.name for i in model.input}, step.model_name
            assert set(step.output_map) <= {o.name for o in model.output}, step.model_name
            assert {i.name for i in model.input if not i.optional} <= set(step.input_map), step.model_name
    unary, streaming = configs[ENSEMBLES["ar"]], configs[STREAMING["ar"]]
    # timestamps come with a finished transcript: the streaming model takes every input but TIMESTAMPS
    assert [(i.name, i.data_type, [1, *i.dims]) for i in unary.input if i.name != "TIMESTAMPS"] == [
        (i.name, i.data_type, list(i.dims)) for i in streaming.input
    ]
    assert streaming.model_transaction_policy.decoupled and not unary.model_transaction_policy.decoupled


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
    with pytest.raises(ValueError, match="scheduler"):
        DeploySettings(scheduler="continuous")
    with pytest.raises(ValueError, match="kv_tokens_per_row"):
        DeploySettings(kv_tokens_per_row=-1)


def test_every_component_bounds_its_queue_and_rejects_on_timeout(tmp_path: Path):
    settings = DeploySettings(max_queue_size=7, queue_timeout_us=1234)
    models, _ = render(tmp_path, settings, ("ar", "nar"))
    for config in models.glob("*/config.pbtxt"):
        if config.parent.name == STREAMING["ar"]:
            continue  # decoupled and unbatched: it waits on ar_encode and the engine, whose queues are bounded
        batching = config.read_text().split("dynamic_batching {")[1].split("\n}\n")[0]
        policy = " ".join(batching.split())
        assert (
            "default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 1234 max_queue_size: 7 }"
        ) in policy, config.parent.name
    assert DeploySettings().max_queue_size > DeploySettings().max_batch_size  # a full batch can wait by default
    with pytest.raises(ValueError, match="max_queue_size must be 0"):
        DeploySettings(max_queue_size=-1)


LEASED = {"ar_conformer_encoder", "ar_llm_engine", "nar_conformer_encoder", "nar_head"}  # the heavy stages


@pytest.mark.parametrize(("device", "cpu_lease", "leased"), [("cpu", "auto", True), ("cuda", "auto", False),
                                                              ("cpu", "off", False), ("cuda", "on", True)])  # fmt: skip
def test_the_heavy_stages_share_one_cpu_lease_file_where_it_is_on(tmp_path: Path, device, cpu_lease, leased):
    models, _ = render(tmp_path, DeploySettings(device=device, cpu_lease=cpu_lease), ("ar", "nar"))
    files = {}
    for config in models.glob("*/config.pbtxt"):
        parameters = parse(config).parameters
        if "cpu_lease_file" in parameters:
            files[config.parent.name] = parameters["cpu_lease_file"].string_value
    assert set(files) == LEASED
    expected = str((tmp_path / "cpu.lease").resolve()) if leased else ""
    assert set(files.values()) == {expected}
    with pytest.raises(ValueError, match="cpu_lease"):
        DeploySettings(cpu_lease="yes")


@pytest.mark.parametrize("rows_kernel", ["auto", "off"])
def test_the_engine_is_told_whether_to_use_the_rows_kernel(tmp_path: Path, rows_kernel):
    models, _ = render(tmp_path, DeploySettings(rows_kernel=rows_kernel), ("ar",))
    kernels = {
        config.parent.name: parse(config).parameters["rows_kernel"].string_value
        for config in models.glob("*/config.pbtxt")
        if "rows_kernel" in parse(config).parameters
    }
    assert kernels == {"ar_llm_engine": rows_kernel}
    with pytest.raises(ValueError, match="rows_kernel"):
        DeploySettings(rows_kernel="on")
