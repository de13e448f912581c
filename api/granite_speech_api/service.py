"""What the routes do, in plain blocking Python (run in threads): read audio, call Triton through
granite_speech_client, and turn its results into Transcripts or server-sent events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from math import ceil

import numpy as np
import soundfile
from granite_speech_client import (
    SAMPLE_RATE,
    GraniteSpeechClient,
    GraniteSpeechError,
    ModelNotReadyError,
    StreamUpdate,
    load_audio,
    split_points,
)
from granite_speech_client.options import ENSEMBLES
from starlette.datastructures import UploadFile

from .errors import ApiError, from_client_error, invalid
from .formats import TRANSLATION_SEGMENT_S, Segment, Transcript, segments_from_words
from .forms import MODELS, TIMED_FORMATS, SpeechForm
from .settings import ApiSettings

CARD_MAX_NEW_TOKENS = 200  # the model card's budget: no request gets less


class SpeechService:
    def __init__(self, client: GraniteSpeechClient, settings: ApiSettings) -> None:
        self.client = client
        self.settings = settings

    # ---- models and health ------------------------------------------------------------------

    def served_models(self) -> list[str]:
        """The OpenAI model ids whose ensemble Triton reports ready."""
        with client_errors():
            ready = self.client.health().ensembles
        return [model for model, variant in MODELS.items() if ready.get(ENSEMBLES[variant])]

    def health(self) -> dict:
        models = self.served_models()
        if not models:
            raise ApiError(503, f"Triton at {self.settings.triton_url} serves no model yet", code="unavailable")
        return {"status": "ok", "models": models}

    @contextmanager
    def model_errors(self, form: SpeechForm) -> Iterator[None]:
        """Client errors as API errors; a model this Triton does not serve is a 404."""
        try:
            yield
        except ModelNotReadyError as exc:
            with client_errors():
                health = self.client.health()
            if health.ready and not health.ensembles.get(ENSEMBLES[form.variant]):
                raise ApiError(404, f"the model {form.model!r} is not served here", "model", "model_not_found") from exc
            raise from_client_error(exc) from exc
        except GraniteSpeechError as exc:
            raise from_client_error(exc) from exc

    # ---- audio ------------------------------------------------------------------------------

    def decode(self, upload: UploadFile) -> np.ndarray:
        """The uploaded file as 16 kHz mono; its length is checked from its header before decoding."""
        file = upload.file
        try:
            info = soundfile.info(file)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            detail = getattr(exc, "error_string", None) or str(exc)
            raise invalid(f"{upload.filename or 'file'}: not an audio file this server reads (wav, flac, ogg, "
                          f"mp3...): {detail}", "file") from exc  # fmt: skip
        finally:
            file.seek(0)
        if info.duration > self.settings.max_audio_s:
            raise invalid(f"the audio lasts {info.duration:.0f} s; this server takes at most "
                          f"{self.settings.max_audio_s:.0f} s", "file")  # fmt: skip
        with client_errors():
            return load_audio(file)

    def max_new_tokens(self, form: SpeechForm, seconds: float) -> int | None:
        """AR: `tokens_per_second` per second of the longest piece sent, at least the card's 200,
        at most the server's limit (None for NAR, which has no budget)."""
        if form.variant != "ar":
            return None
        piece = min(seconds, self.client.max_audio_seconds("ar"))
        budget = max(CARD_MAX_NEW_TOKENS, ceil(self.settings.tokens_per_second * piece))
        limit = self.client.max_new_tokens_limit("ar")
        return min(budget, limit) if limit else budget

    # ---- requests ---------------------------------------------------------------------------

    def run(self, form: SpeechForm, audio: np.ndarray) -> Transcript:
        with self.model_errors(form):
            if form.task == "translate":
                if form.response_format in TIMED_FORMATS:
                    return self.translate_in_segments(form, audio)
                result = self.client.translate(audio, **self.translation_options(form, audio))
                return Transcript(form.task, form.target_language, result.audio_seconds, result.text)
            result = self.client.transcribe(
                audio, **self.transcription_options(form, audio), timestamps=form.needs_words
            )
        segments = segments_from_words(result.words)
        return Transcript(form.task, form.language, result.audio_seconds, result.text, segments, result.words)

    def transcription_options(self, form: SpeechForm, audio: np.ndarray) -> dict:
        options = dict(
            sample_rate=SAMPLE_RATE, language=form.language, decoding=form.decoding, punctuate=form.punctuate
        )
        if form.variant == "nar":
            return options | {"variant": "nar"}  # the client refuses punctuate and decoding modes for NAR
        seconds = audio.shape[0] / SAMPLE_RATE
        return options | dict(keywords=form.keywords, max_new_tokens=self.max_new_tokens(form, seconds))

    def translation_options(self, form: SpeechForm, audio: np.ndarray) -> dict:
        return dict(
            sample_rate=SAMPLE_RATE,
            language=form.language,
            target_language=form.target_language,
            punctuate=form.punctuate,
            decoding=form.decoding,
            max_new_tokens=self.max_new_tokens(form, audio.shape[0] / SAMPLE_RATE),
        )

    def translate_in_segments(self, form: SpeechForm, audio: np.ndarray) -> Transcript:
        """Pieces of at most TRANSLATION_SEGMENT_S cut at quiet points, translated one by one: one
        segment each, from where the previous one ends to the piece's end."""
        spans = split_points(audio, TRANSLATION_SEGMENT_S)
        options = self.translation_options(form, audio[: spans[0].end])
        items = self.client.translate_many(
            [audio[s.start : s.end] for s in spans], max_in_flight=self.settings.max_pieces_in_flight, **options
        )
        segments, previous_end = [], 0.0
        for span, item in zip(spans, items, strict=True):
            if item.error is not None:
                raise item.error
            start_s, end_s = span.seconds
            if item.result.text.strip():
                segments.append(
                    Segment(max(start_s, previous_end), end_s, item.result.text.strip(), item.result.token_ids)
                )
            previous_end = end_s
        text = " ".join(s.text for s in segments)
        return Transcript(form.task, form.target_language, audio.shape[0] / SAMPLE_RATE, text, tuple(segments))

    def stream(self, form: SpeechForm, audio: np.ndarray) -> Iterator[str]:
        """Server-sent events of the growing text. Options and audio are checked now, so that a bad
        request is an HTTP error; the NAR model has one pass, so one delta."""
        with self.model_errors(form):
            if form.variant == "nar":
                text = self.client.transcribe(audio, **self.transcription_options(form, audio)).text
                return iter([event(delta(text)), event(done(text))])
            if form.task == "translate":
                updates = self.client.translate_stream(audio, **self.translation_options(form, audio))
            else:
                updates = self.client.transcribe_stream(audio, **self.transcription_options(form, audio))
        return text_events(updates)


def text_events(updates: Iterator[StreamUpdate]) -> Iterator[str]:
    """transcript.text.delta events as the text grows, then transcript.text.done; an error after the
    response has started is an `error` event (OpenAI's SDK raises it)."""
    sent = ""
    try:
        for update in updates:
            # a partial text may end inside a character (U+FFFD) that the next update completes
            stable = update.text if update.final else update.text.rstrip("\ufffd")
            if stable.startswith(sent) and len(stable) > len(sent):
                yield event(delta(stable[len(sent) :]))
                sent = stable
            if update.final:
                yield event(done(update.text))
    except GraniteSpeechError as exc:
        error = from_client_error(exc)
        yield event({"type": "error", "error": {"message": error.message, "type": error.type, "code": error.code}})


def delta(text: str) -> dict:
    return {"type": "transcript.text.delta", "delta": text}


def done(text: str) -> dict:
    return {"type": "transcript.text.done", "text": text}


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


@contextmanager
def client_errors() -> Iterator[None]:
    try:
        yield
    except GraniteSpeechError as exc:
        raise from_client_error(exc) from exc
