"""Triton adapter: stacked log-mel features -> Conformer encoder outputs (contract in config.pbtxt).

Parameters: variant (ar | nar), checkpoint, revision, device, dtype, cpu_threads.
"""

import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.audio import FEATURE_DIM
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.encoder import encode_batch, load_encoder
from granite_speech_triton.model.weights import parse_dtype, resolve_checkpoint
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    configure_threads,
    model_parameters,
    sequence_input,
    tensor_output,
    torch_device,
)

WARMUP_FRAMES = 250  # 5 s of audio: crosses an attention block boundary


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        configure_threads(params)
        checkpoint = resolve_checkpoint(params["checkpoint"], params["revision"] or None)
        config = ARModelConfig.from_dict(read_config_json(checkpoint))
        device, dtype = torch_device(args, params["device"]), parse_dtype(params["dtype"])
        self.encoder = load_encoder(checkpoint, config.encoder, device, dtype)
        self.predict([torch.randn(WARMUP_FRAMES, FEATURE_DIM)])

    def decode(self, request) -> torch.Tensor:
        return sequence_input(request, "FEATURES")

    def predict(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return encode_batch(self.encoder, features)

    def encode(self, hidden: torch.Tensor):
        return pb_utils.InferenceResponse(output_tensors=[tensor_output("HIDDEN", hidden)])
