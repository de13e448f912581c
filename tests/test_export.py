"""TorchScript export for Triton's PyTorch (libtorch) backend, on CPU float32 with the tiny checkpoints.

Each exported module is reloaded with torch.jit.load and fed as Triton's PyTorch backend feeds a
ragged dynamic batch: every input flattened, requests end to end, plus the batch inputs its libtorch
config declares, bound to forward arguments by name; its outputs are split per request as the
config's batch_output (or the first dimension) tells Triton to. Every request's part must equal the
eager module's output for that request alone. The lengths differ from every trace example
(export.TRACE_FRAMES, TRACE_WINDOWS, TRACE_PACKED_TOKENS). The libtorch backend itself is not on
this machine: the templates are checked structurally against the modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from granite_speech_triton import export
from granite_speech_triton.export import check as export_check
from granite_speech_triton.model.audio import FEATURE_DIM
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.encoder import encode_batch, load_encoder
from granite_speech_triton.model.nar import (
    NARModelConfig,
    load_nar_config,
    load_nar_encoder,
    load_nar_language_model,
    load_nar_model,
    load_nar_projector,
)
from granite_speech_triton.model.projector import load_projector, num_audio_tokens
from granite_speech_triton.serving.repository import ENSEMBLE_TEMPLATES, TEMPLATES, DeploySettings, fill

SINGLE_FRAMES = [1, 3, 15, 199, 200, 201, 333]  # around the 200-frame attention blocks and 15-frame windows
MIXED_FRAMES = [201, 3, 457, 16, 60]  # one padded batch of mixed lengths
TORCH_TYPES = {mc.TYPE_FP32: torch.float32, mc.TYPE_INT32: torch.int32, mc.TYPE_INT8: torch.int8}
Request = dict[str, torch.Tensor]  # Triton tensor name -> [1, ...] (batch dimension first)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine they spin and wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ar_export(tiny_ar_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export-ar")
    assert export.main(["--checkpoint", str(tiny_ar_checkpoint), "--variant", "ar", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def nar_export(tiny_nar_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export-nar")
    export.export(tiny_nar_checkpoint, "nar", out)
    return out


@pytest.fixture(scope="module")
def ar_config(tiny_ar_checkpoint: Path) -> ARModelConfig:
    return ARModelConfig.from_dict(read_config_json(tiny_ar_checkpoint))


@pytest.fixture(scope="module")
def nar_config(tiny_nar_checkpoint: Path) -> NARModelConfig:
    return load_nar_config(tiny_nar_checkpoint)


# Eager modules, loaded once for the whole file.
@pytest.fixture(scope="module")
def ar_encoder(tiny_ar_checkpoint, ar_config):
    return load_encoder(tiny_ar_checkpoint, ar_config.encoder)


@pytest.fixture(scope="module")
def ar_projector(tiny_ar_checkpoint, ar_config):
    return load_projector(tiny_ar_checkpoint, ar_config.projector)


@pytest.fixture(scope="module")
def nar_encoder(tiny_nar_checkpoint, nar_config):
    return load_nar_encoder(tiny_nar_checkpoint, nar_config)


@pytest.fixture(scope="module")
def nar_projector(tiny_nar_checkpoint, nar_config):
    return load_nar_projector(tiny_nar_checkpoint, nar_config)


@pytest.fixture(scope="module")
def nar_language_model(tiny_nar_checkpoint, nar_config):
    return load_nar_language_model(tiny_nar_checkpoint, nar_config)


@functools.cache
def load(out: Path, name: str) -> tuple[torch.jit.ScriptModule, mc.ModelConfig]:
    """The exported module as the backend loads it, and its libtorch config rendered from the template."""
    meta = export.read_metadata(out / name)
    values = {**DeploySettings().template_values(), **meta.template_values()}
    text = fill(TEMPLATES / meta.template, {**values, "model_name": name, "variant": name.split("_")[0]})
    return torch.jit.load(str(out / name / "1" / export.MODEL_FILE)), text_format.Parse(text, mc.ModelConfig())


def triton_execute(module: torch.jit.ScriptModule, config: mc.ModelConfig, requests: list[Request]) -> list[Request]:
    """One dynamic batch through a libtorch model, the way Triton's PyTorch backend runs it."""
    arguments = {}
    for spec in config.input:
        tensors = [r[spec.name] for r in requests]
        assert all(t.dtype == TORCH_TYPES[spec.data_type] and t.shape[0] == 1 for t in tensors), spec.name
        # A ragged input arrives flat ([total elements]); others are concatenated on the batch dimension.
        arguments[spec.name] = torch.cat([t.reshape(-1) if spec.allow_ragged_batch else t for t in tensors])
    for spec in config.batch_input:
        assert spec.kind == mc.BatchInput.BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO
        counts = [r[spec.source_input[0]].numel() for r in requests]
        arguments[spec.target_name[0]] = torch.tensor([0, *itertools.accumulate(counts)]).to(
            TORCH_TYPES[spec.data_type]
        )
    with torch.no_grad(), torch.jit.optimized_execution(False):  # the templates' DISABLE_OPTIMIZED_EXECUTION
        outputs = module(**arguments)  # bound by forward argument name, as the backend does
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    scatter = {spec.target_name[0]: spec.source_input[0] for spec in config.batch_output}
    responses: list[Request] = [{} for _ in requests]
    for spec, value in zip(config.output, outputs, strict=True):  # outputs in config order
        assert value.dtype == TORCH_TYPES[spec.data_type], spec.name
        flat, offset = value.reshape(-1), 0
        if spec.name not in scatter:
            assert value.shape[0] == len(requests), f"{spec.name} must be batched on its first dimension"
        for request, response in zip(requests, responses, strict=True):
            if spec.name in scatter:  # BATCH_SCATTER_WITH_INPUT_SHAPE: -1 dims from the source input's shape
                source = request[scatter[spec.name]].shape
                shape = [source[i] if d == -1 else d for i, d in enumerate([-1, *spec.dims])]
            else:
                shape = [1, *value.shape[1:]]
            response[spec.name] = flat[offset : offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
        assert offset == flat.numel(), f"{spec.name}: {flat.numel() - offset} elements left after the scatter"
    return responses


def features(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(frames, FEATURE_DIM, generator=torch.Generator().manual_seed(seed))


def shape_only(rows: int) -> torch.Tensor:
    return torch.zeros(1, rows, dtype=torch.int8)


def ids(value: torch.Tensor) -> list[int]:
    """A -1 padded id output of one request -> its ids."""
    return [int(i) for i in value.reshape(-1) if i >= 0]


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- files ----------------------------------------------------------------------------------------


def test_export_writes_one_triton_model_folder_per_component(ar_export: Path, nar_export: Path):
    for out, variant in ((ar_export, "ar"), (nar_export, "nar")):
        assert sorted(p.name for p in out.iterdir()) == sorted(export.COMPONENTS[variant])
        for name in export.COMPONENTS[variant]:
            assert (out / name / "1" / "model.pt").is_file()
            meta = export.read_metadata(out / name)
            assert (meta.name, meta.device, meta.dtype) == (name, "cpu", "float32")
            assert (TEMPLATES / meta.template).is_file()


def test_export_rejects_an_unknown_variant(tiny_ar_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="variant"):
        export.export(tiny_ar_checkpoint, "xl", tmp_path)


def test_export_fails_when_a_trace_keeps_a_size_as_a_constant(tiny_ar_checkpoint, monkeypatch):
    # Without the traceable ceil, the attention's block count of the trace example (2) is baked in.
    monkeypatch.setattr(export, "traceable_encoder", contextlib.nullcontext)
    built = export.build_ar_encoder(tiny_ar_checkpoint, "cpu", torch.float32)
    with pytest.raises(export.ExportError, match="457"):
        export.verify(built, "float32")


# --- each module equals its eager counterpart ----------------------------------------------------


@pytest.mark.parametrize("frames", [*([n] for n in SINGLE_FRAMES), MIXED_FRAMES], ids=str)
def test_ar_encoder(ar_export, ar_encoder, frames):
    module, config = load(ar_export, "ar_conformer_encoder")
    inputs = [features(n, seed) for seed, n in enumerate(frames)]
    responses = triton_execute(module, config, [{"FEATURES": f[None]} for f in inputs])
    for x, response in zip(inputs, responses, strict=True):
        close(response["HIDDEN"][0], encode_batch(ar_encoder, [x])[0])


@pytest.mark.parametrize("frames", [*([n] for n in SINGLE_FRAMES), MIXED_FRAMES], ids=str)
def test_ar_projector(ar_export, ar_config, ar_projector, frames):
    module, config = load(ar_export, "ar_qformer_projector")
    cfg = ar_config
    hidden = [features(n, seed)[:, : cfg.encoder.hidden_dim] for seed, n in enumerate(frames)]
    requests = [{"HIDDEN": h[None], "AUDIO_ROWS": shape_only(num_audio_tokens(len(h), cfg.projector))} for h in hidden]
    with torch.inference_mode():
        expected = [ar_projector([h])[0] for h in hidden]
    for response, rows in zip(triton_execute(module, config, requests), expected, strict=True):
        close(response["AUDIO_EMBEDS"][0], rows)


def test_projector_rejects_audio_rows_that_do_not_match(ar_export):
    module, config = load(ar_export, "ar_qformer_projector")
    with pytest.raises(torch.jit.Error, match="AUDIO_ROWS"):
        triton_execute(module, config, [{"HIDDEN": torch.randn(1, 30, 32), "AUDIO_ROWS": shape_only(5)}])


@pytest.mark.parametrize("frames", [*([n] for n in SINGLE_FRAMES), MIXED_FRAMES], ids=str)
def test_nar_encoder(nar_export, nar_encoder, frames):
    module, config = load(nar_export, "nar_conformer_encoder")
    inputs = [features(n, seed) for seed, n in enumerate(frames)]
    responses = triton_execute(module, config, [{"FEATURES": f[None]} for f in inputs])
    for x, response in zip(inputs, responses, strict=True):
        expected = nar_encoder.encode(x[None], torch.tensor([len(x)]))
        close(response["PROJECTOR_INPUT"][0], expected.projector_inputs[0])
        assert response["DRAFT_IDS"].shape == (1, len(x))  # one slot per frame, -1 after the draft
        assert ids(response["DRAFT_IDS"]) == expected.drafts[0]


@pytest.mark.parametrize("frames", [*([n] for n in SINGLE_FRAMES), MIXED_FRAMES], ids=str)
def test_nar_projector(nar_export, nar_config, nar_projector, frames):
    module, config = load(nar_export, "nar_qformer_projector")
    cfg = nar_config
    width = cfg.projector.encoder_dim * cfg.projector.num_encoder_layers
    inputs = [torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) for seed, n in enumerate(frames)]
    requests = [{"PROJECTOR_INPUT": x[None], "AUDIO_ROWS": shape_only(len(x) // 5)} for x in inputs]
    for response, x in zip(triton_execute(module, config, requests), inputs, strict=True):
        close(response["AUDIO_EMBEDS"][0], nar_projector([x])[0])


@pytest.mark.parametrize("pack_budget", [export.PACK_TOKEN_BUDGET, 40])  # 40: several packed rows per batch
def test_nar_head(nar_export, tiny_nar_checkpoint, nar_language_model, tmp_path, pack_budget):
    module, config = load(nar_export, "nar_head")
    language_model = nar_language_model
    if pack_budget != export.PACK_TOKEN_BUDGET:
        built = export.build_nar_head(tiny_nar_checkpoint, "cpu", torch.float32, pack_budget)
        built.module.save(str(tmp_path / "head.pt"))
        module = torch.jit.load(str(tmp_path / "head.pt"))
    gen = torch.Generator().manual_seed(0)
    vocab, dim = language_model.model.config.vocab_size, language_model.model.config.hidden_size
    shapes = [(1, 0), (7, 3), (40, 12), (2, 1), (23, 9), (66, 30)]  # (audio rows, draft length)
    drafts = [torch.randint(vocab, (n,), generator=gen, dtype=torch.int32) for _, n in shapes]
    audio = [torch.randn(rows, dim, generator=gen) for rows, _ in shapes]
    padded = [torch.cat([d, torch.full((3,), -1, dtype=torch.int32)]) for d in drafts]  # -1s are ignored
    requests = [{"AUDIO_EMBEDS": a[None], "DRAFT_IDS": d[None]} for a, d in zip(audio, padded, strict=True)]
    responses = triton_execute(module, config, requests)
    longest = max(len(r["TOKEN_IDS"][0]) for r in responses)
    for a, d, response in zip(audio, drafts, responses, strict=True):
        assert response["TOKEN_IDS"].shape == (1, longest)  # padded with -1 to the batch's longest
        assert ids(response["TOKEN_IDS"]) == language_model([a], [d.tolist()])[0]


def test_nar_modules_chained_as_in_the_libtorch_ensemble(nar_export, tiny_nar_checkpoint):
    """encoder -> projector (AUDIO_ROWS from the frame count) -> head, with the encoder's -1 padded drafts."""
    encoder, encoder_config = load(nar_export, "nar_conformer_encoder")
    projector, projector_config = load(nar_export, "nar_qformer_projector")
    head, head_config = load(nar_export, "nar_head")
    inputs = [features(n, seed) for seed, n in enumerate(MIXED_FRAMES)]
    encoded = triton_execute(encoder, encoder_config, [{"FEATURES": f[None]} for f in inputs])
    projected = triton_execute(
        projector,
        projector_config,
        [
            {"PROJECTOR_INPUT": e["PROJECTOR_INPUT"], "AUDIO_ROWS": shape_only(len(f) // 5)}
            for e, f in zip(encoded, inputs, strict=True)
        ],
    )
    requests = [
        {"AUDIO_EMBEDS": p["AUDIO_EMBEDS"], "DRAFT_IDS": e["DRAFT_IDS"]}
        for p, e in zip(projected, encoded, strict=True)
    ]
    got = [ids(r["TOKEN_IDS"]) for r in triton_execute(head, head_config, requests)]
    assert got == load_nar_model(tiny_nar_checkpoint).transcribe_ids(inputs)


# --- templates --------------------------------------------------------------------------------------


def warmup_requests(config: mc.ModelConfig) -> list[Request]:
    (warmup,) = config.model_warmup
    request = {}
    for name, spec in warmup.inputs.items():
        dtype = TORCH_TYPES[spec.data_type]
        value = torch.randn(*spec.dims) if spec.random_data else torch.zeros(*spec.dims)
        request[name] = value.to(dtype)[None]
    return [request] * warmup.batch_size


@pytest.mark.parametrize("name", [*export.COMPONENTS["ar"], *export.COMPONENTS["nar"]])
def test_libtorch_template_matches_its_module(ar_export, nar_export, name):
    module, config = load(ar_export if name.startswith("ar_") else nar_export, name)
    assert config.backend == "pytorch" and config.max_batch_size > 0 and config.HasField("dynamic_batching")
    assert {p: v.string_value for p, v in config.parameters.items()}["DISABLE_OPTIMIZED_EXECUTION"] == "true"
    # The backend binds config inputs and batch inputs to forward arguments by name, all of them.
    arguments = [a.name for a in module.forward.schema.arguments[1:]]
    names = [i.name for i in config.input] + [t for b in config.batch_input for t in b.target_name]
    assert sorted(arguments) == sorted(names)
    assert all(i.allow_ragged_batch for i in config.input if i.dims[0] == -1)
    assert {s for b in config.batch_output for s in b.source_input} <= {i.name for i in config.input}
    # The warmup request runs (its AUDIO_ROWS agree with the module) and gives the declared shapes.
    for response in triton_execute(module, config, warmup_requests(config)):
        for spec in config.output:
            shape = response[spec.name].shape[1:]
            assert len(shape) == len(spec.dims)
            assert all(d in (-1, s) for d, s in zip(spec.dims, shape, strict=True)), (spec.name, shape)


@pytest.mark.parametrize(
    ("ensemble", "variant"), [("ar_encode", "ar"), ("granite_speech", "ar"), ("granite_speech_nar", "nar")]
)
def test_libtorch_ensembles_keep_the_client_contract(ar_export, nar_export, ensemble, variant):
    """The same inputs and outputs as the Python-backend ensembles, but for the CTC draft, which
    the exported AR encoder does not make (draft decoding modes need the Python encoder)."""
    values = {**DeploySettings().template_values(), "model_name": ensemble}
    parse = lambda path: text_format.Parse(fill(path, values), mc.ModelConfig())  # noqa: E731
    libtorch, python = (
        parse(ENSEMBLE_TEMPLATES / ensemble / "config.libtorch.pbtxt"),
        parse(ENSEMBLE_TEMPLATES / ensemble / "config.pbtxt"),
    )
    assert libtorch.input == python.input
    if ensemble == "ar_encode":  # internal (no client calls it): the exported encoder makes no draft, no pooled rows
        assert [o.name for o in python.output if o not in libtorch.output] == ["DRAFT_IDS", "DRAFT_ENTROPY", "POOLED"]
        assert all(o in python.output for o in libtorch.output)
    else:
        assert libtorch.output == python.output
    out = ar_export if variant == "ar" else nar_export
    for step in libtorch.ensemble_scheduling.step:
        if step.model_name in export.COMPONENTS[variant] and step.model_name != "nar_head":  # nar_head stays Python
            _, config = load(out, step.model_name)
            assert set(step.input_map) == {i.name for i in config.input}, step.model_name
            assert set(step.output_map) <= {o.name for o in config.output}, step.model_name


# --- half precision: ids are compared with a stated bound ------------------------------------------


def test_half_precision_export_reports_its_id_error_rate(tiny_nar_checkpoint, tmp_path):
    written = export.export(tiny_nar_checkpoint, "nar", tmp_path, dtype="bfloat16")
    rates = {path.parent.parent.name: export.read_metadata(path.parent.parent).id_error_rate for path in written}
    assert set(rates) == set(export.COMPONENTS["nar"])
    assert all(0.0 <= rate <= export_check.HALF_PRECISION_ID_ERROR_BOUND for rate in rates.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ids_that_drift_from_the_eager_model_fail_the_export(tiny_nar_checkpoint, dtype):
    built = export.build_nar_head(tiny_nar_checkpoint, "cpu", dtype)
    drifted = dataclasses.replace(built, reference=lambda batch: [[ids[0] + 1] for ids in built.reference(batch)])
    name = str(dtype).removeprefix("torch.")
    expected = "exported ids" if dtype == torch.float32 else "id error rate 100.00%"
    with pytest.raises(export.ExportError, match=expected):
        export.verify(drifted, name)
    assert export.verify(built, name).rate <= export_check.HALF_PRECISION_ID_ERROR_BOUND  # undrifted, it passes
