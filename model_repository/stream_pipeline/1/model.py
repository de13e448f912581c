"""Triton adapter: the streaming AR pipeline, decoupled (contract in config.pbtxt).

Per request, a worker thread calls ar_encode (audio -> audio embeddings, options validated), then
streams the decoding engine's partial responses back to the client. A client that cancels is
seen here (Triton 2.51 does not pass cancellation through ensembles) and its engine request is
cancelled by key. The STREAMS_IN_FLIGHT gauge counts the requests being served (the launcher's
drain waits for it). Parameters: encode_model, draft_outputs (what ar_encode adds for draft
modes), engine_model.
"""

import json
import threading
import time
import uuid

import triton_python_backend_utils as pb_utils

from granite_speech_triton.serving import bls
from granite_speech_triton.serving.repository import STREAMS_IN_FLIGHT
from granite_speech_triton.serving.triton_io import Counter

INPUTS = ("AUDIO", "SAMPLE_RATE", "TASK", "LANGUAGE", "TARGET_LANGUAGE", "KEYWORDS", "PUNCTUATE", "MAX_NEW_TOKENS")
INPUTS += ("TIMEOUT_MS", "DECODE_MODE", "NUM_BEAMS", "CONFIDENCE", "ENTROPY_GATE")
OUTPUTS = ["TEXT", "TOKEN_IDS"]


CANCEL_POLL_S = 0.1  # how often open streams are checked for cancellation


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = json.loads(args["model_config"])["parameters"]
        self.encode_model = params["encode_model"]["string_value"]
        self.encoded = ["AUDIO_EMBEDS", "OPTIONS", *filter(None, params["draft_outputs"]["string_value"].split(","))]
        self.engine = params["engine_model"]["string_value"]
        self.dependencies = bls.Dependencies(self.encode_model, self.engine)
        self.open: dict[str, object] = {}  # engine key -> the client's request, while it streams
        self.lock = threading.Lock()
        self.in_flight = Counter(STREAMS_IN_FLIGHT, "Streaming requests being served", args["model_name"], gauge=True)
        threading.Thread(target=self.watch_cancellations, daemon=True).start()

    def execute(self, requests: list) -> None:
        for request in requests:
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in INPUTS) if t is not None]
            self.in_flight.add(1)  # counted before execute returns: a drain never misses it
            threading.Thread(target=self.run, args=(request, inputs), daemon=True).start()
        return None

    def run(self, request, inputs: list) -> None:
        sender = request.get_response_sender()
        key = uuid.uuid4().hex
        outputs, error = None, None
        try:
            outputs = self.serve(request, inputs, key, sender)
        except bls.StepFailed as exc:
            error = exc.error
        except Exception as exc:  # never leave a request unanswered
            error = bls.internal_error(exc)
        finally:
            # Out of the watcher's sight before the final response: that response frees the
            # request's response factory in Triton, and `is_cancelled` on it then crashes the server.
            with self.lock:
                self.open.pop(key, None)
        bls.send_final(sender, outputs, error=error)
        self.in_flight.add(-1)

    def serve(self, request, inputs: list, key: str, sender) -> list:
        """Encode, then relay the engine's partial responses; returns the final response's tensors."""
        self.dependencies.ensure_loaded()
        encoded = bls.call(self.encode_model, inputs, self.encoded)
        engine_inputs = [*encoded.values(), bls.control({"stream": True, "key": key})]
        with self.lock:
            self.open[key] = request
        for tensors in bls.stream(self.engine, engine_inputs, [*OUTPUTS, "FINAL"]):
            by_name = {t.name(): t for t in tensors}
            outputs = [by_name[name] for name in OUTPUTS]
            if by_name["FINAL"].as_numpy().reshape(-1)[0]:
                return outputs
            bls.send_partial(sender, outputs)
        raise RuntimeError("the engine closed a stream without a final response")

    def watch_cancellations(self) -> None:
        """Cancel the engine request of every stream whose client gave up."""
        while True:
            time.sleep(CANCEL_POLL_S)
            with self.lock:
                gone = [key for key, request in self.open.items() if request.is_cancelled()]
                for key in gone:
                    del self.open[key]
            for key in gone:
                try:
                    for _ in bls.stream(self.engine, [bls.control({"cancel": key})], OUTPUTS):
                        pass
                except Exception:  # the engine ends the request at its deadline anyway
                    bls.log.exception("cancelling an engine request failed")
