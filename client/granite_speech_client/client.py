"""GraniteSpeechClient: transcribe or translate audio with Granite Speech served on Triton."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, AudioSource, Span, is_digital_silence, load_audio, probe_audio, split_points
from .errors import AudioInputError, GraniteSpeechError, InvalidRequestError, ModelNotReadyError
from .options import (
    ENSEMBLES,
    FEATURE_EXTRACTORS,
    MAX_TIMEOUT_MS,
    VARIANTS,
    Decoding,
    RequestOptions,
    as_decoding,
    parse_keywords,
)
from .results import Health, ItemResult, Piece, SpeechResult, StreamUpdate, Word
from .streaming import STREAMING_MODEL, decode_text, stream
from .transport import ConnectionSettings, TransportPool, normalize_url

DEFAULT_MAX_AUDIO_SECONDS = 120.0  # used when the server's feature extractor does not say
# What the deep health check sends a request through: {entry model: variant}.
PIPELINES = {ENSEMBLES["ar"]: "ar", ENSEMBLES["nar"]: "nar", STREAMING_MODEL: "ar"}
PROBE_NEW_TOKENS = 1  # AR: one generated token shows that every step ran
OUTPUTS = ("TEXT", "TOKEN_IDS")
WORD_OUTPUTS = ("WORDS", "WORD_TIMES", "WORD_TOKENS")  # with TIMESTAMPS

Keywords = str | Sequence[str] | None


class GraniteSpeechClient:
    """A client of the `granite_speech` (AR) and `granite_speech_nar` (NAR) ensembles.

    One instance may be shared by threads (each thread gets its own tritonclient connection).
    Audio may be a file path, the bytes of a file (wav, flac, ogg, anything soundfile reads) or a
    numpy array [samples] / [samples, channels] with `sample_rate`. It is downmixed to mono and
    resampled to 16 kHz; audio longer than the server's limit is split at quiet points and its pieces
    sent `max_pieces_in_flight` at a time.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
        max_pieces_in_flight: int = 4,
    ) -> None:
        if max_pieces_in_flight < 1:
            raise InvalidRequestError(f"max_pieces_in_flight must be at least 1, got {max_pieces_in_flight}")
        self.settings = ConnectionSettings(
            normalize_url(url, protocol), protocol, timeout_s, connect_timeout_s, retries, retry_backoff_s
        )
        self.fallback_max_audio_seconds = max_audio_seconds
        self.max_pieces_in_flight = max_pieces_in_flight
        self._pool = TransportPool(self.settings)
        self._parameters_by_variant: dict[str, dict[str, str]] = {}

    # ---- public API -------------------------------------------------------------------------

    def transcribe(
        self,
        audio: AudioSource,
        *,
        variant: str = "ar",
        language: str = "en",
        keywords: Keywords = None,
        punctuate: bool = False,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        decoding: Decoding | str | None = None,
        timestamps: bool = False,
    ) -> SpeechResult:
        """Speech -> text in `language`. keywords, punctuate, max_new_tokens and decoding (a Decoding,
        or a mode name: greedy, beam, cascade, speculative) are AR only. timestamps: the result's
        `words` with their start and end times."""
        options = RequestOptions(
            variant, "transcribe", language, None, parse_keywords(keywords), punctuate, max_new_tokens,
            as_decoding(decoding), timestamps,
        )  # fmt: skip
        return self._run(audio, options, sample_rate)

    def translate(
        self,
        audio: AudioSource,
        *,
        target_language: str,
        language: str = "en",
        variant: str = "ar",
        punctuate: bool = False,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        decoding: Decoding | str | None = None,
    ) -> SpeechResult:
        """Speech in `language` -> text in `target_language` (AR only; one side English)."""
        options = RequestOptions(
            variant, "translate", language, target_language, (), punctuate, max_new_tokens, as_decoding(decoding)
        )
        return self._run(audio, options, sample_rate)

    def transcribe_many(
        self,
        items: Iterable[AudioSource],
        *,
        max_in_flight: int = 8,
        on_result: Callable[[ItemResult], None] | None = None,
        variant: str = "ar",
        language: str = "en",
        keywords: Keywords = None,
        punctuate: bool = False,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        decoding: Decoding | str | None = None,
    ) -> list[ItemResult]:
        """Transcribe many inputs concurrently, at most `max_in_flight` at a time.

        Returns one ItemResult per input, in input order; a failed item carries its error and
        does not affect the others. `on_result` is called (in this thread) as each item ends.
        Bad options raise InvalidRequestError before anything is sent.
        """
        options = RequestOptions(
            variant, "transcribe", language, None, parse_keywords(keywords), punctuate, max_new_tokens,
            as_decoding(decoding),
        )  # fmt: skip
        return self._many(list(items), options, sample_rate, max_in_flight, on_result)

    def translate_many(
        self,
        items: Iterable[AudioSource],
        *,
        target_language: str,
        max_in_flight: int = 8,
        on_result: Callable[[ItemResult], None] | None = None,
        language: str = "en",
        variant: str = "ar",
        punctuate: bool = False,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        decoding: Decoding | str | None = None,
    ) -> list[ItemResult]:
        """`translate` for many inputs; see `transcribe_many`."""
        options = RequestOptions(
            variant, "translate", language, target_language, (), punctuate, max_new_tokens, as_decoding(decoding)
        )
        return self._many(list(items), options, sample_rate, max_in_flight, on_result)

    def transcribe_stream(
        self,
        audio: AudioSource,
        *,
        language: str = "en",
        keywords: Keywords = None,
        punctuate: bool = False,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        decoding: Decoding | str | None = None,
    ) -> Iterator[StreamUpdate]:
        """`transcribe` (AR) yielding the growing text as the server generates it; the last update
        is final. Stopping the iteration early cancels the request on the server (gRPC)."""
        options = RequestOptions(
            "ar", "transcribe", language, None, parse_keywords(keywords), punctuate, max_new_tokens,
            as_decoding(decoding),
        )  # fmt: skip
        return self._stream(audio, options, sample_rate)

    def translate_stream(
        self,
        audio: AudioSource,
        *,
        target_language: str,
        language: str = "en",
        punctuate: bool = False,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        decoding: Decoding | str | None = None,
    ) -> Iterator[StreamUpdate]:
        """`translate` yielding the growing text; see `transcribe_stream`."""
        options = RequestOptions(
            "ar", "translate", language, target_language, (), punctuate, max_new_tokens, as_decoding(decoding)
        )
        return self._stream(audio, options, sample_rate)

    def max_audio_seconds(self, variant: str = "ar") -> float:
        """The server's audio limit for `variant` (its feature extractor's `max_audio_seconds`)."""
        value = self._parameters(variant).get("max_audio_seconds", "")
        return float(value) if value else self.fallback_max_audio_seconds

    def max_new_tokens_limit(self, variant: str = "ar") -> int | None:
        """The largest `max_new_tokens` the server takes for `variant` (None when its config does not say)."""
        value = self._parameters(variant).get("max_new_tokens_limit", "")
        return int(value) if value else None

    def _parameters(self, variant: str) -> dict[str, str]:
        """The `parameters` of the variant's feature extractor, read once."""
        check_variant(variant)
        if variant not in self._parameters_by_variant:
            model = FEATURE_EXTRACTORS[variant]
            try:
                parameters = self._pool.get().model_parameters(model)
            except ModelNotReadyError as exc:
                raise ModelNotReadyError(
                    f"variant {variant!r} is not served by {self.settings.url}: "
                    f"model {model!r} (part of ensemble {ENSEMBLES[variant]!r}) is not available ({exc})"
                ) from exc
            self._parameters_by_variant[variant] = parameters
        return self._parameters_by_variant[variant]

    def health(self) -> Health:
        """Server liveness and readiness, and the readiness of each ensemble."""
        transport = self._pool.get()
        live = transport.call("is_server_live")
        ready = transport.call("is_server_ready")
        ensembles = {name: bool(transport.call("is_model_ready", name)) for name in ENSEMBLES.values()}
        return Health(bool(live), bool(ready), ensembles)

    def is_ready(self, model: str) -> bool:
        """Whether the server reports `model` (an ensemble, the streaming model...) ready."""
        return bool(self._pool.get().call("is_model_ready", model))

    def probe(self, pipeline: str) -> float:
        """One tiny real request through `pipeline` (a key of PIPELINES), every step of it run:
        returns its latency in seconds, or raises what the request raised."""
        started = time.perf_counter()
        variant = PIPELINES[pipeline]
        new_tokens = PROBE_NEW_TOKENS if variant == "ar" else None
        if pipeline == STREAMING_MODEL:
            for _update in self.transcribe_stream(probe_audio(), sample_rate=SAMPLE_RATE, max_new_tokens=new_tokens):
                pass
        else:
            self.transcribe(probe_audio(), sample_rate=SAMPLE_RATE, variant=variant, max_new_tokens=new_tokens)
        return time.perf_counter() - started

    def check_ready(self, variant: str = "ar") -> None:
        """Raise ServerUnreachableError or ModelNotReadyError unless `variant` can be served."""
        ensemble = ENSEMBLES[check_variant(variant)]
        if not self._pool.get().call("is_model_ready", ensemble):
            raise ModelNotReadyError(f"ensemble {ensemble!r} (variant {variant}) is not ready on {self.settings.url}")
        self.max_audio_seconds(variant)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> GraniteSpeechClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- one input --------------------------------------------------------------------------

    def _run(self, audio: AudioSource, options: RequestOptions, sample_rate: int | None) -> SpeechResult:
        options.validate()
        waveform = load_audio(audio, sample_rate)
        limit = self.max_audio_seconds(options.variant)
        seconds = waveform.shape[0] / SAMPLE_RATE
        if seconds <= limit:
            started = time.perf_counter()
            text, token_ids, words = self._infer(waveform, options)
            latency = time.perf_counter() - started
            return SpeechResult(text, token_ids, options.variant, options.task, seconds, latency, words=words)
        pieces = self._pieces(waveform, split_points(waveform, limit), options)
        sent = [p for p in pieces if not p.skipped]  # none when every sample is zero: an empty result
        latency = sum(p.latency_s for p in sent)
        if options.timestamps:
            words = stitch_words(sent)
            text, token_ids = "".join(w.text for w in words).strip(), tuple(t for w in words for t in w.token_ids)
            return SpeechResult(text, token_ids, options.variant, options.task, seconds, latency, pieces, words)
        text = " ".join(p.text.strip() for p in sent if p.text.strip())
        token_ids = tuple(t for p in sent for t in p.token_ids)
        return SpeechResult(text, token_ids, options.variant, options.task, seconds, latency, pieces)

    def _pieces(self, waveform: np.ndarray, spans: list[Span], options: RequestOptions) -> tuple[Piece, ...]:
        """Every piece's result, in order, with up to `max_pieces_in_flight` requests at a time."""
        workers: set[int] = set()

        def work(span: Span) -> Piece:
            workers.add(threading.get_ident())
            return self._piece(waveform, span, options)

        try:
            with ThreadPoolExecutor(min(self.max_pieces_in_flight, len(spans)), "granite-speech-piece") as pool:
                return tuple(pool.map(work, spans))
        finally:
            self._pool.discard(workers)  # the worker threads are gone; close their connections

    def _piece(self, waveform: np.ndarray, span: Span, options: RequestOptions) -> Piece:
        start_s, end_s = span.seconds
        samples = waveform[span.start : span.end]
        if is_digital_silence(samples):  # the server would answer it with empty text
            return Piece(start_s, end_s, "", (), 0.0, skipped=True)
        started = time.perf_counter()
        text, token_ids, words = self._infer(samples, options, start_s)
        return Piece(start_s, end_s, text, token_ids, time.perf_counter() - started, words=words)

    def _infer(
        self, waveform: np.ndarray, options: RequestOptions, offset_s: float = 0.0
    ) -> tuple[str, tuple[int, ...], tuple[Word, ...]]:
        """One request: text, token ids and, with timestamps, the words (times from `offset_s`)."""
        inputs = request_inputs(waveform, options, self.settings.timeout_s)
        outputs = OUTPUTS + (WORD_OUTPUTS if options.timestamps else ())
        result = self._pool.get().infer(ENSEMBLES[options.variant], inputs, outputs)
        text = decode_text(result["TEXT"].reshape(-1)[0])
        token_ids = tuple(int(t) for t in result["TOKEN_IDS"].reshape(-1))
        if not options.timestamps:
            return text, token_ids, ()
        return text, token_ids, timed_words(result, token_ids, offset_s, waveform.shape[0] / SAMPLE_RATE)

    # ---- streaming --------------------------------------------------------------------------

    def _stream(self, audio: AudioSource, options: RequestOptions, sample_rate: int | None) -> Iterator[StreamUpdate]:
        """Checks and loads the audio now; the returned iterator sends the request(s)."""
        options.validate()
        waveform = load_audio(audio, sample_rate)
        limit = self.max_audio_seconds(options.variant)
        spans = split_points(waveform, limit) if waveform.shape[0] > limit * SAMPLE_RATE else []
        return self._stream_pieces([waveform[s.start : s.end] for s in spans] or [waveform], options)

    def _stream_pieces(self, pieces: list[np.ndarray], options: RequestOptions) -> Iterator[StreamUpdate]:
        """Stream each piece in turn; the text of earlier pieces leads the text of later ones."""
        done_text, done_ids = "", ()
        for index, samples in enumerate(pieces):
            last = index == len(pieces) - 1
            if is_digital_silence(samples):
                if last:
                    yield StreamUpdate(done_text, done_ids, True)
                continue
            inputs = request_inputs(samples, options, self.settings.timeout_s)
            for text, ids, final in stream(self.settings, inputs):
                joined = " ".join(t for t in (done_text, text.strip()) if t)
                yield StreamUpdate(joined, done_ids + ids, final and last)
                if final:
                    done_text, done_ids = joined, done_ids + ids

    # ---- many inputs ------------------------------------------------------------------------

    def _many(
        self,
        items: list[AudioSource],
        options: RequestOptions,
        sample_rate: int | None,
        max_in_flight: int,
        on_result: Callable[[ItemResult], None] | None,
    ) -> list[ItemResult]:
        if max_in_flight < 1:
            raise InvalidRequestError(f"max_in_flight must be at least 1, got {max_in_flight}")
        options.validate()
        results: list[ItemResult] = [ItemResult(i, source_name(item, i)) for i, item in enumerate(items)]
        workers: set[int] = set()

        def work(index: int) -> ItemResult:
            workers.add(threading.get_ident())
            try:
                return ItemResult(index, results[index].source, result=self._run(items[index], options, sample_rate))
            except GraniteSpeechError as exc:
                return ItemResult(index, results[index].source, error=exc)

        try:
            with ThreadPoolExecutor(max(1, min(max_in_flight, len(items))), "granite-speech") as pool:
                for future in as_completed([pool.submit(work, i) for i in range(len(items))]):
                    item = future.result()
                    results[item.index] = item
                    if on_result is not None:
                        on_result(item)
        finally:
            self._pool.discard(workers)  # the worker threads are gone; close their connections
        return results


def audio_input(waveform: np.ndarray) -> np.ndarray:
    """The AUDIO tensor of one request: [1, samples] float32, the only shape the ensembles take.

    A rank-1 [samples] tensor would be read by Triton as `samples` requests of one sample each
    and refused with a confusing "batch-size must be <= 16", so anything but one non-empty mono
    waveform is refused here, before it is sent.
    """
    if waveform.ndim != 1 or waveform.shape[0] == 0:
        raise AudioInputError(
            f"AUDIO must be one non-empty mono waveform, sent as [1, samples]; got shape {list(waveform.shape)}"
        )
    return waveform[None].astype(np.float32, copy=False)


def request_inputs(waveform: np.ndarray, options: RequestOptions, timeout_s: float) -> dict[str, np.ndarray]:
    """The ensemble's inputs; optional ones only when they differ from the server's defaults.

    AR requests carry the client's timeout, so that the server stops decoding a request the client
    no longer waits for.
    """
    inputs = {"AUDIO": audio_input(waveform)}  # [1, samples]
    texts = {
        "TASK": options.task if options.task != "transcribe" else None,
        "LANGUAGE": options.language if options.language != "en" else None,
        "TARGET_LANGUAGE": options.target_language,
        "KEYWORDS": ",".join(options.keywords) or None,
    }
    for name, value in texts.items():
        if value:
            inputs[name] = np.array([[value.encode("utf-8")]], dtype=np.object_)  # [1, 1]
    for name, flag in (("PUNCTUATE", options.punctuate), ("TIMESTAMPS", options.timestamps)):
        if flag:
            inputs[name] = np.array([[True]])
    if options.max_new_tokens is not None:
        inputs["MAX_NEW_TOKENS"] = np.array([[options.max_new_tokens]], dtype=np.int32)
    inputs.update(decoding_inputs(options.decoding))
    if options.variant == "ar":
        inputs["TIMEOUT_MS"] = np.array([[min(int(timeout_s * 1000), MAX_TIMEOUT_MS)]], dtype=np.int32)
    return inputs


def decoding_inputs(decoding: Decoding) -> dict[str, np.ndarray]:
    """DECODE_MODE, NUM_BEAMS, CONFIDENCE, ENTROPY_GATE: those that are not the server's defaults."""
    inputs = {}
    if decoding.mode != "greedy":
        inputs["DECODE_MODE"] = np.array([[decoding.mode.encode()]], dtype=np.object_)
    if decoding.num_beams is not None:
        inputs["NUM_BEAMS"] = np.array([[decoding.num_beams]], dtype=np.int32)
    for name, value in (("CONFIDENCE", decoding.confidence), ("ENTROPY_GATE", decoding.entropy_gate)):
        if value is not None:
            inputs[name] = np.array([[value]], dtype=np.float32)
    return inputs


def timed_words(
    outputs: dict[str, np.ndarray], token_ids: tuple[int, ...], offset_s: float, seconds: float
) -> tuple[Word, ...]:
    """The WORDS, WORD_TIMES and WORD_TOKENS of one response as Words, `offset_s` added to every time.

    The aligner's times are multiples of its 80 ms frames; the last word's end is kept within the audio.
    """
    counts = [int(n) for n in outputs["WORD_TOKENS"].reshape(-1)]
    first = np.cumsum([0, *counts]).tolist()
    times = outputs["WORD_TIMES"].reshape(-1, 2)
    return tuple(
        Word(
            decode_text(text),
            offset_s + min(float(start), seconds),
            offset_s + min(float(end), seconds),
            token_ids[first[i] : first[i + 1]],
        )
        for i, (text, (start, end)) in enumerate(zip(outputs["WORDS"].reshape(-1), times, strict=True))
    )


def stitch_words(pieces: Sequence[Piece]) -> tuple[Word, ...]:
    """The words of a split file's pieces in order. Each piece starts OVERLAP_S before the previous
    one's end, so a word heard by both is dropped from the later piece (its middle lies before the
    previous piece's end), and a kept word starts no earlier than that end (words never overlap); a
    later piece's first word is separated from the earlier text by a space."""
    words: list[Word] = []
    previous_end = 0.0
    for piece in pieces:
        kept = [
            replace(w, start_s=max(w.start_s, previous_end))
            for w in piece.words
            if (w.start_s + w.end_s) / 2 >= previous_end
        ]
        if words and kept and not kept[0].text[:1].isspace():
            kept[0] = replace(kept[0], text=" " + kept[0].text)
        words += kept
        previous_end = piece.end_s
    return tuple(words)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise InvalidRequestError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def source_name(item: AudioSource, index: int) -> str:
    if isinstance(item, (bytes, bytearray)):
        return f"<bytes #{index}>"
    if isinstance(item, np.ndarray):
        return f"<array #{index}>"
    return str(Path(item))
