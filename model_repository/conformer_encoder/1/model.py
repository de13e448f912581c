"""Triton adapter: stacked log-mel features -> Conformer encoder outputs (contract in config.pbtxt).

variant ar:  FEATURES -> HIDDEN (final layer).
variant nar: FEATURES -> PROJECTOR_INPUT (layers [4, 8, 12, -1]) and DRAFT_IDS (BPE CTC draft).
Parameters: variant, checkpoint, revision, device, dtype, cpu_threads.
"""

from collections.abc import Callable

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.audio import FEATURE_DIM
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.encoder import encode_batch, load_encoder
from granite_speech_triton.model.nar import load_nar_config, load_nar_encoder
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    sequence_input,
    tensor_output,
)

WARMUP_FRAMES = 250  # 5 s of audio: crosses an attention block boundary
Outputs = dict[str, torch.Tensor | np.ndarray]


def ar_encoder(checkpoint, device, dtype) -> Callable[[list[torch.Tensor]], list[Outputs]]:
    encoder = load_encoder(checkpoint, ARModelConfig.from_dict(read_config_json(checkpoint)).encoder, device, dtype)
    return lambda features: [{"HIDDEN": h} for h in encode_batch(encoder, features)]


def nar_encoder(checkpoint, device, dtype) -> Callable[[list[torch.Tensor]], list[Outputs]]:
    encoder = load_nar_encoder(checkpoint, load_nar_config(checkpoint), device, dtype)
    return lambda features: [
        {"PROJECTOR_INPUT": x, "DRAFT_IDS": np.array(draft, dtype=np.int32)}
        for x, draft in encoder.encode_utterances(features)
    ]


ENCODERS = {"ar": ar_encoder, "nar": nar_encoder}


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        stage = self.setup(args)
        self.encoder = ENCODERS[stage.params["variant"]](stage.checkpoint(), stage.device, stage.dtype)
        self.run([torch.randn(WARMUP_FRAMES, FEATURE_DIM)])

    def decode(self, request) -> torch.Tensor:
        return sequence_input(request, "FEATURES")

    def predict(self, features: list[torch.Tensor]) -> list[Outputs]:
        return self.encoder(features)

    def encode(self, outputs: Outputs):
        tensors = [
            tensor_output(name, value, np.int32) if name == "DRAFT_IDS" else self.float_output(name, value)
            for name, value in outputs.items()
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
