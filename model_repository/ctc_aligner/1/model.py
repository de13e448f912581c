"""Triton adapter: pooled encoder rows + final token ids -> timed words (contract in config.pbtxt).

Requests whose OPTIONS do not ask for timestamps get no words, at once and without the head.
Parameters: variant, checkpoint, revision, device, dtype, cpu_threads.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.align import AlignedWord, load_aligner
from granite_speech_triton.model.decoder import load_tokenizer
from granite_speech_triton.model.draft import OUT_LLM_FILE
from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.prompts import SpeechRequest
from granite_speech_triton.serving.triton_io import (
    Answered,
    BatchAdapter,
    optional_text,
    sequence_input,
    single_item,
    tensor_output,
)

WARMUP_ROWS = 40  # 3.2 s of pooled rows
WARMUP_TEXT = " warm up the aligner"


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        stage = self.setup(args)
        checkpoint = stage.checkpoint()
        tokenizer = load_tokenizer(checkpoint)
        self.aligner = load_aligner(checkpoint, stage.params["variant"], tokenizer, stage.device, stage.dtype)
        if self.aligner is not None:
            ids = tokenizer.encode(WARMUP_TEXT, add_special_tokens=False)
            self.predict([(torch.randn(WARMUP_ROWS, self.aligner.head.in_features), ids)])

    def decode(self, request) -> tuple[torch.Tensor, list[int]] | Answered:
        if not SpeechRequest.from_json(optional_text(request, "OPTIONS", "{}")).timestamps:
            return Answered([])
        if self.aligner is None:
            raise RequestError(f"TIMESTAMPS need the checkpoint's CTC head {OUT_LLM_FILE}, which it does not have")
        if single_item(request, "POOLED") is None:
            raise RequestError("TIMESTAMPS need the encoder's pooled rows: serve with backend=python (the exported "
                               "libtorch encoder makes none)")  # fmt: skip
        ids = single_item(request, "TOKEN_IDS")
        return sequence_input(request, "POOLED"), [] if ids is None else ids.tolist()

    def predict(self, batch: list[tuple[torch.Tensor, list[int]]]) -> list[list[AlignedWord]]:
        return [self.aligner.align(rows, ids) for rows, ids in batch]

    def encode(self, words: list[AlignedWord]):
        texts = np.array([w.text.encode("utf-8") for w in words], dtype=np.object_)
        times = np.array([(w.start_s, w.end_s) for w in words], dtype=np.float32).reshape(-1, 2)
        return pb_utils.InferenceResponse(
            output_tensors=[
                tensor_output("WORDS", texts, np.object_),
                tensor_output("WORD_TIMES", times),
                tensor_output("WORD_TOKENS", np.array([w.num_tokens for w in words], dtype=np.int32), np.int32),
            ]
        )
