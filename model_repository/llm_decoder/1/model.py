"""Triton adapter: relays the unary ensemble's requests to the decoding engine (contract in config.pbtxt).

`execute` returns at once; a worker thread per request calls ar_llm_engine (decoupled) and sends
its final answer through the request's response sender. Parameter: engine_model.
"""

import json
import threading

import triton_python_backend_utils as pb_utils

from granite_speech_triton.serving import bls

INPUTS = ("AUDIO_EMBEDS", "OPTIONS", "DRAFT_IDS", "DRAFT_ENTROPY")
OUTPUTS = ["TEXT", "TOKEN_IDS"]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.engine = config["parameters"]["engine_model"]["string_value"]
        self.dependencies = bls.Dependencies(self.engine)

    def execute(self, requests: list) -> None:
        for request in requests:
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in INPUTS) if t is not None]
            sender = request.get_response_sender()
            threading.Thread(target=self.relay, args=(inputs, sender), daemon=True).start()
        return None

    def relay(self, inputs: list, sender) -> None:
        """The engine's last response becomes this request's only response."""
        last = None
        try:
            self.dependencies.ensure_loaded()
            for tensors in bls.stream(self.engine, inputs, OUTPUTS):
                last = tensors
            bls.send_final(sender, last)
        except bls.StepFailed as exc:
            bls.send_final(sender, error=exc.error)
        except Exception as exc:  # never leave a request unanswered
            bls.send_final(sender, error=bls.internal_error(exc))
