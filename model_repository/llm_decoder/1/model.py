"""Triton adapter: audio embeddings + request OPTIONS -> text (contract in config.pbtxt).

Parameters: checkpoint, revision, device, dtype, max_new_tokens_limit, cpu_threads.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.decoder import DecodeItem, PromptedDecoder, Transcript, load_prompted_decoder
from granite_speech_triton.model.prompts import SpeechRequest
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    Counter,
    optional_text,
    sequence_input,
    tensor_output,
)

WARMUP_AUDIO_TOKENS = 30
WARMUP_NEW_TOKENS = 4


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        stage = self.setup(args)
        self.decoder: PromptedDecoder = load_prompted_decoder(stage.checkpoint(), stage.device, stage.dtype)
        self.max_new_tokens_limit = int(stage.params["max_new_tokens_limit"])
        self.tokens = Counter("granite_speech_generated_tokens_total", "Tokens generated", args["model_name"])
        hidden = self.decoder.decoder.llm.config.hidden_size
        warmup = SpeechRequest(max_new_tokens=WARMUP_NEW_TOKENS)
        self.run([self.decoder.prepare(warmup, torch.randn(WARMUP_AUDIO_TOKENS, hidden))])

    def decode(self, request) -> DecodeItem:
        options = SpeechRequest.from_json(optional_text(request, "OPTIONS", "{}"))
        options.validate(self.max_new_tokens_limit)
        return self.decoder.prepare(options, sequence_input(request, "AUDIO_EMBEDS"))

    def predict(self, items: list[DecodeItem]) -> list[Transcript]:
        return self.decoder.run(items)

    def encode(self, transcript: Transcript):
        self.tokens.add(len(transcript.token_ids))
        text = np.array([transcript.text.encode("utf-8")], dtype=np.object_)
        ids = np.array(transcript.token_ids, dtype=np.int32)
        return pb_utils.InferenceResponse(
            output_tensors=[tensor_output("TEXT", text, np.object_), tensor_output("TOKEN_IDS", ids, np.int32)]
        )
