"""Triton glue of the AR decoding engine (the decoupled `ar_llm_engine` model).

Requests go into the engine as they arrive; the engine's thread answers each one the moment it
ends, and sends partial responses (the text so far) after every step to requests that stream.

Inputs: AUDIO_EMBEDS [1, n, D] and OPTIONS (the request options JSON of the feature extractor),
and CONTROL, a JSON object of delivery instructions from the models in front of the engine:
`{"stream": true, "key": "..."}` (partial responses; a key to cancel by) or `{"cancel": "..."}`
(a control request: drop the request with that key; answered at once, with no outputs).
"""

from __future__ import annotations

import json
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from granite_speech_triton.model.decoder import ARDecoder
from granite_speech_triton.model.draft import Draft
from granite_speech_triton.model.engine import Finish, Mode, Overloaded, Sequence, StepReport
from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.prompts import SpeechRequest

from .bls import send_final, tagged_error
from .relayed_errors import QUEUE_FULL, QUEUE_TIMEOUT
from .triton_io import Counter, Histogram, optional_text, sequence_input, single_item, tensor_output

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SECONDS_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PASS_BUCKETS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
PER_PASS_BUCKETS = [0.5, 1, 1.5, 2, 3, 4, 8, 16, 32, 64]
RATE_WINDOW_S = 5.0  # generated tokens per second are averaged over this window
INCOMPLETE_CHARACTER = "\ufffd"  # how a multi-byte character cut by the end of a partial text decodes


ERROR_CODES = {
    Finish.CANCELLED: "CANCELLED",
    Finish.DEADLINE: "CANCELLED",
    Finish.OVERLOADED: "UNAVAILABLE",
    Finish.ERROR: "INTERNAL",
}


class EngineMetrics:
    """The engine's Prometheus metrics (names documented in the README)."""

    def __init__(self, model: str) -> None:
        self.step_rows = Histogram(
            "granite_speech_engine_step_rows", "Requests decoded together per engine step", model, ROW_BUCKETS
        )
        self.queue_wait = Histogram(
            "granite_speech_engine_queue_seconds", "Wait from arrival at the engine to prefill", model, SECONDS_BUCKETS
        )
        self.first_token = Histogram(
            "granite_speech_engine_first_token_seconds",
            "Time from arrival at the engine to the first generated token",
            model,
            SECONDS_BUCKETS,
        )
        self.tokens_per_second = Counter(
            "granite_speech_engine_tokens_per_second", "Generated tokens per second (5 s window)", model, gauge=True
        )
        self.rows = Counter("granite_speech_engine_rows", "Requests in the engine's latest step", model, gauge=True)
        self.waiting = Counter("granite_speech_engine_waiting", "Requests waiting for a free row", model, gauge=True)
        self.kv_bytes = Counter("granite_speech_kv_cache_bytes", "Bytes the KV cache pool holds", model, gauge=True)
        self.tokens = Counter("granite_speech_generated_tokens_total", "Tokens generated", model)
        self.busy = {
            phase: Counter(
                "granite_speech_engine_busy_seconds_total", "Seconds the engine computed, by phase", model, phase=phase
            )
            for phase in ("prefill", "decode")
        }
        self.ended = {
            reason: Counter("granite_speech_engine_requests_total", "Requests ended, by reason", model, reason=reason)
            for reason in (f.value for f in Finish)
        }
        self.rejected = Counter("granite_speech_rejected_requests_total", "Requests rejected as invalid", model)
        self.drafts = {
            outcome: Counter("granite_speech_engine_drafts_total", "Cascade drafts, by outcome", model, outcome=outcome)
            for outcome in ("accepted", "rejected")
        }
        self.draft_tokens = Counter(
            "granite_speech_engine_draft_tokens_accepted_total", "Draft tokens taken without steps of their own", model
        )
        self.passes = Histogram(
            "granite_speech_engine_passes", "LLM forward passes a request took part in", model, PASS_BUCKETS
        )
        self.tokens_per_pass = Histogram(
            "granite_speech_engine_tokens_per_pass",
            "Generated tokens per LLM pass, per request",
            model,
            PER_PASS_BUCKETS,
        )
        self._window: list[tuple[float, int]] = []

    def on_step(self, report: StepReport, kv_bytes: int) -> None:
        self.step_rows.observe(report.rows)
        self.rows.set(report.rows)
        self.waiting.set(report.waiting)
        self.kv_bytes.set(kv_bytes)
        self.busy["prefill"].add(report.prefill_seconds)
        self.busy["decode"].add(report.decode_seconds)
        for seq in report.admitted:
            self.queue_wait.observe(seq.admitted_at - seq.submitted_at)
            self.first_token.observe(seq.first_token_at - seq.submitted_at)
        self._window.append((report.finished_at, report.rows + len(report.admitted)))
        self._window = [(t, n) for t, n in self._window if t > report.finished_at - RATE_WINDOW_S]
        self.tokens_per_second.set(sum(n for _, n in self._window) / RATE_WINDOW_S)

    def on_end(self, seq: Sequence) -> None:
        self.ended[seq.finish.value].add(1)
        self.tokens.add(len(seq.tokens))
        self.passes.observe(seq.passes)
        if seq.passes:
            self.tokens_per_pass.observe(len(seq.tokens) / seq.passes)
        self.draft_tokens.add(seq.draft_accepted)
        if seq.mode is Mode.CASCADE and seq.finish in (Finish.DRAFT, Finish.EOS, Finish.LENGTH):
            self.drafts["accepted" if seq.finish is Finish.DRAFT else "rejected"].add(1)


@dataclass
class Delivery:
    """Where one request's answers go, and how many tokens it has been sent."""

    sender: object
    sent_tokens: int = field(default=0)


class EngineFrontend:
    """Feeds Triton requests into the engine and sends its answers back, from the engine's thread."""

    def __init__(
        self, decoder: ARDecoder, model_name: str, max_new_tokens_limit: int, lease: AbstractContextManager
    ) -> None:
        """`lease`: held for each engine step (the server's CPU lease, or nothing)."""
        self.decoder = decoder
        self.engine = decoder.engine
        self.max_new_tokens_limit = max_new_tokens_limit
        self.metrics = EngineMetrics(model_name)
        self.engine.observers.append(lambda report: self.metrics.on_step(report, self.engine.pool.allocated_bytes()))
        pool, config = self.engine.pool, self.engine.config
        pb_utils.Logger.log_info(
            f"{model_name}: KV cache of at most {config.max_rows} rows x {config.max_tokens_per_row} positions "
            f"= {pool.max_bytes() / 2**30:.2f} GiB ({config.policy.value} scheduler)"
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.engine.serve, args=(self._stop, lease), daemon=True, name="engine")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wake.set()
        self._thread.join()

    def submit(self, request) -> None:
        """Queue one Triton request; a bad one is answered at once with INVALID_ARG."""
        sender = request.get_response_sender()
        try:
            control = self._control(request)
            if "cancel" in control:
                self.engine.cancel(str(control["cancel"]))
                send_final(sender)
                return
            options = SpeechRequest.from_json(optional_text(request, "OPTIONS", "{}"))
            options.validate(self.max_new_tokens_limit)
            if options.silent:  # digital silence: an empty transcript, without running the model
                sender.send(self._response("", [], final=True), flags=FINAL)
                return
            delivery = Delivery(sender)
            seq = self.decoder.sequence(
                options,
                sequence_input(request, "AUDIO_EMBEDS").clone(),  # the engine keeps it past `execute`
                self._draft(request),
                stream=bool(control.get("stream", False)),
                key=str(control.get("key", "")),
                deadline=options.deadline or None,
                notify=lambda s: self._deliver(delivery, s),
                is_cancelled=request.is_cancelled,
            )
            self.engine.submit(seq)
        except RequestError as exc:
            self.metrics.rejected.add(1)
            send_final(sender, error=tagged_error(str(exc), "INVALID_ARG"))
        except Overloaded as exc:
            self.metrics.ended[Finish.OVERLOADED.value].add(1)
            send_final(sender, error=tagged_error(f"{QUEUE_FULL}: {exc}", "UNAVAILABLE"))

    @staticmethod
    def _draft(request) -> Draft | None:
        """The encoder's CTC draft, when the request carries one."""
        ids = single_item(request, "DRAFT_IDS")
        if ids is None:
            return None
        entropy = single_item(request, "DRAFT_ENTROPY")
        return Draft(ids.reshape(-1).tolist(), float("inf") if entropy is None else float(entropy.reshape(-1)[0]))

    @staticmethod
    def _control(request) -> dict:
        try:
            control = json.loads(optional_text(request, "CONTROL", "{}"))
        except ValueError as exc:
            raise RequestError(f"CONTROL is not JSON: {exc}") from exc
        if not isinstance(control, dict):
            raise RequestError("CONTROL must be a JSON object")
        return control

    def _deliver(self, delivery: Delivery, seq: Sequence) -> None:
        if seq.finish is None:
            self._partial(delivery, seq)
        elif seq.finish in (Finish.EOS, Finish.LENGTH, Finish.DRAFT) or (seq.finish is Finish.CANCELLED and seq.stream):
            # A cancelled stream ends like any stream, with the text so far: its caller (the
            # streaming pipeline) cancelled it because its own client had gone, and Triton 2.51
            # never delivers an error response to a BLS caller whose client has cancelled, which
            # would leave that caller waiting for good.
            self.metrics.on_end(seq)
            delivery.sender.send(self._response(self.decoder.text(seq.tokens), seq.tokens, final=True), flags=FINAL)
        else:
            self.metrics.on_end(seq)
            message = f"{QUEUE_TIMEOUT}: {seq.message}" if seq.finish is Finish.OVERLOADED else seq.message
            send_final(delivery.sender, error=tagged_error(message, ERROR_CODES[seq.finish]))

    def _partial(self, delivery: Delivery, seq: Sequence) -> None:
        """The text so far, without a multi-byte character that the next token may complete."""
        if len(seq.tokens) == delivery.sent_tokens:
            return
        delivery.sent_tokens = len(seq.tokens)
        text = self.decoder.text(seq.tokens).rstrip(INCOMPLETE_CHARACTER)
        delivery.sender.send(self._response(text, seq.tokens, final=False))

    @staticmethod
    def _response(text: str, token_ids: list[int], final: bool) -> pb_utils.InferenceResponse:
        return pb_utils.InferenceResponse(
            output_tensors=[
                tensor_output("TEXT", np.array([text.encode("utf-8")], dtype=np.object_), np.object_),
                tensor_output("TOKEN_IDS", np.array(token_ids, dtype=np.int32), np.int32),
                tensor_output("FINAL", np.array([final]), np.bool_),
            ]
        )

    def warm_up(self, audio_tokens: int, new_tokens: int) -> None:
        """Run one request through the engine on this thread, before the server reports ready."""
        hidden = self.decoder.engine.runner.llm.config.hidden_size
        self.decoder.transcribe([(SpeechRequest(max_new_tokens=new_tokens), torch.randn(audio_tokens, hidden), None)])
