"""Checkpoint resolution and strict, prefix-scoped safetensors loading.

Loading is lean: a module is built with its parameters on the meta device (no memory, no random
init) and the checkpoint's tensors are read straight into the serving device and dtype, so a 2B
LLM costs one copy of its weights, on the device that serves it, and no initialisation time.
On the CPU, tensors already in the serving dtype stay mapped from the safetensors file (pages are
read on first use and shared between processes): do not rewrite a checkpoint in place while a
server uses it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import nn

from .errors import CheckpointError

# Buffers that PyTorch tracks but inference never reads; a checkpoint may or may not carry them.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def resolve_checkpoint(checkpoint: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id downloaded through huggingface_hub."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(checkpoint).startswith(("/", ".", "~")) or str(checkpoint).count("/") != 1:
        raise CheckpointError(f"checkpoint {checkpoint!r} is neither a directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(checkpoint), revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise CheckpointError(f"could not fetch checkpoint {checkpoint!r} from the Hugging Face hub: {exc}") from exc


def safetensors_files(checkpoint: Path, filename: str = "model.safetensors") -> dict[str, Path]:
    """Map every tensor name to the file holding it (single file or sharded with an index)."""
    index = checkpoint / f"{filename}.index.json"
    if index.is_file():
        with index.open() as f:
            weight_map = json.load(f)["weight_map"]
        return {key: checkpoint / name for key, name in weight_map.items()}
    single = checkpoint / filename
    if not single.is_file():
        raise CheckpointError(f"{checkpoint} has neither {filename} nor {filename}.index.json")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def read_tensors(
    checkpoint: Path,
    prefix: str,
    filename: str = "model.safetensors",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors whose names start with `prefix`, with the prefix removed, read onto `device`.

    With `dtype`, floating tensors are converted one by one as they are read.
    """
    by_file: dict[Path, list[str]] = {}
    for key, file in safetensors_files(checkpoint, filename).items():
        if key.startswith(prefix):
            by_file.setdefault(file, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                tensors[key[len(prefix) :]] = tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
    return tensors


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Put `tensors` into `module` (the tensors themselves, not copies), failing with the offending key
    on any mismatch.

    `prefix` only names keys in messages (the checkpoint's full key names).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith(OPTIONAL_SUFFIXES)]
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor '{prefix}{missing[0]}' ({len(missing)} missing)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensor '{prefix}{unexpected[0]}'")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor '{prefix}{key}' has shape {list(tensor.shape)}, the config implies {list(expected[key].shape)}"
            )
    module.load_state_dict(tensors, strict=False, assign=True)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no memory, and initialisation
    costs nothing. Buffers are built as usual, so values that a module computes at construction
    (rotary frequencies, relative-position tables) stay right. Not thread-safe: it swaps
    `nn.Module.register_parameter` while the block runs.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


M = TypeVar("M", bound=nn.Module)


def load_module(
    build: Callable[[], M],
    checkpoint: Path,
    prefix: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    filename: str = "model.safetensors",
) -> M:
    """`build()` with the checkpoint's tensors under `prefix` (e.g. 'encoder.'), on `device`, in eval mode.

    Parameters and checkpoint buffers arrive in `dtype` (floating ones); buffers the module computes
    itself keep the dtype it gave them, as in transformers' `from_pretrained` (rotary frequencies
    stay float32). `convert` rewrites the tensors before loading (older checkpoint layouts).
    """
    with parameters_on_meta():
        module = build()
    tensors = read_tensors(Path(checkpoint), prefix, filename, device, dtype)
    load_into(module, convert(tensors) if convert else tensors, prefix)
    return module.to(device).eval()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> torch dtype, with a clear error otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
