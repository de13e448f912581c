"""Triton adapter: encoder hidden states -> audio embeddings for the LLM (contract in config.pbtxt).

Parameters: variant (ar | nar), checkpoint, revision, device, dtype, cpu_threads.
"""

import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.projector import load_projector
from granite_speech_triton.model.weights import parse_dtype, resolve_checkpoint
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    configure_threads,
    model_parameters,
    sequence_input,
    tensor_output,
    torch_device,
)

WARMUP_FRAMES = 250


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        configure_threads(params)
        checkpoint = resolve_checkpoint(params["checkpoint"], params["revision"] or None)
        config = ARModelConfig.from_dict(read_config_json(checkpoint))
        device, dtype = torch_device(args, params["device"]), parse_dtype(params["dtype"])
        self.projector = load_projector(checkpoint, config.projector, device, dtype)
        self.predict([torch.randn(WARMUP_FRAMES, config.encoder.hidden_dim)])

    def decode(self, request) -> torch.Tensor:
        return sequence_input(request, "HIDDEN")

    @torch.inference_mode()
    def predict(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        param = next(self.projector.parameters())
        return self.projector([h.to(param.device, param.dtype) for h in hidden])

    def encode(self, embeds: torch.Tensor):
        return pb_utils.InferenceResponse(output_tensors=[tensor_output("AUDIO_EMBEDS", embeds)])
