"""Export the non-autoregressive components to TorchScript for Triton's PyTorch (libtorch) backend.

    granite-speech-triton export --checkpoint DIR --variant ar|nar --out DIR [--device cuda --dtype bfloat16]

writes one Triton model folder per component, named as `render` names the models:

    <out>/ar_conformer_encoder/1/model.pt   <out>/ar_conformer_encoder/export.json
    <out>/ar_qformer_projector/1/model.pt   ...
    <out>/nar_conformer_encoder/1/model.pt  <out>/nar_qformer_projector/1/model.pt  <out>/nar_head/1/model.pt

The Python backend stays the default and the reference; these modules are an optional GPU path.

How a ragged batch reaches a libtorch model (the templates `config.*.libtorch.pbtxt` declare it):
Triton's PyTorch backend does not pad. An input with `allow_ragged_batch` arrives as ONE flat
tensor, the requests' elements end to end, and a `batch_input` of kind
BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO adds `<INPUT>_OFFSETS` [B + 1] (int32 element offsets)
that tells the requests apart. Each module below pads what it needs internally, masks it, and
returns rows packed the same way; a `batch_output` of kind BATCH_SCATTER_WITH_INPUT_SHAPE then
hands every request exactly its own rows, the output's -1 dimensions taken from the shape of a
source input of that request:
- encoders scatter by FEATURES (one output row per encoder frame);
- projectors scatter by AUDIO_ROWS, an input whose only content is its shape: [n_rows] zeros,
  n_rows = 3 * ceil(frames / 15) (AR) or frames // 5 (NAR), the row count the module checks;
- integer outputs whose length depends on the data are padded with -1 instead: the NAR
  encoder's DRAFT_IDS to one slot per encoder frame, the NAR head's TOKEN_IDS to the batch's
  longest; a consumer drops negative ids.

Each module is a TorchScript *script* (the ragged bookkeeping, whose sizes depend on tensor
values) around *traced* cores (the eager modules on fixed-rank, variable-size tensors). Tracing
bakes in every Python number computed from a shape, so `export` checks each module against the
eager one on lengths that none of the trace examples used, and fails if they differ (check.py).

    ragged_io.py  Triton's flat ragged inputs and outputs
    modules.py    traced cores and the scripted Triton-facing modules
    check.py      exported vs eager: float tolerances, equal ids (float32), id error rate (half precision)
    __init__.py   building each component, writing model.pt and export.json, the command line
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model.audio import FEATURE_DIM
from ..model.config import ARModelConfig, read_config_json
from ..model.encoder import encode_batch, load_encoder
from ..model.errors import CheckpointError
from ..model.nar import (
    PACK_TOKEN_BUDGET,
    load_nar_config,
    load_nar_encoder,
    load_nar_language_model,
    load_nar_projector,
)
from ..model.projector import load_projector, num_audio_tokens
from ..model.weights import DTYPES, parse_dtype, resolve_checkpoint
from .check import Built, ExportError, IdErrors, verify
from .modules import (
    ARWindowCore,
    EncoderCore,
    GraniteCore,
    NAREncoderCore,
    NARFrameCore,
    NARWindowCore,
    TritonARProjector,
    TritonEncoder,
    TritonNAREncoder,
    TritonNARHead,
    TritonNARProjector,
    script,
    trace,
    traceable_encoder,
)

MODEL_FILE = "model.pt"  # the file name Triton's PyTorch backend loads by default
METADATA_FILE = "export.json"
COMPONENTS = {
    "ar": ("ar_conformer_encoder", "ar_qformer_projector"),
    "nar": ("nar_conformer_encoder", "nar_qformer_projector", "nar_head"),
}
# Trace examples. The checks after export use other lengths (check.VERIFY_FRAMES), so a size baked
# into a trace shows up as a mismatch or a shape error instead of passing unnoticed.
TRACE_FRAMES = (230, 97)  # two utterances, one crossing a 200-frame attention block
TRACE_WINDOWS = 4
TRACE_PACKED_TOKENS = 37
WARMUP_FRAMES = 250  # 5 s of audio, as the Python backend's warmup

__all__ = ["COMPONENTS", "ExportError", "ExportedModel", "export", "main", "read_metadata", "verify"]


@dataclass(frozen=True)
class ExportedModel:
    """What `render` needs to serve one exported module (written beside it as export.json)."""

    name: str  # the rendered Triton model name
    template: str  # model_repository/<component>/<file> of the libtorch config template
    input_dim: int  # width of the first (ragged) input's rows
    output_dim: int  # width of the float output's rows (0 for the NAR head)
    warmup_frames: int  # encoder frames of the warmup request (5 s of audio)
    warmup_rows: int  # its audio rows: AUDIO_ROWS of the projectors, AUDIO_EMBEDS of the NAR head
    checkpoint: str
    device: str
    dtype: str
    torch_version: str
    id_error_rate: float | None = None  # token error rate of the ids against the eager model (None: unchecked)

    def template_values(self) -> dict[str, str]:
        """The `${...}` values of the libtorch templates beyond DeploySettings' own."""
        names = ("input_dim", "output_dim", "warmup_frames", "warmup_rows")
        return {name: str(getattr(self, name)) for name in names}


def _features(frames: int, gen: torch.Generator, device) -> Tensor:
    return torch.randn(frames, FEATURE_DIM, generator=gen).to(device)


def build_ar_encoder(checkpoint: Path, device: str, dtype: torch.dtype) -> Built:
    encoder = load_encoder(checkpoint, ARModelConfig.from_dict(read_config_json(checkpoint)).encoder, device, dtype)
    lengths = torch.tensor(TRACE_FRAMES, device=device)
    with traceable_encoder():
        core = trace(EncoderCore(encoder), torch.randn(2, max(TRACE_FRAMES), FEATURE_DIM).to(device, dtype), lengths)
    module = script(TritonEncoder(core, dtype))
    return Built(
        module,
        reference=lambda batch: [[h.float()] for h in encode_batch(encoder, [f for (f,) in batch])],
        example=lambda frames, gen: [[_features(n, gen, device)] for n in frames],
        scatter=(0,),
        metadata=dict(input_dim=FEATURE_DIM, output_dim=encoder.cfg.hidden_dim, warmup_rows=0),
    )


def build_ar_projector(checkpoint: Path, device: str, dtype: torch.dtype) -> Built:
    cfg = ARModelConfig.from_dict(read_config_json(checkpoint)).projector
    projector = load_projector(checkpoint, cfg, device, dtype)
    hidden_dim = projector.qformer.config.encoder_hidden_size
    core = trace(ARWindowCore(projector), torch.randn(TRACE_WINDOWS, cfg.window_size, hidden_dim).to(device, dtype))
    module = script(TritonARProjector(core, dtype, hidden_dim, cfg.window_size))

    def reference(batch: list[list[Tensor]]) -> list[list[Tensor]]:
        with torch.inference_mode():
            return [[rows.float()] for rows in projector([h.to(dtype) for h, _ in batch])]

    def example(frames: list[int], gen: torch.Generator) -> list[list[Tensor]]:
        return [[_rows(n, hidden_dim, gen, device), _shape_only(num_audio_tokens(n, cfg), device)] for n in frames]

    rows = num_audio_tokens(WARMUP_FRAMES, cfg)
    metadata = dict(input_dim=hidden_dim, output_dim=cfg.llm_hidden_size, warmup_rows=rows)
    return Built(module, reference, example, (1,), metadata)


def build_nar_encoder(checkpoint: Path, device: str, dtype: torch.dtype) -> Built:
    cfg = load_nar_config(checkpoint)
    encoder = load_nar_encoder(checkpoint, cfg, device, dtype)
    lengths = torch.tensor(TRACE_FRAMES, device=device)
    with traceable_encoder():
        example = torch.randn(2, max(TRACE_FRAMES), FEATURE_DIM).to(device, dtype)
        core = trace(NAREncoderCore(encoder), example, lengths)
    module = script(TritonNAREncoder(core, dtype, cfg.blank_token_id))

    def reference(batch: list[list[Tensor]]) -> list[list[Tensor]]:
        features = [f for (f,) in batch]
        padded = nn.utils.rnn.pad_sequence(features, batch_first=True)
        out = encoder.encode(padded, torch.tensor([f.shape[0] for f in features], device=device))
        return [
            [x.float(), _draft_slots(draft, f.shape[0], device)]
            for x, draft, f in zip(out.projector_inputs, out.drafts, features, strict=True)
        ]

    output_dim = cfg.encoder.hidden_dim * len(cfg.encoder_layer_indices)
    metadata = dict(input_dim=FEATURE_DIM, output_dim=output_dim, warmup_rows=0)
    example = lambda frames, gen: [[_features(n, gen, device)] for n in frames]  # noqa: E731
    return Built(module, reference, example, (0, 0), metadata)


def build_nar_projector(checkpoint: Path, device: str, dtype: torch.dtype) -> Built:
    cfg = load_nar_config(checkpoint)
    projector = load_nar_projector(checkpoint, cfg, device, dtype)
    pcfg = cfg.projector
    input_dim = pcfg.encoder_dim * pcfg.num_encoder_layers
    frame_core = trace(NARFrameCore(projector), torch.randn(sum(TRACE_FRAMES), input_dim).to(device, dtype))
    windows = torch.randn(TRACE_WINDOWS, pcfg.block_size, pcfg.hidden_size).to(device, dtype)
    module = script(TritonNARProjector(frame_core, trace(NARWindowCore(projector), windows), dtype, pcfg))

    def reference(batch: list[list[Tensor]]) -> list[list[Tensor]]:
        return [[rows.float()] for rows in projector([x.to(dtype) for x, _ in batch])]

    def example(frames: list[int], gen: torch.Generator) -> list[list[Tensor]]:
        return [[_rows(n, input_dim, gen, device), _shape_only(pcfg.rows(n), device)] for n in frames]

    metadata = dict(input_dim=input_dim, output_dim=pcfg.llm_dim, warmup_rows=pcfg.rows(WARMUP_FRAMES))
    return Built(module, reference, example, (1,), metadata)


def build_nar_head(checkpoint: Path, device: str, dtype: torch.dtype, pack_budget: int = PACK_TOKEN_BUDGET) -> Built:
    cfg = load_nar_config(checkpoint)
    language_model = load_nar_language_model(checkpoint, cfg, device, dtype)
    dim = language_model.model.config.hidden_size
    embeds = torch.randn(1, TRACE_PACKED_TOKENS, dim).to(device, dtype)
    mask = torch.zeros(1, 1, TRACE_PACKED_TOKENS, TRACE_PACKED_TOKENS).to(device, dtype)
    positions = torch.arange(TRACE_PACKED_TOKENS, device=device)[None]
    core = trace(GraniteCore(language_model), embeds, mask, positions)
    module = script(TritonNARHead(core, language_model, pack_budget))

    def reference(batch: list[list[Tensor]]) -> list[list[Tensor]]:
        drafts = [[int(t) for t in d.tolist() if t >= 0] for _, d in batch]
        ids = language_model([a.to(dtype) for a, _ in batch], drafts, pack_budget)
        return [[torch.tensor(i, dtype=torch.int32, device=device)] for i in ids]

    rows = cfg.projector.rows

    def example(frames: list[int], gen: torch.Generator) -> list[list[Tensor]]:
        drafts = [torch.randint(cfg.vocab_size, (n // 8,), generator=gen, dtype=torch.int32) for n in frames]
        return [[_rows(rows(n), dim, gen, device), d.to(device)] for n, d in zip(frames, drafts, strict=True)]

    metadata = dict(input_dim=dim, output_dim=0, warmup_rows=rows(WARMUP_FRAMES))
    return Built(module, reference, example, (None,), metadata)


def _rows(count: int, dim: int, gen: torch.Generator, device) -> Tensor:
    return torch.randn(count, dim, generator=gen).to(device)


def _shape_only(count: int, device) -> Tensor:
    return torch.zeros(count, dtype=torch.int8, device=device)


def _draft_slots(draft: list[int], frames: int, device) -> Tensor:
    slots = torch.full((frames,), -1, dtype=torch.int32, device=device)
    slots[: len(draft)] = torch.tensor(draft, dtype=torch.int32, device=device)
    return slots


BUILDERS: dict[str, tuple[str, Callable[[Path, str, torch.dtype], Built]]] = {
    "ar_conformer_encoder": ("conformer_encoder/config.ar.libtorch.pbtxt", build_ar_encoder),
    "ar_qformer_projector": ("qformer_projector/config.ar.libtorch.pbtxt", build_ar_projector),
    "nar_conformer_encoder": ("conformer_encoder/config.nar.libtorch.pbtxt", build_nar_encoder),
    "nar_qformer_projector": ("qformer_projector/config.nar.libtorch.pbtxt", build_nar_projector),
    "nar_head": ("nar_head/config.libtorch.pbtxt", build_nar_head),
}


def export(
    checkpoint: str | Path,
    variant: str,
    out_dir: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    check: bool = True,
) -> list[Path]:
    """Write `<out_dir>/<model name>/1/model.pt` (+ export.json) for each non-autoregressive component.

    The modules are traced on `device` and hold device-specific constants: export on the device (and
    torch version) that will serve them. Returns the written model.pt paths.
    """
    if variant not in COMPONENTS:
        raise ValueError(f"variant must be one of {sorted(COMPONENTS)}, got {variant!r}")
    torch_dtype = parse_dtype(dtype)
    path = resolve_checkpoint(checkpoint)
    written = []
    for name in COMPONENTS[variant]:
        template, builder = BUILDERS[name]
        built = builder(path, device, torch_dtype)
        id_errors = checked(name, built, dtype) if check else None
        target = Path(out_dir) / name
        (target / "1").mkdir(parents=True, exist_ok=True)
        built.module.save(str(target / "1" / MODEL_FILE))
        metadata = ExportedModel(
            name=name,
            template=template,
            warmup_frames=WARMUP_FRAMES,
            checkpoint=str(path),
            device=device,
            dtype=dtype,
            torch_version=torch.__version__,
            id_error_rate=None if id_errors is None else id_errors.rate,
            **built.metadata,
        )
        record = {**asdict(metadata), "template_values": metadata.template_values()}  # for render, which needs no torch
        (target / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        written.append(target / "1" / MODEL_FILE)
    return written


def checked(name: str, built: Built, dtype: str) -> IdErrors:
    """`verify` the module; prints the id error rate (half precision) that it checked against its bound."""
    try:
        id_errors = verify(built, dtype)
    except ExportError as exc:
        raise ExportError(f"{name}: {exc}") from exc
    if dtype != "float32" and id_errors.reference_tokens:
        print(f"{name}: {dtype} id error rate vs eager {id_errors.rate:.2%} ({id_errors.edits} edits)")
    return id_errors


def read_metadata(model_dir: str | Path) -> ExportedModel:
    """The export.json that `export` wrote beside a model.pt (for rendering its config)."""
    record = json.loads((Path(model_dir) / METADATA_FILE).read_text())
    record.pop("template_values")
    return ExportedModel(**record)


def main(argv: list[str] | None = None) -> int:
    """`granite-speech-triton export --checkpoint DIR --variant ar|nar --out DIR [--device --dtype]`."""
    parser = argparse.ArgumentParser(prog="granite-speech-triton export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="local checkpoint directory or hub id")
    parser.add_argument("--variant", required=True, choices=sorted(COMPONENTS))
    parser.add_argument("--out", required=True, type=Path, help="folder for the <model name>/1/model.pt folders")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the device that will serve them")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--no-check", action="store_true", help="skip comparing each module with the eager one")
    args = parser.parse_args(argv)
    try:
        written = export(args.checkpoint, args.variant, args.out, args.device, args.dtype, check=not args.no_check)
    except (CheckpointError, ExportError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    for path in written:
        print(path)
    return 0
