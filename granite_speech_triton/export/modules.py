"""The exported modules: traced cores (the eager modules on fixed-rank tensors) inside scripted
Triton-facing modules whose forward arguments are the Triton tensor names.

Everything model-specific is the eager model's own code: the cores call the eager modules'
methods, and the scripted wrappers call the model's tensor functions (model/ragged.py, model/ctc.py,
model/nar.py); only Triton's flat ragged I/O (ragged_io.py) and the traced LLM's additive mask are
written here.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import encoder as encoder_module
from ..model.audio import FEATURE_DIM
from ..model.ctc import ctc_keep
from ..model.encoder import ConformerEncoder
from ..model.nar import (
    NAREncoder,
    NARLanguageModel,
    NARProjector,
    NARProjectorConfig,
    insertion_slot_ids,
    slot_counts,
)
from ..model.projector import QFormerProjector
from ..model.ragged import join_segments, pack_groups, ragged_index, take_second
from .ragged_io import check_rows, drop_negative, pack_windows, pad_packed, place_padded, segment_lengths, take_leading


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
    """features [B, T, 160], lengths [B] -> projector input [B, T, L*D], BPE argmax ids [sum P_i], P_i [B]:
    `NAREncoder.forward_draft` (the eager `encode` before its CTC collapse, which runs in the script)."""

    def __init__(self, encoder: NAREncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, ...]:
        return self.encoder.forward_draft(features, lengths)


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
        slot_lengths = slot_counts(draft_lengths, self.min_slots)  # [B]
        slot_ids = insertion_slot_ids(drafts, draft_lengths, slot_lengths, self.blank)  # [sum S]
        sequences = join_segments(audio, audio_lengths, self.embed(slot_ids), slot_lengths)  # [sum L, D]
        hidden = self.packed_hidden(sequences, audio_lengths + slot_lengths)  # [sum L, D]
        slot_hidden = take_second(hidden, audio_lengths, slot_lengths)  # [sum S, D]
        ids = (F.linear(slot_hidden, weight) / self.logits_scaling).argmax(dim=-1)  # [sum S]
        tokens, counts = ctc_keep(ids, slot_lengths, self.blank)
        longest = int(counts.max()) if counts.numel() > 0 else 0
        out = place_padded(tokens.to(torch.int32), counts, torch.full_like(counts, longest), -1)
        return out.reshape(counts.shape[0], longest)

    def packed_hidden(self, sequences: Tensor, lengths: Tensor) -> Tensor:
        """`NARLanguageModel.packed_hidden` on the groups of `pack_groups`, with the traced LLM: positions
        restart per request, and an additive block-diagonal mask keeps requests apart."""
        sizes: list[int] = lengths.tolist()
        outputs: list[Tensor] = []
        start = 0
        for group in pack_groups(sizes, self.pack_budget):
            group_lengths = lengths[group[0] : group[-1] + 1]
            total = int(group_lengths.sum())
            owner, position = ragged_index(group_lengths)
            same = owner.unsqueeze(0) == owner.unsqueeze(1)  # [L, L] block diagonal
            mask = torch.zeros(same.shape, dtype=sequences.dtype, device=sequences.device)
            mask = mask.masked_fill(~same, self.masked)[None, None]  # [1, 1, L, L]
            outputs.append(self.core(sequences[start : start + total][None], mask, position[None])[0])
            start += total
        return torch.cat(outputs)
