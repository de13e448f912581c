"""NAR model: granite-speech-4.1-2b-nar (MODEL_SPEC.md section 4), one forward pass, no decoding loop.

    features [B, T, 160] --NAREncoder.encode--> projector input [T_i, 4*1024] + BPE draft ids
    projector input      --NARProjector-------> audio rows [T_i // 5, 2048] (already divided by 12)
    audio rows + drafts  --NARLanguageModel---> transcript ids (bidirectional Granite edits the draft)

Each stage works on a list of utterances and never lets one utterance's rows reach another's, so a
request's output does not depend on its batch-mates. Module and parameter names follow the hub
checkpoint (`encoder.*`, `projector.*`, `language_model.model.*`), so `NARModel.state_dict()` has the
hub's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GraniteConfig, GraniteModel
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function

from .config import EncoderConfig, known_fields, read_config_json
from .ctc import ctc_collapse_segments
from .draft import CHAR_CTC_BLANK, pooled_rows
from .encoder import ConformerEncoder
from .errors import CheckpointError
from .projector import split_windows
from .ragged import join_segments, pack_groups, ragged_index, take_second
from .weights import load_module

PACK_TOKEN_BUDGET = 4096  # tokens per packed LLM sequence: dense masks attend over budget^2 pairs


@dataclass(frozen=True)
class NARProjectorConfig:
    """Windowed Q-Former projector (the hub's `projector_config`); defaults are the 2b-nar's."""

    encoder_dim: int = 1024
    num_encoder_layers: int = 4  # encoder hidden states concatenated at the input
    hidden_size: int = 2048
    llm_dim: int = 2048
    num_heads: int = 32
    num_layers: int = 2
    mlp_ratio: float = 2
    block_size: int = 15  # encoder frames per window
    downsample_rate: int = 5  # encoder frames per output row
    layernorm_eps: float = 1e-6
    attn_bias: bool = True
    mlp_bias: bool = True

    @property
    def num_queries(self) -> int:
        return self.block_size // self.downsample_rate

    def rows(self, encoder_frames: int) -> int:
        """Audio rows the NAR head gets for `encoder_frames`: one per `downsample_rate` frames."""
        return encoder_frames // self.downsample_rate

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NARProjectorConfig:
        cfg = cls(**known_fields(cls, values))
        if cfg.block_size % cfg.downsample_rate or cfg.hidden_size % cfg.num_heads:
            raise CheckpointError(
                f"projector_config: block_size {cfg.block_size} must be a multiple of downsample_rate "
                f"{cfg.downsample_rate} and hidden_size {cfg.hidden_size} of num_heads {cfg.num_heads}"
            )
        return cfg


@dataclass(frozen=True)
class NARModelConfig:
    """Everything the NAR pipeline needs from a granite-speech-nar config.json."""

    encoder: EncoderConfig
    projector: NARProjectorConfig
    text: dict[str, Any]  # granite `text_config`, handed to transformers' GraniteConfig
    encoder_layer_indices: tuple[int, ...] = (4, 8, 12, -1)  # into (after input_linear, layer 1, ...)
    scale_projected_embeddings: bool = True  # divide audio rows by the LLM's embedding_multiplier
    blank_token_id: int = 100257  # blank of both the BPE draft and the LLM head (an LLM token id)
    min_edit_sequence_length: int = 8  # fewest insertion slots given to the LLM
    legacy_bpe_head: bool = False  # checkpoint's out_bpe has vocab+1 rows, label 0 = blank (rev 7d20732d)

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def audio_divisor(self) -> float:
        """What the projector output is divided by so that the LLM's input multiplier cancels."""
        return float(self.text.get("embedding_multiplier", 1.0)) if self.scale_projected_embeddings else 1.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NARModelConfig:
        # Revision 7d20732d names the LLM's config `llm_config`; a1e3416e calls it `text_config`.
        text = values.get("text_config") or values.get("llm_config")
        if "encoder_config" not in values or not text:
            raise CheckpointError(
                "config.json needs 'encoder_config' and 'text_config': not a granite-speech-nar model"
            )
        encoder = EncoderConfig.from_dict(values["encoder_config"])
        vocab = int(text["vocab_size"])
        if encoder.bpe_output_dim not in (vocab, vocab + 1):
            raise CheckpointError(
                f"encoder_config.bpe_output_dim is {encoder.bpe_output_dim}; the NAR model needs its BPE draft "
                f"head over the LLM vocabulary ({vocab}, or {vocab + 1} in the older layout)"
            )
        cfg = cls(
            # bpe_output_dim: the older 1 + vocab head is converted on load
            encoder=replace(encoder, bpe_output_dim=vocab, self_conditioning_fp32=True),
            projector=NARProjectorConfig.from_dict(values.get("projector_config") or {}),
            text=dict(text),
            encoder_layer_indices=tuple(values.get("encoder_layer_indices", cls.encoder_layer_indices)),
            scale_projected_embeddings=bool(values.get("scale_projected_embeddings", True)),
            blank_token_id=int(values.get("blank_token_id", cls.blank_token_id)),
            min_edit_sequence_length=int(values.get("min_edit_sequence_length", cls.min_edit_sequence_length)),
            legacy_bpe_head=encoder.bpe_output_dim == vocab + 1,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cross-component agreement that single dataclasses cannot check."""
        layers = self.encoder.num_layers
        if any(not -(layers + 1) <= i <= layers for i in self.encoder_layer_indices):
            raise CheckpointError(f"encoder_layer_indices {list(self.encoder_layer_indices)} outside 0..{layers}")
        proj = self.projector
        got = (proj.num_encoder_layers, proj.encoder_dim, proj.llm_dim)
        expected = (len(self.encoder_layer_indices), self.encoder.hidden_dim, int(self.text["hidden_size"]))
        if got != expected:
            raise CheckpointError(
                f"projector_config (num_encoder_layers, encoder_dim, llm_dim) = {got}; encoder_layer_indices, "
                f"the encoder's hidden_dim and the LLM's hidden_size imply {expected}"
            )
        if not 0 <= self.blank_token_id < self.vocab_size:
            raise CheckpointError(f"blank_token_id {self.blank_token_id} outside the vocabulary ({self.vocab_size})")


# ---------------------------------------------------------------------------------------------
# Stage 1: encoder + BPE draft


@dataclass
class NAREncoderOutput:
    """Per utterance: the projector's input, the greedy BPE CTC draft (LLM token ids) and the pooled
    rows it was read from (what the aligner reads again)."""

    projector_inputs: list[torch.Tensor]  # [T_i, num_encoder_layers * hidden_dim]
    drafts: list[list[int]]
    pooled: list[torch.Tensor]  # [ceil(T_i / bpe_pooling_window), hidden_dim]


class NAREncoder(ConformerEncoder):
    """The Conformer encoder with the NAR model's BPE draft head (`out_bpe`) read on top."""

    def __init__(self, cfg: NARModelConfig) -> None:
        super().__init__(cfg.encoder)
        self.layer_indices = cfg.encoder_layer_indices
        self.blank = cfg.blank_token_id

    @torch.inference_mode()
    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> NAREncoderOutput:
        """features [B, T, 160] right-padded, lengths [B] (encoder frames) -> NAREncoderOutput."""
        stacked, rows, pooled_lengths = self.forward_pooled(features.to(self.input_linear.weight.dtype), lengths)
        counts = pooled_lengths.tolist()
        drafts = ctc_collapse_segments(self.out_bpe(rows).argmax(dim=-1), counts, self.blank)
        projector_inputs = [stacked[b, :n] for b, n in enumerate(lengths.tolist())]
        return NAREncoderOutput(projector_inputs, drafts, list(rows.split(counts)))

    def forward_pooled(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """features [B, T, 160] in the model dtype, lengths [B] -> projector input [B, T, L*D], the
        draft's pooled rows of every utterance back to back [sum P_i, D], P_i [B]. Tensors only."""
        out = self(features, lengths, keep_hidden_states=True)
        # The reference takes the blank probability in float32 whatever the model dtype.
        blank_prob = torch.softmax(out.self_conditioning_logits.float(), dim=-1)[..., CHAR_CTC_BLANK]  # [B, T]
        stacked = torch.cat([out.hidden_states[i] for i in self.layer_indices], dim=-1)  # [B, T, 4*D]
        rows, pooled_lengths = pooled_rows(
            out.last_hidden_state, 1.0 - blank_prob, lengths, self.cfg.bpe_pooling_window
        )
        return stacked, rows, pooled_lengths

    def forward_draft(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`encode` before the CTC collapse, tensors only (the export traces it): projector input
        [B, T, L*D], BPE argmax of every valid pooled frame [sum P_i], pooled lengths P_i [B]."""
        stacked, rows, pooled_lengths = self.forward_pooled(features, lengths)
        return stacked, self.out_bpe(rows).argmax(dim=-1), pooled_lengths


# ---------------------------------------------------------------------------------------------
# Stage 2: windowed Q-Former projector


class CrossAttention(nn.Module):
    def __init__(self, cfg: NARProjectorConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.attn_bias)

    def forward(self, queries: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """queries [N, Q, H], window [N, W, H] -> [N, Q, H]."""
        n, num_q, dim = queries.shape
        q = self.q_proj(queries).view(n, num_q, self.num_heads, -1).transpose(1, 2)  # [N, nh, Q, hs]
        k = self.k_proj(window).view(n, window.shape[1], self.num_heads, -1).transpose(1, 2)  # [N, nh, W, hs]
        v = self.v_proj(window).view(n, window.shape[1], self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, nh, Q, hs]
        return self.o_proj(out.transpose(1, 2).reshape(n, num_q, dim))


class MLP(nn.Module):
    def __init__(self, cfg: NARProjectorConfig) -> None:
        super().__init__()
        inner = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.hidden_size, inner, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(inner, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class QFormerLayer(nn.Module):
    """Pre-LN cross-attention from the queries to the window, then a pre-LN MLP; both residual."""

    def __init__(self, cfg: NARProjectorConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.cross_attention = CrossAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)

    def forward(self, queries: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        queries = queries + self.cross_attention(self.attn_norm(queries), window)
        return queries + self.mlp(self.mlp_norm(queries))


class QFormer(nn.Module):
    def __init__(self, cfg: NARProjectorConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, queries: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, window)
        return queries


class NARProjector(nn.Module):
    """Concatenated encoder layers of several utterances -> audio rows for the NAR LLM.

    Windows of `block_size` frames are independent, so a batch is every utterance's windows
    concatenated; each utterance's last window is zero-padded as when it runs alone.
    """

    def __init__(self, cfg: NARProjectorConfig, output_divisor: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.output_divisor = output_divisor
        self.layer_norms = nn.ModuleList(
            nn.LayerNorm(cfg.encoder_dim, eps=cfg.layernorm_eps) for _ in range(cfg.num_encoder_layers)
        )
        self.layer_projector = nn.Linear(cfg.encoder_dim * cfg.num_encoder_layers, cfg.hidden_size)
        self.query = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.hidden_size))
        self.window_positions = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.hidden_size))
        self.qformer = QFormer(cfg)
        self.out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.out_linear = nn.Linear(cfg.hidden_size, cfg.llm_dim)

    def project_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, L*D_enc] -> [N, H]: per-layer norms, projection, GELU (each frame on its own)."""
        layers = frames.split(self.cfg.encoder_dim, dim=-1)
        x = torch.cat([norm(h) for norm, h in zip(self.layer_norms, layers, strict=True)], dim=-1)
        return F.gelu(self.layer_projector(x))

    def summarise_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """[N, block, H] -> [N, Q, D_llm]: learned queries plus group means attend to each window."""
        cfg = self.cfg
        groups = windows.view(windows.shape[0], cfg.num_queries, cfg.downsample_rate, -1)  # [N, Q, rate, H]
        queries = self.qformer(self.query + groups.mean(dim=2), windows + self.window_positions)  # [N, Q, H]
        return self.out_linear(self.out_norm(queries)) / self.output_divisor

    @torch.inference_mode()
    def forward(self, utterances: list[torch.Tensor]) -> list[torch.Tensor]:
        """[T_i, num_encoder_layers * encoder_dim] per utterance -> [T_i // downsample_rate, llm_dim]."""
        cfg = self.cfg
        x = self.project_frames(torch.cat(utterances))  # [sum T, H]
        per_utterance = [split_windows(h, cfg.block_size) for h in x.split([u.shape[0] for u in utterances])]
        rows = self.summarise_windows(torch.cat(per_utterance))  # [N, Q, D_llm], N = sum ceil(T_i / block)
        rows = rows.split([w.shape[0] for w in per_utterance])
        keep = [cfg.rows(u.shape[0]) for u in utterances]
        return [r.reshape(-1, cfg.llm_dim)[:n] for r, n in zip(rows, keep, strict=True)]


# ---------------------------------------------------------------------------------------------
# Stage 3: bidirectional Granite over [audio rows ; insertion slots], packed


def slot_counts(draft_lengths: torch.Tensor, min_slots: int) -> torch.Tensor:
    """Insertion slots per draft of n tokens: max(2n + 1, min_slots)."""
    return torch.clamp(2 * draft_lengths + 1, min=min_slots)


def insertion_slot_ids(
    drafts: torch.Tensor, draft_lengths: torch.Tensor, slot_lengths: torch.Tensor, blank: int
) -> torch.Tensor:
    """Packed drafts [sum n] -> packed slots [sum S]: [_, a, _, b, _, ...] per draft, blanks up to its slot count."""
    slots = torch.full([int(slot_lengths.sum())], blank, dtype=torch.long, device=drafts.device)
    owner, position = ragged_index(draft_lengths)
    starts = torch.cumsum(slot_lengths, 0) - slot_lengths
    slots[starts[owner] + 2 * position + 1] = drafts
    return slots


def insertion_slots(draft: list[int], blank: int, min_slots: int) -> list[int]:
    """[a, b] -> [_, a, _, b, _] padded with blanks to at least `min_slots`: one draft, as a list."""
    lengths = torch.tensor([len(draft)])
    ids = torch.tensor(draft, dtype=torch.long)
    return insertion_slot_ids(ids, lengths, slot_counts(lengths, min_slots), blank).tolist()


@dataclass(frozen=True)
class PackedLayout:
    """Several sequences laid end to end in one row: what any attention kernel needs to keep them apart."""

    position_ids: torch.Tensor  # [1, sum L]: 0..L_i-1 per sequence
    sequence_ids: torch.Tensor  # [1, sum L]: index of the sequence each token belongs to
    cu_seqlens: torch.Tensor  # [S + 1] int32: sequence boundaries, for variable-length kernels
    max_length: int

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> PackedLayout:
        sizes = torch.tensor(lengths, dtype=torch.long, device=device)
        sequence_ids, position_ids = ragged_index(sizes)  # [sum L] each
        cu_seqlens = F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)
        return cls(position_ids[None], sequence_ids[None], cu_seqlens, max(lengths))

    def varlen_kwargs(self) -> dict[str, Any]:
        """transformers' keyword arguments for flash-attention varlen; other backends ignore them."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }


class NARLanguageModel(nn.Module):
    """transformers' Granite without causal masking or KV cache; the lm_head is the tied embedding.

    `model` is a plain GraniteModel so that the checkpoint's `language_model.model.*` tensors load
    directly; the checkpoint has no lm_head (tied), and logits are computed on slot rows only.
    """

    def __init__(self, cfg: NARModelConfig, attn_implementation: str | None = None) -> None:
        super().__init__()
        config = GraniteConfig.from_dict(cfg.text)
        config.is_causal = False  # transformers' mask helpers then build bidirectional masks
        if attn_implementation:
            config._attn_implementation = attn_implementation
        self.model = GraniteModel(config)
        for layer in self.model.layers:
            layer.self_attn.is_causal = False  # kernels that take no mask read this flag
        self.blank = cfg.blank_token_id
        self.min_slots = cfg.min_edit_sequence_length
        self.logits_scaling = float(config.logits_scaling)

    def packed_hidden(self, sequences: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Input embeddings of sequences end to end [sum L, D] -> final hidden states [sum L, D], one pass.

        The sequences share one row [1, sum L, D] with positions restarting at 0 and a block-diagonal
        bidirectional mask (built by transformers for the configured attention backend), so no
        padding is computed; flash-attention backends use `cu_seqlens` instead of the mask.
        """
        embeds = sequences.unsqueeze(0)  # [1, sum L, D]
        layout = PackedLayout.from_lengths(lengths, embeds.device)
        mask = create_bidirectional_mask(
            config=self.model.config,
            inputs_embeds=embeds,
            attention_mask=None,
            and_mask_function=packed_sequence_mask_function(layout.sequence_ids),
        )  # [1, 1, sum L, sum L] block diagonal (None for flash attention)
        hidden = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=layout.position_ids,
            use_cache=False,
            **layout.varlen_kwargs(),
        ).last_hidden_state  # [1, sum L, D]
        return hidden[0]

    @torch.inference_mode()
    def slot_logits(
        self, audio: list[torch.Tensor], drafts: list[list[int]], pack_budget: int = PACK_TOKEN_BUDGET
    ) -> list[torch.Tensor]:
        """audio rows [A_i, D] and draft ids per utterance -> logits [S_i, vocab] on its insertion slots.

        Requests are packed into rows of at most `pack_budget` tokens; the exported head runs the same
        functions (slot_counts, insertion_slot_ids, join_segments, pack_groups, take_second).
        """
        embed = self.model.embed_tokens
        device = embed.weight.device
        audio_lengths = torch.tensor([a.shape[0] for a in audio], device=device)
        draft_lengths = torch.tensor([len(d) for d in drafts], device=device)
        draft_ids = torch.tensor([t for d in drafts for t in d], dtype=torch.long, device=device)  # [sum n]
        slot_lengths = slot_counts(draft_lengths, self.min_slots)  # [B]
        slots = embed(insertion_slot_ids(draft_ids, draft_lengths, slot_lengths, self.blank))  # [sum S, D]
        audio_rows = torch.cat(audio).to(embed.weight.dtype)  # [sum A, D]
        sequences = join_segments(audio_rows, audio_lengths, slots, slot_lengths)  # [sum L, D]
        lengths = (audio_lengths + slot_lengths).tolist()
        groups = pack_groups(lengths, pack_budget)  # consecutive requests per packed row
        rows = sequences.split([sum(lengths[i] for i in group) for group in groups])
        hidden = torch.cat(
            [self.packed_hidden(row, [lengths[i] for i in group]) for row, group in zip(rows, groups, strict=True)]
        )  # [sum L, D]
        slot_hidden = take_second(hidden, audio_lengths, slot_lengths)  # [sum S, D]
        logits = F.linear(slot_hidden, embed.weight) / self.logits_scaling  # [sum S, vocab]
        return list(logits.split(slot_lengths.tolist()))

    @torch.inference_mode()
    def forward(
        self, audio: list[torch.Tensor], drafts: list[list[int]], pack_budget: int = PACK_TOKEN_BUDGET
    ) -> list[list[int]]:
        """audio rows [A_i, D] and draft ids per utterance -> transcript token ids per utterance."""
        logits = self.slot_logits(audio, drafts, pack_budget)
        ids = torch.cat(logits).argmax(dim=-1)  # [sum S]
        return ctc_collapse_segments(ids, [x.shape[0] for x in logits], self.blank)


# ---------------------------------------------------------------------------------------------
# Whole model and loading


class NARModel(nn.Module):
    """The three stages in one module, for tests and in-process use; keys equal the hub's."""

    def __init__(self, encoder: NAREncoder, projector: NARProjector, language_model: NARLanguageModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.language_model = language_model

    @classmethod
    def from_config(cls, cfg: NARModelConfig, attn_implementation: str | None = None) -> NARModel:
        """Randomly initialised (transformers' init for the LLM, PyTorch defaults elsewhere)."""
        return cls(
            NAREncoder(cfg),
            NARProjector(cfg.projector, cfg.audio_divisor),
            NARLanguageModel(cfg, attn_implementation),
        )

    @torch.inference_mode()
    def transcribe_ids(self, features: list[torch.Tensor]) -> list[list[int]]:
        """Stacked log-mel features [T_i, 160] per utterance -> transcript token ids per utterance."""
        lengths = torch.tensor([f.shape[0] for f in features], device=features[0].device)
        batch = nn.utils.rnn.pad_sequence(features, batch_first=True)  # [B, T_max, 160]
        encoded = self.encoder.encode(batch, lengths)
        audio = self.projector(encoded.projector_inputs)
        return self.language_model(audio, encoded.drafts)


def convert_legacy_bpe_head(tensors: dict[str, torch.Tensor], cfg: NARModelConfig) -> dict[str, torch.Tensor]:
    """Older `out_bpe` (label 0 = blank, label i = token i - 1) -> rows indexed by LLM token id.

    Row i + 1 moves to i and the blank row takes `blank_token_id`'s place. The older head's own row
    for that token (end of text, which a transcript never contains) is dropped.
    """
    converted = dict(tensors)
    for name in ("out_bpe.weight", "out_bpe.bias"):
        old = tensors.get(name)
        if old is None or old.shape[0] != cfg.vocab_size + 1:
            continue  # load_into reports the missing or mis-shaped tensor under its own name
        new = old[1:].clone()
        new[cfg.blank_token_id] = old[0]
        converted[name] = new
    return converted


def load_nar_config(checkpoint: Path) -> NARModelConfig:
    return NARModelConfig.from_dict(read_config_json(checkpoint))


def load_nar_encoder(
    checkpoint: Path, cfg: NARModelConfig, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> NAREncoder:
    """The encoder stage with the checkpoint's `encoder.*` tensors (older BPE head converted)."""
    convert = (lambda tensors: convert_legacy_bpe_head(tensors, cfg)) if cfg.legacy_bpe_head else None
    return load_module(lambda: NAREncoder(cfg), checkpoint, "encoder.", device, dtype, convert)


def load_nar_bpe_head(
    checkpoint: Path, cfg: NARModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Linear:
    """The encoder's BPE CTC head `out_bpe` alone (older layout converted), rows indexed by token id."""

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not cfg.legacy_bpe_head:
            return tensors
        converted = convert_legacy_bpe_head({f"out_bpe.{k}": v for k, v in tensors.items()}, cfg)
        return {k.removeprefix("out_bpe."): v for k, v in converted.items()}

    build = lambda: nn.Linear(cfg.encoder.hidden_dim, cfg.vocab_size)  # noqa: E731
    return load_module(build, checkpoint, "encoder.out_bpe.", device, dtype, convert)


def load_nar_projector(
    checkpoint: Path, cfg: NARModelConfig, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> NARProjector:
    """The projector stage with the checkpoint's `projector.*` tensors."""
    return load_module(lambda: NARProjector(cfg.projector, cfg.audio_divisor), checkpoint, "projector.", device, dtype)


def load_nar_language_model(
    checkpoint: Path,
    cfg: NARModelConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> NARLanguageModel:
    """The LLM head stage with the checkpoint's `language_model.model.*` tensors (its only ones: tied head)."""
    return load_module(lambda: NARLanguageModel(cfg, attn_implementation), checkpoint, "language_model.", device, dtype)


def load_nar_model(
    checkpoint: Path,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> NARModel:
    """All three stages of a local checkpoint directory, in eval mode."""
    cfg = load_nar_config(checkpoint)
    return NARModel(
        load_nar_encoder(checkpoint, cfg, device, dtype),
        load_nar_projector(checkpoint, cfg, device, dtype),
        load_nar_language_model(checkpoint, cfg, device, dtype, attn_implementation),
    )
