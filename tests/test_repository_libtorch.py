"""Rendering with backend=libtorch: exported TorchScript models, libtorch configs, libtorch ensembles."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from granite_speech_triton import export
from granite_speech_triton.serving.repository import LIBTORCH_MODELS, MODELS, DeploySettings, render


@pytest.fixture(scope="module")
def exported(tiny_ar_checkpoint, tiny_nar_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("libtorch")
    export.export(tiny_ar_checkpoint, "ar", out, check=False)
    export.export(tiny_nar_checkpoint, "nar", out, check=False)
    return out


def test_render_libtorch(exported, tmp_path):
    settings = DeploySettings(backend="libtorch", libtorch_dir=str(exported))
    models, ensembles = render(tmp_path, settings, ("ar", "nar"))
    files = [*models.glob("*/config.pbtxt"), *ensembles.glob("*/config.pbtxt")]
    configs = {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in files}
    for name in (*MODELS["ar"], *MODELS["nar"]):
        libtorch = name in LIBTORCH_MODELS
        assert configs[name].backend == ("pytorch" if libtorch else "python")
        assert (models / name / "1" / ("model.pt" if libtorch else "model.py")).is_file()
    for ensemble in ensembles.glob("*/config.pbtxt"):
        config = text_format.Parse(ensemble.read_text(), mc.ModelConfig())
        for step in config.ensemble_scheduling.step:
            model = configs[step.model_name]
            assert set(step.input_map) <= {i.name for i in model.input}, step.model_name
            assert set(step.output_map) <= {o.name for o in model.output}, step.model_name
            required = {i.name for i in model.input if not i.optional}
            assert required <= set(step.input_map), step.model_name


def test_render_libtorch_rejects_a_mismatched_export(exported, tmp_path):
    with pytest.raises(ValueError, match="exported for cpu/float32"):
        render(tmp_path, DeploySettings(backend="libtorch", libtorch_dir=str(exported), device="cuda"), ("ar",))
    with pytest.raises(ValueError, match="libtorch_dir"):
        DeploySettings(backend="libtorch")
