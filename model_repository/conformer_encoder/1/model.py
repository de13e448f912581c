"""Triton adapter: stacked log-mel features -> Conformer encoder outputs (contract in config.pbtxt).

variant ar:  FEATURES -> HIDDEN (final layer), DRAFT_IDS and DRAFT_ENTROPY (BPE CTC draft of out_llm;
             empty when the checkpoint has no out_llm.safetensors), POOLED (the draft's pooled rows,
             which the aligner reads; empty without out_llm).
variant nar: FEATURES -> PROJECTOR_INPUT (layers [4, 8, 12, -1]), DRAFT_IDS (BPE CTC draft), POOLED.
Parameters: variant, checkpoint, revision, device, dtype, cpu_threads, cpu_lease_file.
"""

from collections.abc import Callable

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.audio import FEATURE_DIM
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.draft import Draft, ar_pooled_rows, drafts_from_rows, load_draft_head
from granite_speech_triton.model.encoder import load_encoder, pad_batch, padding_waste, run_in_length_groups
from granite_speech_triton.model.nar import load_nar_config, load_nar_encoder
from granite_speech_triton.serving.triton_io import (
    BatchAdapter,
    sequence_input,
    tensor_output,
)

WARMUP_FRAMES = 250  # 5 s of audio: crosses an attention block boundary
NO_DRAFT = Draft([], 0.0)
Outputs = dict[str, torch.Tensor | np.ndarray]


def ar_encoder(checkpoint, device, dtype) -> Callable[[list[torch.Tensor]], list[Outputs]]:
    cfg = ARModelConfig.from_dict(read_config_json(checkpoint)).encoder
    encoder = load_encoder(checkpoint, cfg, device, dtype)
    head = load_draft_head(checkpoint, cfg, device, dtype)
    no_rows = torch.zeros(0, cfg.hidden_dim)

    def run(features: list[torch.Tensor]) -> list[Outputs]:
        padded, lengths = pad_batch(features)
        with torch.inference_mode():
            out = encoder(padded, lengths, keep_hidden_states=head is not None)
            if head is not None:
                rows, pooled_lengths = ar_pooled_rows(encoder, out, lengths)
                drafts, pooled = drafts_from_rows(head, rows, pooled_lengths), rows.split(pooled_lengths)
            else:
                drafts, pooled = [NO_DRAFT] * len(features), [no_rows] * len(features)
        return [
            {
                "HIDDEN": out.last_hidden_state[i, :n],
                "DRAFT_IDS": np.array(draft.ids, dtype=np.int32),
                "DRAFT_ENTROPY": np.array([draft.max_entropy], dtype=np.float32),
                "POOLED": rows,
            }
            for i, (n, draft, rows) in enumerate(zip(lengths.tolist(), drafts, pooled, strict=True))
        ]

    return lambda features: run_in_length_groups(features, run, padding_waste(device))


def nar_encoder(checkpoint, device, dtype) -> Callable[[list[torch.Tensor]], list[Outputs]]:
    encoder = load_nar_encoder(checkpoint, load_nar_config(checkpoint), device, dtype)

    def run(features: list[torch.Tensor]) -> list[Outputs]:
        out = encoder.encode(*pad_batch(features))
        return [
            {"PROJECTOR_INPUT": x, "DRAFT_IDS": np.array(draft, dtype=np.int32), "POOLED": rows}
            for x, draft, rows in zip(out.projector_inputs, out.drafts, out.pooled, strict=True)
        ]

    return lambda features: run_in_length_groups(features, run, padding_waste(device))


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
            self.float_output(name, value)
            if isinstance(value, torch.Tensor)
            else tensor_output(name, value, value.dtype)
            for name, value in outputs.items()
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
