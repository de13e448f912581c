"""Render the committed Triton templates (model_repository/, ensemble/) into a servable folder.

The committed `config*.pbtxt` files are templates with `${setting}` placeholders; `render` fills
them from `DeploySettings` and writes `<out>/model_repository` and `<out>/ensemble`, the two
folders tritonserver is started with. Unknown settings are rejected, never silently dropped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from string import Template

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = PROJECT_ROOT / "model_repository"
ENSEMBLE_TEMPLATES = PROJECT_ROOT / "ensemble"
VARIANTS = ("ar", "nar")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
TRITON_FLOAT_TYPES = {"float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "float16": "TYPE_FP16"}
BACKENDS = ("python", "libtorch")
SCHEDULERS = ("inflight", "static")
CPU_LEASE = ("auto", "on", "off")
ROWS_KERNEL = ("auto", "off")
CHOICES = {
    "device": DEVICES,
    "dtype": DTYPES,
    "scheduler": SCHEDULERS,
    "backend": BACKENDS,
    "cpu_lease": CPU_LEASE,
    "rows_kernel": ROWS_KERNEL,
}
CPU_LEASE_FILE = "cpu.lease"  # beside the rendered repositories; see serving/cpu_lease.py
POSITIVE = (
    "max_batch_size",
    "instance_count",
    "max_new_tokens_limit",
    "pack_token_budget",
    "max_decode_rows",
    "prefill_token_budget",
)
ZERO_MEANS_NONE = ("max_queue_size", "queue_timeout_us", "kv_tokens_per_row")
# Served from `granite-speech-triton export` TorchScript when backend=libtorch. nar_head stays on the
# Python backend (it detokenises); export.py also writes a standalone libtorch nar_head.
LIBTORCH_MODELS = ("ar_conformer_encoder", "ar_qformer_projector", "nar_conformer_encoder", "nar_qformer_projector")


@dataclass(frozen=True)
class DeploySettings:
    """Every knob a deployer sets; each becomes a Triton parameter or config field."""

    ar_checkpoint: str = "ibm-granite/granite-speech-4.1-2b"  # local directory or hub id
    nar_checkpoint: str = "ibm-granite/granite-speech-4.1-2b-nar"
    nar_revision: str = ""  # hub revision of the NAR checkpoint ("" = default branch)
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    max_batch_size: int = 16  # requests per dynamic batch, every component
    instance_count: int = 1  # model instances per component
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    # Overload: each component rejects a request with UNAVAILABLE when max_queue_size requests are
    # already waiting, or when it has waited queue_timeout_us (0 = unbounded / no timeout).
    max_queue_size: int = 64  # requests waiting per component (4 batches of 16)
    queue_timeout_us: int = 30_000_000  # 30 s in one component's queue
    max_audio_seconds: float = 120.0  # longer audio is rejected (the client splits it)
    max_new_tokens_limit: int = 1024  # upper bound a request's MAX_NEW_TOKENS may ask for
    pack_token_budget: int = 4096  # NAR head: tokens per packed sequence (dense mask cost grows as its square)
    cpu_threads: int = 0  # torch intra-op threads per instance (0 = torch's default)
    # The encoders, NAR head and AR engine compute in turns, not at once (serving/cpu_lease.py).
    cpu_lease: str = "auto"  # auto (on when device=cpu) | on | off
    # AR engine on the CPU: decode steps multiply with model/rows_kernel.c where it builds and runs.
    rows_kernel: str = "auto"  # auto (where it runs) | off (oneMKL)
    scheduler: str = "inflight"  # AR engine: inflight (requests join every step) | static (batch runs to its end)
    max_decode_rows: int = 16  # AR engine: requests decoded together (rows of the KV cache)
    kv_tokens_per_row: int = 0  # AR engine: KV positions per row (0 = max_audio_seconds + max_new_tokens_limit fit)
    prefill_token_budget: int = 2048  # AR engine: prompt tokens prefilled together in one packed forward
    # Shutdown (`serve`): on SIGTERM new requests are refused and those in flight get this long to
    # finish before tritonserver stops (0: stop at once). Orchestrators must wait longer (docker/).
    drain_timeout_s: float = 30.0
    backend: str = "python"  # python | libtorch (encoder and projectors on Triton's PyTorch backend)
    libtorch_dir: str = ""  # backend=libtorch: the `granite-speech-triton export --out` folder

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ZERO_MEANS_NONE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no bound, or derived) or positive")
        if self.max_audio_seconds <= 0:
            raise ValueError("max_audio_seconds must be positive")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be 0 (no drain) or positive")
        if self.backend == "libtorch" and not self.libtorch_dir:
            raise ValueError("backend=libtorch needs libtorch_dir, the folder `granite-speech-triton export` wrote")

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> DeploySettings:
        """Build from key=value strings (CLI, environment); unknown keys are an error."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        converters = {"int": int, "float": float, "str": str}
        return cls(**{k: converters[str(known[k])](v) for k, v in values.items()})

    def template_values(self) -> dict[str, str]:
        values = {k: str(v) for k, v in asdict(self).items()}
        values["instance_kind"] = "KIND_GPU" if self.device == "cuda" else "KIND_CPU"
        # Float tensors between steps: the serving dtype on GPUs (kept in GPU memory), FP32 on the host.
        # Exported libtorch modules exchange FP32 (their contract), so their neighbours do too.
        on_gpu = self.device == "cuda"
        values["float_type"] = TRITON_FLOAT_TYPES[self.dtype] if on_gpu and self.backend == "python" else "TYPE_FP32"
        values["cpu_only_inputs"] = "no" if on_gpu else "yes"
        # the exported (libtorch) AR encoder makes no CTC draft
        values["ar_draft_outputs"] = "" if self.backend == "libtorch" else "DRAFT_IDS,DRAFT_ENTROPY"
        return values


# rendered model name -> (component template folder, template file, extra values)
MODELS: dict[str, dict[str, tuple[str, str, dict[str, str]]]] = {
    "ar": {
        "ar_feature_extractor": ("feature_extractor", "config.pbtxt", {}),
        "ar_conformer_encoder": ("conformer_encoder", "config.ar.pbtxt", {}),
        "ar_qformer_projector": ("qformer_projector", "config.ar.pbtxt", {}),
        "ar_llm_decoder": ("llm_decoder", "config.pbtxt", {}),
        "ar_llm_engine": ("llm_engine", "config.pbtxt", {}),
        "granite_speech_stream": ("stream_pipeline", "config.pbtxt", {}),
        "ar_ctc_aligner": ("ctc_aligner", "config.pbtxt", {}),
    },
    "nar": {
        "nar_feature_extractor": ("feature_extractor", "config.pbtxt", {}),
        "nar_conformer_encoder": ("conformer_encoder", "config.nar.pbtxt", {}),
        "nar_qformer_projector": ("qformer_projector", "config.nar.pbtxt", {}),
        "nar_head": ("nar_head", "config.pbtxt", {}),
        "nar_ctc_aligner": ("ctc_aligner", "config.pbtxt", {}),
    },
}
ENSEMBLES = {"ar": "granite_speech", "nar": "granite_speech_nar"}  # what clients call, per variant
STREAMING = {"ar": "granite_speech_stream"}  # the decoupled entry that streams partial text
# Gauge the streaming entry exports: requests it is serving. Triton 2.51 cannot unload it while a
# client holds a gRPC stream open or has cancelled one, so the launcher's drain reads this instead.
STREAMS_IN_FLIGHT = "granite_speech_streams_in_flight"
# every ensemble template a variant renders (ar_encode is the first half of granite_speech,
# also called by granite_speech_stream)
ENSEMBLE_FOLDERS = {"ar": ("ar_encode", "granite_speech"), "nar": ("granite_speech_nar",)}


def variant_checkpoint(settings: DeploySettings, variant: str) -> dict[str, str]:
    """`${checkpoint}` and `${revision}` of a template shared by both variants."""
    if variant == "nar":
        return {"checkpoint": settings.nar_checkpoint, "revision": settings.nar_revision}
    return {"checkpoint": settings.ar_checkpoint, "revision": ""}


def fill(template: Path, values: dict[str, str]) -> str:
    """Substitute `${name}` placeholders; a placeholder without a value is an error."""
    try:
        return Template(template.read_text()).substitute(values)
    except KeyError as exc:
        raise ValueError(f"{template} needs a value for {exc.args[0]!r}") from exc


def libtorch_model(name: str, settings: DeploySettings, target: Path) -> tuple[Path, dict[str, str]]:
    """Copy an exported model.pt into `target`/1; its libtorch template and the values export.json adds."""
    exported = Path(settings.libtorch_dir) / name
    meta_path = exported / "export.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} not found: run `granite-speech-triton export --variant {name.split('_')[0]}`")
    meta = json.loads(meta_path.read_text())
    if (meta["device"], meta["dtype"]) != (settings.device, settings.dtype):
        raise ValueError(
            f"{exported} was exported for {meta['device']}/{meta['dtype']}, the settings serve "
            f"{settings.device}/{settings.dtype}: export again with --device/--dtype"
        )
    shutil.copy2(exported / "1" / "model.pt", target / "1" / "model.pt")
    return TEMPLATES / meta["template"], meta["template_values"]


def render_model(
    name: str, component: str, template: str, values: dict[str, str], settings: DeploySettings, models_dir: Path
) -> None:
    target = models_dir / name
    (target / "1").mkdir(parents=True)
    if settings.backend == "libtorch" and name in LIBTORCH_MODELS:
        path, more = libtorch_model(name, settings, target)
        values = {**values, **more}
    else:
        path = TEMPLATES / component / template
        shutil.copy2(TEMPLATES / component / "1" / "model.py", target / "1" / "model.py")
    (target / "config.pbtxt").write_text(fill(path, values))


def render_ensemble(name: str, values: dict[str, str], settings: DeploySettings, ensemble_dir: Path) -> None:
    """An ensemble's config, from its libtorch template when that backend serves and it has one."""
    folder = ENSEMBLE_TEMPLATES / name
    template = folder / "config.libtorch.pbtxt"
    if settings.backend != "libtorch" or not template.is_file():
        template = folder / "config.pbtxt"
    (ensemble_dir / name / "1").mkdir(parents=True)
    (ensemble_dir / name / "config.pbtxt").write_text(fill(template, values))


def render(out: Path, settings: DeploySettings, variants: tuple[str, ...] = VARIANTS) -> list[Path]:
    """Write the filled repositories under `out`; returns [model_repository, ensemble] folders."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}, got {variants}")
    models_dir, ensemble_dir = out / "model_repository", out / "ensemble"
    for folder in (models_dir, ensemble_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    base = settings.template_values()
    lease = settings.cpu_lease == "on" or (settings.cpu_lease == "auto" and settings.device == "cpu")
    base["cpu_lease_file"] = str((out / CPU_LEASE_FILE).resolve()) if lease else ""
    for variant in variants:
        for name, (component, template, extra) in MODELS[variant].items():
            values = {**base, **extra, "model_name": name, "variant": variant, **variant_checkpoint(settings, variant)}
            render_model(name, component, template, values, settings, models_dir)
        for ensemble in ENSEMBLE_FOLDERS[variant]:
            render_ensemble(ensemble, {**base, "model_name": ensemble}, settings, ensemble_dir)
    return [models_dir, ensemble_dir]
