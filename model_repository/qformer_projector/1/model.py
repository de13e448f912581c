"""Triton adapter: encoder outputs -> audio embeddings for the LLM (contract in config.pbtxt).

variant ar:  HIDDEN -> AUDIO_EMBEDS (BLIP-2 Q-Former, 3 rows per 15 frames).
variant nar: PROJECTOR_INPUT -> AUDIO_EMBEDS (windowed Q-Former, frames // 5 rows, divided by 12).
Parameters: variant, checkpoint, revision, device, dtype, cpu_threads.
"""

import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.nar import load_nar_config, load_nar_projector
from granite_speech_triton.model.projector import load_projector
from granite_speech_triton.serving.triton_io import BatchAdapter, sequence_input

WARMUP_FRAMES = 250


def ar_projector(checkpoint, device, dtype) -> tuple[torch.nn.Module, str, int]:
    cfg = ARModelConfig.from_dict(read_config_json(checkpoint))
    return load_projector(checkpoint, cfg.projector, device, dtype), "HIDDEN", cfg.encoder.hidden_dim


def nar_projector(checkpoint, device, dtype) -> tuple[torch.nn.Module, str, int]:
    cfg = load_nar_config(checkpoint)
    width = cfg.encoder.hidden_dim * len(cfg.encoder_layer_indices)
    return load_nar_projector(checkpoint, cfg, device, dtype), "PROJECTOR_INPUT", width


PROJECTORS = {"ar": ar_projector, "nar": nar_projector}


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        stage = self.setup(args)
        load = PROJECTORS[stage.params["variant"]]
        self.projector, self.input_name, width = load(stage.checkpoint(), stage.device, stage.dtype)
        self.run([torch.randn(WARMUP_FRAMES, width)])

    def decode(self, request) -> torch.Tensor:
        return sequence_input(request, self.input_name)

    @torch.inference_mode()
    def predict(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.projector(inputs)

    def encode(self, embeds: torch.Tensor):
        return pb_utils.InferenceResponse(output_tensors=[self.float_output("AUDIO_EMBEDS", embeds)])
