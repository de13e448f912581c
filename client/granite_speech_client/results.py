"""Typed, immutable results returned by GraniteSpeechClient."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import GraniteSpeechError


@dataclass(frozen=True)
class Word:
    """One word of a transcript and where it is in the audio (`timestamps=True`).

    Times come from CTC forced alignment on the encoder's 80 ms frames (server README).
    """

    text: str  # as in the transcript, leading space included: a piece's words joined are its text
    start_s: float  # from the start of the whole audio
    end_s: float
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One request of a split (long) file."""

    start_s: float  # where the piece starts in the 16 kHz audio
    end_s: float
    text: str
    token_ids: tuple[int, ...]
    latency_s: float
    skipped: bool = False  # digital silence: not sent (the server would answer empty text)
    words: tuple[Word, ...] = ()  # with timestamps: the piece's words, times from the start of the audio


@dataclass(frozen=True)
class SpeechResult:
    """A transcript or translation of one audio input."""

    text: str
    token_ids: tuple[int, ...]  # of every piece, in order
    variant: str  # ar | nar
    task: str  # transcribe | translate
    audio_seconds: float  # length of the 16 kHz mono audio
    latency_s: float  # wall time of the request(s), decoding and splitting excluded
    pieces: tuple[Piece, ...] = ()  # empty unless the audio was longer than the server's limit
    words: tuple[Word, ...] = ()  # with timestamps: every word, each piece's overlap with the previous dropped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StreamUpdate:
    """What a streaming request has produced so far (`transcribe_stream`, `translate_stream`)."""

    text: str  # the whole text so far (earlier pieces of a split file included)
    token_ids: tuple[int, ...]
    final: bool  # the last update: the complete result

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item of `transcribe_many` / `translate_many`: a result or an error."""

    index: int  # position in the input
    source: str  # the file path, or "<bytes #i>" / "<array #i>"
    result: SpeechResult | None = None
    error: GraniteSpeechError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the result's fields, or error, error_type and exit_code."""
        if self.result is not None:
            return {"file": self.source, "ok": True, **self.result.to_dict()}
        assert self.error is not None
        return {
            "file": self.source,
            "ok": False,
            "error": str(self.error),
            "error_type": type(self.error).__name__,
            "exit_code": self.error.exit_code,
        }


@dataclass(frozen=True)
class Health:
    """What `GraniteSpeechClient.health` found."""

    live: bool
    ready: bool
    ensembles: dict[str, bool]  # ensemble name -> ready

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PipelineCheck:
    """One pipeline in a deep health check: ready, and whether a tiny real request got through."""

    ready: bool
    seconds: float | None = None  # the request's latency when it was answered
    busy: bool = False  # answered UNAVAILABLE (queue full): alive, overloaded
    error: str = ""  # why the request failed

    @property
    def ok(self) -> bool:
        return self.ready and not self.error

    def describe(self) -> str:
        if not self.ready:
            return "not ready"
        if self.error:
            return f"ready, request FAILED: {self.error}"
        if self.busy:
            return "ready, busy (the request was refused as overload)"
        return f"ready, answered in {self.seconds:.2f} s"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}
