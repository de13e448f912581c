"""Triton adapter: audio rows + draft ids -> edited transcript, packed (contract in config.pbtxt).

Parameters: checkpoint, revision, device, dtype, pack_token_budget, cpu_threads, cpu_lease_file.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.decoder import load_tokenizer
from granite_speech_triton.model.nar import load_nar_config, load_nar_language_model
from granite_speech_triton.model.prompts import SpeechRequest
from granite_speech_triton.serving.triton_io import (
    Answered,
    BatchAdapter,
    Counter,
    optional_text,
    sequence_input,
    single_item,
    tensor_output,
)

WARMUP_ROWS = 50


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        stage = self.setup(args)
        self.tokens = Counter("granite_speech_generated_tokens_total", "Tokens generated", args["model_name"])
        checkpoint = stage.checkpoint()
        cfg = load_nar_config(checkpoint)
        self.head = load_nar_language_model(checkpoint, cfg, stage.device, stage.dtype)
        self.tokenizer = load_tokenizer(checkpoint)
        self.pack_budget = int(stage.params["pack_token_budget"])
        self.run([(torch.randn(WARMUP_ROWS, cfg.text["hidden_size"]), [1, 2, 3])])

    def decode(self, request) -> tuple[torch.Tensor, list[int]] | Answered:
        if SpeechRequest.from_json(optional_text(request, "OPTIONS", "{}")).silent:
            return Answered([])  # digital silence: no transcript, and no place in the packed batch
        draft = single_item(request, "DRAFT_IDS")
        # The libtorch NAR encoder pads DRAFT_IDS with -1 to one slot per frame.
        return sequence_input(request, "AUDIO_EMBEDS"), [] if draft is None else draft[draft >= 0].tolist()

    def predict(self, batch: list[tuple[torch.Tensor, list[int]]]) -> list[list[int]]:
        audio = [rows for rows, _ in batch]
        return self.head(audio, [draft for _, draft in batch], self.pack_budget)

    def encode(self, token_ids: list[int]):
        self.tokens.add(len(token_ids))
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return pb_utils.InferenceResponse(
            output_tensors=[
                tensor_output("TEXT", np.array([text.encode("utf-8")], dtype=np.object_), np.object_),
                tensor_output("TOKEN_IDS", np.array(token_ids, dtype=np.int32), np.int32),
            ]
        )
