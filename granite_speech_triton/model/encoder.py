"""Conformer encoder of Granite Speech 4.1 (MODEL_SPEC.md section 2), with length masking.

Module and parameter names follow the checkpoint (`encoder.layers.N.attn.to_q`, ...), so the
`encoder.*` tensors load directly. Unlike the reference implementation, every forward takes the
true length of each utterance and masks padded frames in attention and convolution: a request's
output does not depend on the requests batched with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .weights import load_module


def frame_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(cfg.hidden_dim)
        self.up_proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim * cfg.feedforward_mult)
        self.down_proj = nn.Linear(cfg.hidden_dim * cfg.feedforward_mult, cfg.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.up_proj(self.pre_norm(x))))


class BlockAttention(nn.Module):
    """Self-attention inside blocks of `context_size` frames with Shaw relative positions."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        inner = cfg.dim_head * cfg.num_heads
        self.num_heads = cfg.num_heads
        self.context_size = cfg.context_size
        self.scale = cfg.dim_head**-0.5
        self.pre_norm = nn.LayerNorm(cfg.hidden_dim)
        self.to_q = nn.Linear(cfg.hidden_dim, inner, bias=False)
        self.to_kv = nn.Linear(cfg.hidden_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, cfg.hidden_dim)
        self.rel_pos_emb = nn.Embedding(2 * cfg.max_pos_emb + 1, cfg.dim_head)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, dists: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], key_mask [B, T] (True = real frame), dists [C, C] -> [B, T, D]."""
        x = self.pre_norm(x)
        bsz, num_frames, _ = x.shape
        ctx = self.context_size
        num_blocks = math.ceil(num_frames / ctx)
        pad = num_blocks * ctx - num_frames
        x = F.pad(x, (0, 0, 0, pad))  # [B, nb*C, D]
        key_mask = F.pad(key_mask, (0, pad), value=False)

        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        # [B*nb, H, C, dh]
        q, k, v = (t.reshape(bsz * num_blocks, ctx, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))

        rel = self.rel_pos_emb(dists)  # [C, C, dh]
        bias = torch.einsum("b h c d, c r d -> b h c r", q, rel) * self.scale  # [B*nb, H, C, C]
        blocked_keys = ~key_mask.reshape(bsz * num_blocks, 1, 1, ctx)
        bias = bias.masked_fill(blocked_keys, -torch.finfo(bias.dtype).max)

        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(bsz, num_blocks * ctx, -1)  # [B, nb*C, H*dh]
        return self.to_out(out[:, :num_frames])


class DepthwiseConv1d(nn.Module):
    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        half = kernel_size // 2
        self.padding = (half, half - (kernel_size + 1) % 2)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ConvModule(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        inner = cfg.hidden_dim * cfg.conv_expansion_factor
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.up_conv = nn.Conv1d(cfg.hidden_dim, 2 * inner, 1)
        self.depth_conv = DepthwiseConv1d(inner, cfg.conv_kernel_size)
        self.batch_norm = nn.BatchNorm1d(inner)
        self.down_conv = nn.Conv1d(inner, cfg.hidden_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], mask [B, T] -> [B, T, D]."""
        x = F.glu(self.up_conv(self.norm(x).transpose(1, 2)), dim=1)  # [B, inner, T]
        x = x.masked_fill(~mask.unsqueeze(1), 0.0)  # padded frames read as the zero padding
        x = F.silu(self.batch_norm(self.depth_conv(x)))
        return self.down_conv(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.ff1 = FeedForward(cfg)
        self.attn = BlockAttention(cfg)
        self.conv = ConvModule(cfg)
        self.ff2 = FeedForward(cfg)
        self.post_norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, dists: torch.Tensor) -> torch.Tensor:
        x = 0.5 * self.ff1(x) + x
        x = self.attn(x, mask, dists) + x
        x = self.conv(x, mask) + x
        x = 0.5 * self.ff2(x) + x
        return self.post_norm(x)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # [B, T, D]
    hidden_states: tuple[torch.Tensor, ...] | None  # (after input_linear, after layer 1, ...)
    self_conditioning_logits: torch.Tensor | None  # [B, T, output_dim] char-CTC logits at the mid layer


class ConformerEncoder(nn.Module):
    """Stacked 160-dim log-mel frames [B, T, 160] -> hidden states [B, T, hidden_dim]."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_linear = nn.Linear(cfg.input_dim, cfg.hidden_dim)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
        self.out = nn.Linear(cfg.hidden_dim, cfg.output_dim)
        self.out_mid = nn.Linear(cfg.output_dim, cfg.hidden_dim)
        if cfg.bpe_output_dim:
            self.out_bpe = nn.Linear(cfg.hidden_dim, cfg.bpe_output_dim)
        seq = torch.arange(cfg.context_size)
        dists = (seq.view(-1, 1) - seq.view(1, -1)).clamp(-cfg.context_size, cfg.context_size)
        self.register_buffer("attention_dists", dists + cfg.max_pos_emb, persistent=False)  # [C, C]

    def _mid_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cfg.self_conditioning_fp32:
            return torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        return torch.softmax(logits, dim=-1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, keep_hidden_states: bool = False) -> EncoderOutput:
        """features [B, T, 160], lengths [B] -> EncoderOutput; rows past a length are undefined."""
        mask = frame_mask(lengths, features.shape[1])  # [B, T]
        x = self.input_linear(features)  # [B, T, D]
        hidden = [x] if keep_hidden_states else None
        mid_logits = None
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x, mask, self.attention_dists)
            if index == self.cfg.self_conditioning_layer:
                mid_logits = self.out(x)  # [B, T, output_dim]
                x = x + self.out_mid(self._mid_softmax(mid_logits))
            if hidden is not None:
                hidden.append(x)
        return EncoderOutput(x, tuple(hidden) if hidden is not None else None, mid_logits)


def load_encoder(
    checkpoint: Path, cfg: EncoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ConformerEncoder:
    """A ConformerEncoder with the checkpoint's `encoder.*` tensors, in eval mode."""
    return load_module(lambda: ConformerEncoder(cfg), checkpoint, "encoder.", device, dtype)


def pad_batch(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, F] per utterance -> zero-padded [B, T_max, F] and lengths [B]."""
    lengths = torch.tensor([s.shape[0] for s in sequences], device=sequences[0].device)
    return nn.utils.rnn.pad_sequence(sequences, batch_first=True), lengths


# Padded frames computed per real frame, at most, when grouping a batch, by device type. On a GPU a
# bigger batch costs less per frame, which pays for some padding. On a CPU a frame costs the same
# alone or batched (the products already have hundreds of rows), so padding is pure loss: the
# benchmark's 15 clips of 1-19 s took 43 s through the encoder grouped with up to 0.25 of padding
# and 36 s grouped by equal length only (real size, 2-core CPU of docs/benchmarks.md).
MAX_PADDING_WASTE = {"cpu": 0.0, "cuda": 0.25}


def padding_waste(device: str | torch.device) -> float:
    """The padding a batch of encoder inputs may carry on `device` (MAX_PADDING_WASTE)."""
    return MAX_PADDING_WASTE.get(torch.device(device).type, MAX_PADDING_WASTE["cuda"])


def length_groups(lengths: list[int], max_waste: float) -> list[list[int]]:
    """Indices grouped by similar length (longest first) so that padding each group to its longest
    member costs at most `max_waste` extra frames per real frame. Requests of very different
    lengths then run in separate forwards instead of all being padded to the longest."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        if group and lengths[group[0]] * (len(group) + 1) <= (1 + max_waste) * (
            sum(lengths[i] for i in group) + lengths[index]
        ):
            group.append(index)
        else:
            groups.append([index])
    return groups


R = TypeVar("R")


def run_in_length_groups(
    sequences: list[torch.Tensor], run: Callable[[list[torch.Tensor]], list[R]], max_waste: float
) -> list[R]:
    """`run` on groups of similar-length sequences ([T_i, ...] each); results in input order."""
    results: list[R | None] = [None] * len(sequences)
    for group in length_groups([s.shape[0] for s in sequences], max_waste):
        for index, result in zip(group, run([sequences[i] for i in group]), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]


@torch.inference_mode()
def encode_batch(encoder: ConformerEncoder, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """[T_i, 160] per utterance -> final hidden states [T_i, D] per utterance, batch-invariant."""
    param = next(encoder.parameters())

    def run(group: list[torch.Tensor]) -> list[torch.Tensor]:
        padded, lengths = pad_batch([f.to(param.device, param.dtype) for f in group])
        hidden = encoder(padded, lengths).last_hidden_state  # [B, T_max, D]
        return [hidden[i, :length] for i, length in enumerate(lengths.tolist())]

    return run_in_length_groups(features, run, padding_waste(param.device))
