"""Triton adapter: first step of both pipelines (contract in config.pbtxt).

Validates the waveform and the request options, then computes stacked log-mel features.
Options leave this step as one canonical OPTIONS string with every default filled in, so the
later steps always receive the same set of inputs and Triton can batch any requests together
(its dynamic batcher never mixes requests that carry different sets of optional inputs).
Digital silence is marked there (`silent`): the text steps answer it empty without a model run.
Parameters: variant (ar | nar), checkpoint, revision (the projector's window sets AUDIO_ROWS), device,
max_audio_seconds, max_new_tokens_limit, cpu_threads.
"""

import time
from dataclasses import replace

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.audio import SAMPLE_RATE, Framing, LogMelFrontEnd, check_waveform, is_silent
from granite_speech_triton.model.projector import projector_config
from granite_speech_triton.model.prompts import ASR_LANGUAGES, NAR_LANGUAGES, SpeechRequest
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    Counter,
    optional_number,
    request_options,
    single_item,
    tensor_output,
)

LANGUAGES = {"ar": ASR_LANGUAGES, "nar": NAR_LANGUAGES}


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        stage = self.setup(args)
        variant = stage.params["variant"]
        self.front_end = LogMelFrontEnd(Framing(variant), stage.device)
        self.audio_rows = projector_config(stage.checkpoint(), variant).rows  # AUDIO_ROWS: the projector's rule
        self.languages = LANGUAGES[variant]
        self.max_samples = int(float(stage.params["max_audio_seconds"]) * SAMPLE_RATE)
        self.max_new_tokens_limit = int(stage.params["max_new_tokens_limit"])
        self.audio_seconds = Counter(
            "granite_speech_audio_seconds_total", "Seconds of audio accepted for processing", args["model_name"]
        )
        self.run([(torch.rand(SAMPLE_RATE) - 0.5, SpeechRequest())])  # warm up before reporting ready

    def decode(self, request) -> tuple[torch.Tensor, SpeechRequest]:
        rate = optional_number(request, "SAMPLE_RATE", SAMPLE_RATE)
        audio = check_waveform(np.asarray(single_item(request, "AUDIO")), int(rate), self.max_samples)
        options = request_options(request)
        options.validate(self.max_new_tokens_limit, self.languages)
        self.audio_seconds.add(audio.shape[0] / SAMPLE_RATE)
        return audio, replace(options.started(time.time()), silent=is_silent(audio))

    def predict(self, batch: list[tuple[torch.Tensor, SpeechRequest]]) -> list[tuple[torch.Tensor, str]]:
        return [(self.front_end(audio), options.to_json()) for audio, options in batch]

    def encode(self, output: tuple[torch.Tensor, str]):
        features, options = output
        return pb_utils.InferenceResponse(
            output_tensors=[
                self.float_output("FEATURES", features),
                tensor_output("AUDIO_ROWS", np.zeros(self.audio_rows(features.shape[0]), np.int8), np.int8),
                tensor_output("OPTIONS", np.array([options.encode()], dtype=np.object_), np.object_),
            ]
        )
