"""Configuration dataclasses built from a checkpoint's config.json (one per component).

Configuration flows one way: config.json -> these dataclasses -> modules. Nothing else in the
model code reads config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class EncoderConfig:
    """Conformer encoder (MODEL_SPEC.md section 2); defaults are Granite Speech 4.1's."""

    input_dim: int = 160
    num_layers: int = 16
    hidden_dim: int = 1024
    feedforward_mult: int = 4
    num_heads: int = 8
    dim_head: int = 128
    output_dim: int = 348  # char-CTC vocabulary of the self-conditioning head
    context_size: int = 200  # frames per attention block (4 s)
    max_pos_emb: int = 512
    conv_kernel_size: int = 15
    conv_expansion_factor: int = 2
    self_conditioning_layer: int = 0  # 0 means num_layers // 2 (the AR checkpoints' rule)
    bpe_output_dim: int = 0  # NAR only: size of the `out_bpe` head; 0 when absent
    bpe_pooling_window: int = 4  # NAR only: frames pooled per BPE position
    # The NAR reference takes the self-conditioning softmax in float32 whatever the model dtype;
    # transformers' AR encoder takes it in the model dtype. Equal in float32.
    self_conditioning_fp32: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        cfg = cls(**known_fields(cls, {k: v for k, v in values.items() if v is not None}))
        if not cfg.self_conditioning_layer:
            cfg = cls(**{**cfg.__dict__, "self_conditioning_layer": cfg.num_layers // 2})
        if cfg.context_size <= 0 or cfg.context_size > cfg.max_pos_emb:
            raise CheckpointError(
                f"encoder context_size {cfg.context_size} must be in 1..max_pos_emb ({cfg.max_pos_emb})"
            )
        return cfg


@dataclass(frozen=True)
class ARProjectorConfig:
    """BLIP-2 Q-Former projector of the AR model (section 3)."""

    qformer: dict[str, Any]  # the checkpoint's `projector_config`, handed to transformers
    hidden_size: int
    llm_hidden_size: int
    window_size: int = 15
    downsample_rate: int = 5

    @property
    def num_queries(self) -> int:
        return self.window_size // self.downsample_rate

    def rows(self, encoder_frames: int) -> int:
        """Projector rows (audio tokens of the prompt) for `encoder_frames`: queries per started window."""
        return self.num_queries * -(-encoder_frames // self.window_size)


@dataclass(frozen=True)
class ARModelConfig:
    """Everything the AR pipeline needs from a granite_speech config.json."""

    encoder: EncoderConfig
    projector: ARProjectorConfig
    text: dict[str, Any]  # the checkpoint's `text_config`, handed to transformers' Granite
    audio_token_index: int

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ARModelConfig:
        for key in ("encoder_config", "projector_config", "text_config", "audio_token_index"):
            if key not in values:
                raise CheckpointError(f"config.json has no '{key}': not a granite_speech checkpoint")
        if values.get("has_lora_adapter"):
            raise CheckpointError("LoRA adapters (has_lora_adapter=true) are not supported; 4.1 has none")
        text = values["text_config"]
        projector = ARProjectorConfig(
            qformer=values["projector_config"],
            hidden_size=values["projector_config"]["hidden_size"],
            llm_hidden_size=text["hidden_size"],
            window_size=values.get("window_size", 15),
            downsample_rate=values.get("downsample_rate", 5),
        )
        return cls(
            encoder=EncoderConfig.from_dict(values["encoder_config"]),
            projector=projector,
            text=text,
            audio_token_index=values["audio_token_index"],
        )


def read_config_json(checkpoint: Path) -> dict[str, Any]:
    """The parsed config.json of a local checkpoint directory."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json")
    with path.open() as f:
        return json.load(f)
