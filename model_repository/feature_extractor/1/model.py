"""Triton adapter: waveform -> stacked log-mel features (contract in config.pbtxt).

Parameters: framing (ar | nar), device, max_audio_seconds, cpu_threads.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.audio import SAMPLE_RATE, Framing, LogMelFrontEnd, check_waveform
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    configure_threads,
    model_parameters,
    optional_number,
    single_item,
    tensor_output,
    torch_device,
)


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        configure_threads(params)
        self.front_end = LogMelFrontEnd(Framing(params["framing"]), torch_device(args, params["device"]))
        self.max_samples = int(float(params["max_audio_seconds"]) * SAMPLE_RATE)
        self.predict([torch.rand(SAMPLE_RATE) - 0.5])  # warm up before reporting ready

    def decode(self, request) -> torch.Tensor:
        rate = optional_number(request, "SAMPLE_RATE", SAMPLE_RATE)
        audio = single_item(request, "AUDIO")
        return check_waveform(np.asarray(audio), int(rate), self.max_samples)

    def predict(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.front_end(audio) for audio in waveforms]

    def encode(self, features: torch.Tensor):
        return pb_utils.InferenceResponse(output_tensors=[tensor_output("FEATURES", features)])
