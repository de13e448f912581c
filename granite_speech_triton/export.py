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
eager one on lengths that none of the trace examples used, and fails if they differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import encoder as encoder_module
from .model.audio import FEATURE_DIM
from .model.config import ARModelConfig, read_config_json
from .model.draft import CHAR_CTC_BLANK, posterior_weighted_pool
from .model.encoder import ConformerEncoder, encode_batch, frame_mask, load_encoder
from .model.errors import CheckpointError
from .model.nar import (
    PACK_TOKEN_BUDGET,
    NAREncoder,
    NARLanguageModel,
    NARProjector,
    NARProjectorConfig,
    load_nar_config,
    load_nar_encoder,
    load_nar_language_model,
    load_nar_projector,
)
from .model.projector import QFormerProjector, load_projector, num_audio_tokens
from .model.weights import DTYPES, parse_dtype, resolve_checkpoint

MODEL_FILE = "model.pt"  # the file name Triton's PyTorch backend loads by default
METADATA_FILE = "export.json"
COMPONENTS = {
    "ar": ("ar_conformer_encoder", "ar_qformer_projector"),
    "nar": ("nar_conformer_encoder", "nar_qformer_projector", "nar_head"),
}
# Trace examples. The checks after export use other lengths (VERIFY_FRAMES), so a size baked
# into a trace shows up as a mismatch or a shape error instead of passing unnoticed.
TRACE_FRAMES = (230, 97)  # two utterances, one crossing a 200-frame attention block
TRACE_WINDOWS = 4
TRACE_PACKED_TOKENS = 37
VERIFY_FRAMES = ((457, 3, 201), (16,))
WARMUP_FRAMES = 250  # 5 s of audio, as the Python backend's warmup
TOLERANCES = {  # (atol, rtol) between exported and eager float outputs, per dtype
    "float32": (1e-4, 1e-4),
    "bfloat16": (5e-2, 5e-2),
    "float16": (1e-2, 1e-2),
}


class ExportError(RuntimeError):
    """An exported module does not reproduce its eager counterpart."""


# ---------------------------------------------------------------------------------------------
# Ragged-batch bookkeeping, compiled by TorchScript into each exported module


def segment_lengths(offsets: Tensor, width: int) -> Tensor:
    """Element offsets [B + 1] of a flat ragged input -> rows per request [B] (rows of `width` elements)."""
    offsets = offsets.to(torch.long)
    return torch.div(offsets[1:] - offsets[:-1], width, rounding_mode="floor")


def ragged_index(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Rows per request [B] -> (request, position in its request) of each packed row, both [sum lengths]."""
    requests = torch.arange(lengths.shape[0], device=lengths.device)
    owner = torch.repeat_interleave(requests, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(owner.shape[0], device=lengths.device) - starts[owner]
    return owner, position


def pad_packed(rows: Tensor, owner: Tensor, position: Tensor, lengths: Tensor) -> Tensor:
    """Packed rows [N, F] -> zero-padded [B, max(lengths), F]."""
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    padded = rows.new_zeros([lengths.shape[0], longest, rows.shape[1]])
    padded[owner, position] = rows
    return padded


def pack_windows(rows: Tensor, lengths: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Packed rows [N, H] -> (windows [sum ceil(len / window), window, H] zero-padded per request, windows [B])."""
    counts = torch.div(lengths + window - 1, window, rounding_mode="floor")
    first = torch.cumsum(counts, 0) - counts
    owner, position = ragged_index(lengths)
    windows = rows.new_zeros([int(counts.sum()), window, rows.shape[1]])
    windows[first[owner] + torch.div(position, window, rounding_mode="floor"), position % window] = rows
    return windows, counts


def take_leading(rows: Tensor, available: Tensor, keep: Tensor) -> Tensor:
    """Packed rows, `available` [B] per request -> the first `keep` [B] rows of each request, packed."""
    starts = torch.cumsum(available, 0) - available
    owner, position = ragged_index(keep)
    return rows[starts[owner] + position]


def ctc_keep(ids: Tensor, lengths: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """Greedy CTC collapse of segments stored back to back -> (kept ids packed, kept per segment [B]).

    The tensor form of `model.ctc.ctc_collapse_segments`: merge runs (never across segments), drop `blank`.
    """
    new_run = torch.ones_like(ids, dtype=torch.bool)
    if ids.numel() > 1:
        new_run[1:] = ids[1:] != ids[:-1]
    starts = torch.cumsum(lengths, 0) - lengths
    new_run[starts[lengths > 0]] = True
    keep = new_run & (ids != blank)
    owner, _ = ragged_index(lengths)
    counts = torch.bincount(owner[keep], minlength=lengths.shape[0])
    return ids[keep], counts


def drop_negative(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Packed ids with -1 padding -> (the non-negative ids packed, count per request [B])."""
    owner, _ = ragged_index(lengths)
    keep = ids >= 0
    return ids[keep], torch.bincount(owner[keep], minlength=lengths.shape[0])


def place_padded(values: Tensor, counts: Tensor, slots: Tensor, fill: int) -> Tensor:
    """Packed values (counts [B] per request) -> packed [sum slots], each request's values first, `fill` after."""
    out = torch.full([int(slots.sum())], fill, dtype=values.dtype, device=values.device)
    owner, position = ragged_index(counts)
    starts = torch.cumsum(slots, 0) - slots
    out[starts[owner] + position] = values
    return out


def check_rows(name: str, expected: Tensor, offsets: Tensor) -> None:
    """Fail the batch if a shape-only input (AUDIO_ROWS) does not announce `expected` [B] rows per request."""
    announced = segment_lengths(offsets, 1)
    if not bool(torch.equal(announced, expected)):
        raise RuntimeError(name + " must have one element per output row: 3*ceil(frames/15) (AR) or frames//5 (NAR)")


# ---------------------------------------------------------------------------------------------
# Traced cores: the eager modules on fixed-rank tensors whose sizes vary


def _traceable_ceil(value: float | Tensor) -> int | Tensor:
    return torch.ceil(value).to(torch.long) if isinstance(value, Tensor) else math.ceil(value)


@contextlib.contextmanager
def traceable_encoder() -> Iterator[None]:
    """While tracing, `math.ceil(frames / block)` in the encoder's attention stays a tensor op.

    Under tracing a shape is a 0-dim tensor; `math.ceil` would turn it into a Python number that the
    trace keeps as a constant (the block count of the example). Exact for fewer than ~8e6 frames.
    """
    if not hasattr(encoder_module, "math"):  # the encoder no longer calls math.ceil: nothing to patch
        yield
        return
    public = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")}
    with mock.patch.object(encoder_module, "math", types.SimpleNamespace(**{**public, "ceil": _traceable_ceil})):
        yield


class EncoderCore(nn.Module):
    """features [B, T, 160], lengths [B] -> final hidden states [B, T, D] (rows past a length undefined)."""

    def __init__(self, encoder: ConformerEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        return self.encoder(features, lengths).last_hidden_state


class NAREncoderCore(nn.Module):
    """features [B, T, 160], lengths [B] -> projector input [B, T, L*D], BPE argmax ids [sum P_i], P_i [B].

    `NAREncoder.encode` up to the CTC collapse, as tensors (the collapse runs in the scripted wrapper).
    """

    def __init__(self, encoder: NAREncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        encoder = self.encoder
        out = encoder(features, lengths, keep_hidden_states=True)
        stacked = torch.cat([out.hidden_states[i] for i in encoder.layer_indices], dim=-1)  # [B, T, L*D]
        blank_prob = torch.softmax(out.self_conditioning_logits.float(), dim=-1)[..., CHAR_CTC_BLANK]  # [B, T]
        window = encoder.cfg.bpe_pooling_window
        hidden = out.last_hidden_state
        pooled = posterior_weighted_pool(hidden.float(), 1.0 - blank_prob, lengths, window).to(hidden.dtype)
        pooled_lengths = (lengths + window - 1) // window  # [B]
        rows = pooled[frame_mask(pooled_lengths, pooled.shape[1])]  # [sum P_i, D]
        return stacked, encoder.out_bpe(rows).argmax(dim=-1), pooled_lengths


class ARWindowCore(nn.Module):
    """Windows [N, 15, D_enc] -> [N, 3, D_llm]: `QFormerProjector.forward` after its windowing."""

    def __init__(self, projector: QFormerProjector) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, windows: Tensor) -> Tensor:
        out = self.projector.qformer(query_embeds=self.projector.query, encoder_hidden_states=windows, return_dict=True)
        return self.projector.linear(out.last_hidden_state)


class NARFrameCore(nn.Module):
    """Frames [N, L*D_enc] -> [N, H]: `NARProjector.project_frames` (traced on its own)."""

    def __init__(self, projector: NARProjector) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, frames: Tensor) -> Tensor:
        return self.projector.project_frames(frames)


class NARWindowCore(nn.Module):
    """Windows [N, 15, H] -> [N, 3, D_llm]: `NARProjector.summarise_windows` (traced on its own)."""

    def __init__(self, projector: NARProjector) -> None:
        super().__init__()
        self.projector = projector

    def forward(self, windows: Tensor) -> Tensor:
        return self.projector.summarise_windows(windows)


class GraniteCore(nn.Module):
    """One packed row: embeds [1, L, D], additive mask [1, 1, L, L], positions [1, L] -> hidden [1, L, D]."""

    def __init__(self, language_model: NARLanguageModel) -> None:
        super().__init__()
        self.model = language_model.model

    def forward(self, embeds: Tensor, mask: Tensor, position_ids: Tensor) -> Tensor:
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)[0]


def trace(module: nn.Module, *examples: Tensor) -> torch.jit.ScriptModule:
    """torch.jit.trace without its warnings: the checks after export are what guard the trace."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), examples, check_trace=False)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script, quiet about TorchScript's deprecation: Triton's PyTorch backend loads TorchScript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


# ---------------------------------------------------------------------------------------------
# Triton-facing modules (scripted). Forward argument names are the Triton tensor names, so the
# backend binds inputs and batch inputs by name; outputs are returned in config order.


class TritonEncoder(nn.Module):
    """AR encoder. FEATURES [sum T_i * 160] FP32, FEATURES_OFFSETS [B + 1] -> HIDDEN [sum T_i, D] FP32."""

    def __init__(self, core: torch.jit.ScriptModule, dtype: torch.dtype) -> None:
        super().__init__()
        self.core = core
        self.feature_dim = FEATURE_DIM
        self.dtype = dtype

    def forward(self, FEATURES: Tensor, FEATURES_OFFSETS: Tensor) -> Tensor:  # noqa: N803 (Triton tensor names)
        lengths = segment_lengths(FEATURES_OFFSETS, self.feature_dim)
        frames = FEATURES.reshape(-1, self.feature_dim).to(self.dtype)  # [N, 160]
        owner, position = ragged_index(lengths)
        hidden = self.core(pad_packed(frames, owner, position, lengths), lengths)  # [B, T_max, D]
        return hidden[owner, position].float()  # [N, D]


class TritonNAREncoder(nn.Module):
    """NAR encoder. FEATURES, FEATURES_OFFSETS -> PROJECTOR_INPUT [sum T_i, L*D] FP32, DRAFT_IDS [sum T_i] INT32.

    DRAFT_IDS holds each request's greedy BPE CTC draft in its first slots and -1 after: one slot per
    encoder frame, so that Triton can scatter it by the shape of FEATURES.
    """

    def __init__(self, core: torch.jit.ScriptModule, dtype: torch.dtype, blank: int) -> None:
        super().__init__()
        self.core = core
        self.feature_dim = FEATURE_DIM
        self.dtype = dtype
        self.blank = blank

    def forward(self, FEATURES: Tensor, FEATURES_OFFSETS: Tensor) -> tuple[Tensor, Tensor]:  # noqa: N803
        lengths = segment_lengths(FEATURES_OFFSETS, self.feature_dim)
        frames = FEATURES.reshape(-1, self.feature_dim).to(self.dtype)
        owner, position = ragged_index(lengths)
        stacked, bpe_ids, pooled_lengths = self.core(pad_packed(frames, owner, position, lengths), lengths)
        drafts, counts = ctc_keep(bpe_ids, pooled_lengths, self.blank)
        draft_slots = place_padded(drafts.to(torch.int32), counts, lengths, -1)  # [N]
        return stacked[owner, position].float(), draft_slots


class TritonARProjector(nn.Module):
    """AR projector. HIDDEN [sum T_i * D] FP32, AUDIO_ROWS [sum R_i] (shape only) and their offsets
    -> AUDIO_EMBEDS [sum R_i, D_llm] FP32, R_i = 3 * ceil(T_i / 15)."""

    def __init__(self, core: torch.jit.ScriptModule, dtype: torch.dtype, hidden_dim: int, window: int) -> None:
        super().__init__()
        self.core = core
        self.dtype = dtype
        self.hidden_dim = hidden_dim
        self.window = window

    def forward(
        self,
        HIDDEN: Tensor,  # noqa: N803
        AUDIO_ROWS: Tensor,  # noqa: N803
        HIDDEN_OFFSETS: Tensor,  # noqa: N803
        AUDIO_ROWS_OFFSETS: Tensor,  # noqa: N803
    ) -> Tensor:
        lengths = segment_lengths(HIDDEN_OFFSETS, self.hidden_dim)
        windows, counts = pack_windows(HIDDEN.reshape(-1, self.hidden_dim).to(self.dtype), lengths, self.window)
        rows = self.core(windows)  # [sum windows, Q, D_llm]
        check_rows("AUDIO_ROWS", counts * rows.shape[1], AUDIO_ROWS_OFFSETS)
        return rows.reshape(-1, rows.shape[-1]).float()


class TritonNARProjector(nn.Module):
    """NAR projector. PROJECTOR_INPUT [sum T_i * L*D] FP32, AUDIO_ROWS [sum R_i] (shape only) and their
    offsets -> AUDIO_EMBEDS [sum R_i, D_llm] FP32, R_i = T_i // 5, already divided by the LLM's multiplier."""

    def __init__(
        self,
        frame_core: torch.jit.ScriptModule,
        window_core: torch.jit.ScriptModule,
        dtype: torch.dtype,
        cfg: NARProjectorConfig,
    ) -> None:
        super().__init__()
        self.frame_core = frame_core
        self.window_core = window_core
        self.dtype = dtype
        self.input_dim = cfg.encoder_dim * cfg.num_encoder_layers
        self.window = cfg.block_size
        self.rate = cfg.downsample_rate

    def forward(
        self,
        PROJECTOR_INPUT: Tensor,  # noqa: N803
        AUDIO_ROWS: Tensor,  # noqa: N803
        PROJECTOR_INPUT_OFFSETS: Tensor,  # noqa: N803
        AUDIO_ROWS_OFFSETS: Tensor,  # noqa: N803
    ) -> Tensor:
        lengths = segment_lengths(PROJECTOR_INPUT_OFFSETS, self.input_dim)
        frames = self.frame_core(PROJECTOR_INPUT.reshape(-1, self.input_dim).to(self.dtype))  # [N, H]
        windows, counts = pack_windows(frames, lengths, self.window)
        rows = self.window_core(windows)  # [sum windows, Q, D_llm]
        keep = torch.div(lengths, self.rate, rounding_mode="floor")
        check_rows("AUDIO_ROWS", keep, AUDIO_ROWS_OFFSETS)
        rows = take_leading(rows.reshape(-1, rows.shape[-1]), counts * rows.shape[1], keep)
        return rows.float()


class TritonNARHead(nn.Module):
    """NAR head. AUDIO_EMBEDS [sum A_i * D] FP32, DRAFT_IDS [sum n_i] INT32 (negative ids ignored) and their
    offsets -> TOKEN_IDS [B, M] INT32: each request's transcript ids, then -1 up to the batch's longest.

    `NARLanguageModel.forward`: insertion slots around the draft, requests packed into rows of at most
    `pack_budget` tokens (positions restart per request, block-diagonal bidirectional attention),
    argmax on the slots with the tied embedding, greedy CTC collapse.
    """

    def __init__(self, core: torch.jit.ScriptModule, language_model: NARLanguageModel, pack_budget: int) -> None:
        super().__init__()
        self.core = core
        self.embed = language_model.model.embed_tokens
        self.hidden_dim = language_model.model.config.hidden_size
        self.blank = language_model.blank
        self.min_slots = language_model.min_slots
        self.logits_scaling = language_model.logits_scaling
        self.pack_budget = pack_budget
        self.masked = torch.finfo(self.embed.weight.dtype).min

    def forward(
        self,
        AUDIO_EMBEDS: Tensor,  # noqa: N803
        DRAFT_IDS: Tensor,  # noqa: N803
        AUDIO_EMBEDS_OFFSETS: Tensor,  # noqa: N803
        DRAFT_IDS_OFFSETS: Tensor,  # noqa: N803
    ) -> Tensor:
        weight = self.embed.weight
        audio_lengths = segment_lengths(AUDIO_EMBEDS_OFFSETS, self.hidden_dim)
        audio = AUDIO_EMBEDS.reshape(-1, self.hidden_dim).to(weight.dtype)  # [sum A, D]
        drafts, draft_lengths = drop_negative(DRAFT_IDS.to(torch.long), segment_lengths(DRAFT_IDS_OFFSETS, 1))
        slot_lengths = torch.clamp(2 * draft_lengths + 1, min=self.min_slots)  # [B]
        slot_ids = self.insertion_slots(drafts, draft_lengths, slot_lengths)  # [sum S]
        sequences = self.sequences(audio, audio_lengths, self.embed(slot_ids), slot_lengths)  # [sum L, D]
        hidden = self.packed_hidden(sequences, audio_lengths + slot_lengths)  # [sum L, D]
        slot_hidden = take_slots(hidden, audio_lengths, slot_lengths)  # [sum S, D]
        ids = (F.linear(slot_hidden, weight) / self.logits_scaling).argmax(dim=-1)  # [sum S]
        tokens, counts = ctc_keep(ids, slot_lengths, self.blank)
        longest = int(counts.max()) if counts.numel() > 0 else 0
        out = place_padded(tokens.to(torch.int32), counts, torch.full_like(counts, longest), -1)
        return out.reshape(counts.shape[0], longest)

    def insertion_slots(self, drafts: Tensor, draft_lengths: Tensor, slot_lengths: Tensor) -> Tensor:
        """`nar.insertion_slots` for a batch: [_, a, _, b, _, ...] per request, blanks up to its slot count."""
        slots = torch.full([int(slot_lengths.sum())], self.blank, dtype=torch.long, device=drafts.device)
        owner, position = ragged_index(draft_lengths)
        starts = torch.cumsum(slot_lengths, 0) - slot_lengths
        slots[starts[owner] + 2 * position + 1] = drafts
        return slots

    def sequences(self, audio: Tensor, audio_lengths: Tensor, slots: Tensor, slot_lengths: Tensor) -> Tensor:
        """Per request [audio rows ; slot embeddings], requests end to end."""
        lengths = audio_lengths + slot_lengths
        starts = torch.cumsum(lengths, 0) - lengths
        out = audio.new_zeros([int(lengths.sum()), audio.shape[1]])
        owner, position = ragged_index(audio_lengths)
        out[starts[owner] + position] = audio
        owner, position = ragged_index(slot_lengths)
        out[starts[owner] + audio_lengths[owner] + position] = slots
        return out

    def packed_hidden(self, sequences: Tensor, lengths: Tensor) -> Tensor:
        """`NARLanguageModel.packed_hidden` over groups of consecutive requests within the token budget."""
        sizes: list[int] = lengths.tolist()
        outputs: list[Tensor] = []
        start, first = 0, 0
        while first < len(sizes):
            last, total = first + 1, sizes[first]  # a request longer than the budget gets a row of its own
            while last < len(sizes) and total + sizes[last] <= self.pack_budget:
                total += sizes[last]
                last += 1
            group = lengths[first:last]
            owner, position = ragged_index(group)
            same = owner.unsqueeze(0) == owner.unsqueeze(1)  # [L, L] block diagonal
            mask = torch.zeros(same.shape, dtype=sequences.dtype, device=sequences.device)
            mask = mask.masked_fill(~same, self.masked)[None, None]  # [1, 1, L, L]
            outputs.append(self.core(sequences[start : start + total][None], mask, position[None])[0])
            start, first = start + total, last
        return torch.cat(outputs)


def take_slots(hidden: Tensor, audio_lengths: Tensor, slot_lengths: Tensor) -> Tensor:
    """Packed [audio ; slots] rows -> the slot rows only, packed."""
    lengths = audio_lengths + slot_lengths
    starts = torch.cumsum(lengths, 0) - lengths
    owner, position = ragged_index(slot_lengths)
    return hidden[starts[owner] + audio_lengths[owner] + position]


# ---------------------------------------------------------------------------------------------
# Building, checking and writing the modules


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

    def template_values(self) -> dict[str, str]:
        """The `${...}` values of the libtorch templates beyond DeploySettings' own."""
        names = ("input_dim", "output_dim", "warmup_frames", "warmup_rows")
        return {name: str(getattr(self, name)) for name in names}


@dataclass
class Built:
    """An exported module with the eager function it must reproduce on the same inputs."""

    module: torch.jit.ScriptModule
    reference: Callable[[list[list[Tensor]]], list[list[Tensor]]]  # per-request inputs -> per-request outputs
    example: Callable[[list[int], torch.Generator], list[list[Tensor]]]  # frame counts -> per-request inputs
    scatter: tuple[int | None, ...]  # per output: the input whose rows split it per request; None: [B, M]
    metadata: dict


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
        return [[_rows(n, input_dim, gen, device), _shape_only(n // pcfg.downsample_rate, device)] for n in frames]

    metadata = dict(input_dim=input_dim, output_dim=pcfg.llm_dim, warmup_rows=WARMUP_FRAMES // pcfg.downsample_rate)
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

    rate = cfg.projector.downsample_rate

    def example(frames: list[int], gen: torch.Generator) -> list[list[Tensor]]:
        drafts = [torch.randint(cfg.vocab_size, (n // 8,), generator=gen, dtype=torch.int32) for n in frames]
        return [[_rows(n // rate, dim, gen, device), d.to(device)] for n, d in zip(frames, drafts, strict=True)]

    metadata = dict(input_dim=dim, output_dim=0, warmup_rows=WARMUP_FRAMES // rate)
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


def triton_batch(requests: list[list[Tensor]]) -> list[Tensor]:
    """What Triton's PyTorch backend passes for a ragged batch: every input flattened and concatenated,
    then one BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO offsets tensor [B + 1] (int32) per input."""
    flat = [torch.cat([r[i].reshape(-1) for r in requests]) for i in range(len(requests[0]))]
    offsets = []
    for i in range(len(requests[0])):
        counts = torch.tensor([r[i].numel() for r in requests], dtype=torch.int32, device=flat[i].device)
        offsets.append(F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0)))
    return flat + offsets


def split_outputs(
    outputs: Tensor | tuple[Tensor, ...], requests: list[list[Tensor]], scatter: tuple[int | None, ...]
) -> list[list[Tensor]]:
    """A module's packed (or [B, M] padded) outputs -> each request's own, as Triton hands them out."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    per_request: list[list[Tensor]] = [[] for _ in requests]
    for out, source in zip(outputs, scatter, strict=True):
        pieces = list(out) if source is None else list(out.split([r[source].shape[0] for r in requests]))
        for request, piece in zip(per_request, pieces, strict=True):
            request.append(piece)
    return per_request


def compare(out: Tensor, ref: Tensor, label: str, dtype_name: str) -> None:
    """One output of one request, exported vs eager; ids after dropping the -1 padding."""
    if not ref.is_floating_point():
        out, ref = out[out >= 0], ref[ref >= 0]
        if dtype_name == "float32" and not torch.equal(out, ref):  # argmax ties may differ in half precision
            raise ExportError(f"{label}: exported ids {out.tolist()} != eager {ref.tolist()}")
        return
    atol, rtol = TOLERANCES[dtype_name]
    try:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    except AssertionError as exc:
        raise ExportError(f"{label}: exported module differs from the eager one: {exc}") from exc


def verify(built: Built, dtype_name: str, seed: int = 0) -> None:
    """Run the exported module and the eager one on batches whose lengths no trace example used."""
    gen = torch.Generator().manual_seed(seed)
    for frames in VERIFY_FRAMES:
        requests = built.example(list(frames), gen)
        label = f"batch of {list(frames)} frames"
        with torch.no_grad(), torch.jit.optimized_execution(False):  # as served: DISABLE_OPTIMIZED_EXECUTION
            try:
                outputs = built.module(*triton_batch(requests))
            except RuntimeError as exc:  # e.g. a size that tracing kept as a constant
                raise ExportError(f"{label}: the exported module fails: {exc}") from exc
        got = split_outputs(outputs, requests, built.scatter)
        for index, (outs, refs) in enumerate(zip(got, built.reference(requests), strict=True)):
            for out, ref in zip(outs, refs, strict=True):
                compare(out, ref, f"{label}, request {index}", dtype_name)


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
        if check:
            try:
                verify(built, dtype)
            except ExportError as exc:
                raise ExportError(f"{name}: {exc}") from exc
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
            **built.metadata,
        )
        record = {**asdict(metadata), "template_values": metadata.template_values()}  # for render, which needs no torch
        (target / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
        written.append(target / "1" / MODEL_FILE)
    return written


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
