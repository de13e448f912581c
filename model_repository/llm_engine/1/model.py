"""Triton adapter: the AR decoding engine, decoupled (contract in config.pbtxt).

`execute` hands each request to the engine and returns at once; the engine's thread answers.
Parameters: checkpoint, revision, device, dtype, max_new_tokens_limit, max_audio_seconds,
scheduler, max_decode_rows, kv_tokens_per_row, prefill_token_budget, max_queue_size,
queue_timeout_us, cpu_threads, rows_kernel, cpu_lease_file.
"""

from granite_speech_triton.model.decoder import load_ar_decoder, positions_per_request
from granite_speech_triton.model.engine import EngineConfig
from granite_speech_triton.serving.engine_io import EngineFrontend
from granite_speech_triton.serving.triton_io import StageSettings, stage_settings

WARMUP_AUDIO_TOKENS = 30
WARMUP_NEW_TOKENS = 4


def engine_config(stage: StageSettings) -> EngineConfig:
    params = stage.params
    limit = int(params["max_new_tokens_limit"])
    tokens = int(params["kv_tokens_per_row"]) or positions_per_request(
        stage.checkpoint(), float(params["max_audio_seconds"]), limit
    )
    return EngineConfig(
        max_rows=int(params["max_decode_rows"]),
        max_tokens_per_row=tokens,
        prefill_token_budget=int(params["prefill_token_budget"]),
        policy=params["scheduler"],
        max_waiting=int(params["max_queue_size"]),
        max_wait_s=int(params["queue_timeout_us"]) / 1e6,
    )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        stage = stage_settings(args)
        kernel = stage.params["rows_kernel"] == "auto"
        decoder = load_ar_decoder(stage.checkpoint(), stage.device, stage.dtype, engine_config(stage), kernel)
        limit = int(stage.params["max_new_tokens_limit"])
        self.frontend = EngineFrontend(decoder, args["model_name"], limit, stage.lease)
        self.frontend.warm_up(WARMUP_AUDIO_TOKENS, WARMUP_NEW_TOKENS)
        self.frontend.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            self.frontend.submit(request)
        return None

    def finalize(self) -> None:
        self.frontend.stop()
