"""Triton adapter: audio rows + draft ids -> edited transcript, packed (contract in config.pbtxt).

Parameters: checkpoint, revision, device, dtype, pack_token_budget, cpu_threads.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.decoder import load_tokenizer
from granite_speech_triton.model.nar import load_nar_config, load_nar_language_model
from granite_speech_triton.model.weights import parse_dtype, resolve_checkpoint
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    Counter,
    configure_threads,
    model_parameters,
    sequence_input,
    single_item,
    tensor_output,
    torch_device,
)

WARMUP_ROWS = 50


class TritonPythonModel(BatchAdapter):
    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        configure_threads(params)
        self.init_metrics(args)
        self.tokens = Counter("granite_speech_generated_tokens_total", "Tokens generated", args["model_name"])
        checkpoint = resolve_checkpoint(params["checkpoint"], params["revision"] or None)
        cfg = load_nar_config(checkpoint)
        device, dtype = torch_device(args, params["device"]), parse_dtype(params["dtype"])
        self.head = load_nar_language_model(checkpoint, cfg, device, dtype)
        self.tokenizer = load_tokenizer(checkpoint)
        self.pack_budget = int(params["pack_token_budget"])
        self.predict([(torch.randn(WARMUP_ROWS, cfg.text["hidden_size"]), [1, 2, 3])])

    def decode(self, request) -> tuple[torch.Tensor, list[int]]:
        draft = single_item(request, "DRAFT_IDS")
        return sequence_input(request, "AUDIO_EMBEDS"), [] if draft is None else draft.tolist()

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
