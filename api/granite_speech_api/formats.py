"""Response bodies: json, text, verbose_json, srt and vtt, and the segments they are made of.

Transcripts: segments are runs of aligned words. A segment ends after a word that ends a sentence,
before a pause of PAUSE_S or more, or before the word that would take it past MAX_SEGMENT_CHARS
(two subtitle lines) or MAX_SEGMENT_S. Translations have no word times (the text is in another
language than the audio): their segments are pieces of at most TRANSLATION_SEGMENT_S, cut at quiet
points and translated one by one (app.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import ceil

from granite_speech_client import Word
from starlette.responses import JSONResponse, PlainTextResponse, Response

PAUSE_S = 1.0  # a silence this long between two words starts a new segment
MAX_SEGMENT_S = 7.0  # a subtitle on screen at most this long
MAX_SEGMENT_CHARS = 84  # two subtitle lines of 42 characters
SENTENCE_ENDS = (".", "?", "!", "。", "？", "！")
TRANSLATION_SEGMENT_S = 15.0  # translations: longest piece translated alone, one segment each
LANGUAGE_NAMES = {
    "en": "english",
    "fr": "french",
    "de": "german",
    "es": "spanish",
    "pt": "portuguese",
    "ja": "japanese",
    "it": "italian",
    "zh": "chinese",
}


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Transcript:
    """What every response format is rendered from."""

    task: str  # transcribe | translate
    language: str  # code of the text's language
    duration_s: float  # of the audio
    text: str
    segments: tuple[Segment, ...] = ()
    words: tuple[Word, ...] = ()


def segments_from_words(words: Sequence[Word]) -> tuple[Segment, ...]:
    """Consecutive words grouped into subtitle-sized segments (see the module docstring)."""
    groups: list[list[Word]] = []
    for word in words:
        if not groups or starts_segment(groups[-1], word):
            groups.append([word])
        else:
            groups[-1].append(word)
    return tuple(
        Segment(group[0].start_s, group[-1].end_s, "".join(w.text for w in group).strip(), word_tokens(group))
        for group in groups
    )


def starts_segment(segment: list[Word], word: Word) -> bool:
    last = segment[-1]
    text = "".join(w.text for w in segment).strip()
    return (
        text.endswith(SENTENCE_ENDS)
        or word.start_s - last.end_s >= PAUSE_S
        or len(text) + len(word.text) > MAX_SEGMENT_CHARS
        or word.end_s - segment[0].start_s > MAX_SEGMENT_S
    )


def word_tokens(words: Sequence[Word]) -> tuple[int, ...]:
    return tuple(t for w in words for t in w.token_ids)


# ---- bodies -----------------------------------------------------------------------------------


def render(transcript: Transcript, response_format: str, granularities: Sequence[str]) -> Response:
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(transcript.segments))
    if response_format == "vtt":
        return PlainTextResponse(vtt(transcript.segments), media_type="text/vtt")
    usage = {"type": "duration", "seconds": ceil(transcript.duration_s)}
    if response_format == "json":
        return JSONResponse({"text": transcript.text, "usage": usage})
    return JSONResponse(verbose(transcript, granularities) | {"usage": usage})


def verbose(transcript: Transcript, granularities: Sequence[str]) -> dict:
    """OpenAI's verbose_json: segments carry id, start, end, text and tokens (Whisper's decoding
    statistics, seek, temperature, avg_logprob, compression_ratio and no_speech_prob, are not produced)."""
    body: dict = {
        "task": transcript.task,
        "language": LANGUAGE_NAMES[transcript.language],
        "duration": round(transcript.duration_s, 3),
        "text": transcript.text,
    }
    if "segment" in granularities:
        body["segments"] = [
            {"id": i, "start": ms(s.start_s), "end": ms(s.end_s), "text": s.text, "tokens": list(s.token_ids)}
            for i, s in enumerate(transcript.segments)
        ]
    if "word" in granularities:
        body["words"] = [{"word": w.text.strip(), "start": ms(w.start_s), "end": ms(w.end_s)} for w in transcript.words]
    return body


def ms(seconds: float) -> float:
    """Seconds rounded to the millisecond."""
    return round(seconds, 3)


def timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS<separator>mmm."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def cues(segments: Sequence[Segment], separator: str) -> list[str]:
    return [
        f"{timestamp(s.start_s, separator)} --> {timestamp(max(s.end_s, s.start_s + 0.001), separator)}\n{s.text}\n"
        for s in segments
        if s.text
    ]


def srt(segments: Sequence[Segment]) -> str:
    return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues(segments, ","), start=1))


def vtt(segments: Sequence[Segment]) -> str:
    return "\n".join(["WEBVTT\n", *cues(segments, ".")])
