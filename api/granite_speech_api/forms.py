"""The multipart form of /v1/audio/transcriptions and /v1/audio/translations, checked field by field.

OpenAI's fields: file, model, language, prompt (here: comma-separated keywords that bias the AR
transcription), response_format, timestamp_granularities[], temperature (0 only), stream.
Extensions: keywords[] (the same as prompt, one per field), punctuate (AR: punctuated, truecased
text), decoding (AR: greedy, beam, cascade, speculative), to_language (translations: the target,
default en). Other fields are ignored, as OpenAI's API ignores what a model does not use.
"""

from __future__ import annotations

from dataclasses import dataclass

from granite_speech_client import ASR_LANGUAGES, NAR_LANGUAGES, TRANSLATION_TARGETS, InvalidRequestError
from granite_speech_client.options import parse_keywords
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from .errors import ApiError, invalid

MODELS = {"granite-speech-4.1-2b": "ar", "granite-speech-4.1-2b-nar": "nar"}  # OpenAI model id -> variant
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TIMED_FORMATS = ("verbose_json", "srt", "vtt")
GRANULARITIES = ("word", "segment")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
MAX_FIELDS = 200


@dataclass(frozen=True)
class SpeechForm:
    task: str  # transcribe | translate
    model: str
    variant: str  # ar | nar
    upload: UploadFile
    language: str
    target_language: str | None  # translations
    keywords: tuple[str, ...]
    response_format: str
    granularities: tuple[str, ...]  # verbose_json: what it lists (default: segments)
    stream: bool
    punctuate: bool
    decoding: str | None

    @property
    def needs_words(self) -> bool:
        """Transcripts rendered with times need the aligned words (segments are made of them)."""
        return self.task == "transcribe" and self.response_format in TIMED_FORMATS


async def read_form(request: Request, task: str) -> SpeechForm:
    form = await request.form(max_files=1, max_fields=MAX_FIELDS)
    model = text(form, "model")
    if not model:
        raise invalid("you must provide a model: " + " or ".join(MODELS), "model")
    if model not in MODELS:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {', '.join(MODELS)}", "model",
                       "model_not_found")  # fmt: skip
    variant = MODELS[model]
    response_format = text(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
    check_temperature(text(form, "temperature"))
    language, target = languages(form, task, variant)
    stream = flag(form, "stream")
    if stream and response_format in TIMED_FORMATS:
        raise invalid(f"stream gives text only: use response_format json or text, not {response_format}", "stream")
    return SpeechForm(
        task=task,
        model=model,
        variant=variant,
        upload=upload(form),
        language=language,
        target_language=target,
        keywords=keywords(form, task, variant),
        response_format=response_format,
        granularities=granularities(form, task, response_format),
        stream=stream,
        punctuate=flag(form, "punctuate"),
        decoding=text(form, "decoding") or None,
    )


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise invalid(f"{name} must be a text field, not a file", name)
    return (value or "").strip()


def texts(form: FormData, *names: str) -> list[str]:
    values = [v for name in names for v in form.getlist(name)]
    if any(isinstance(v, UploadFile) for v in values):
        raise invalid(f"{names[0]} must be text fields, not files", names[0])
    return [v.strip() for v in values if v.strip()]


def flag(form: FormData, name: str) -> bool:
    value = text(form, name).lower()
    if value not in TRUE + FALSE:
        raise invalid(f"{name} must be true or false, got {value!r}", name)
    return value in TRUE


def upload(form: FormData) -> UploadFile:
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise invalid("you must upload the audio as the multipart/form-data file field 'file'", "file")
    return file


def check_temperature(value: str) -> None:
    try:
        temperature = float(value or 0)
    except ValueError:
        raise invalid(f"temperature must be a number, got {value!r}", "temperature") from None
    if temperature != 0:
        raise invalid(
            f"temperature must be 0, got {temperature:g}: Granite Speech decodes deterministically (greedy, beam "
            "or CTC-draft modes) and does not sample",
            "temperature",
        )


def languages(form: FormData, task: str, variant: str) -> tuple[str, str | None]:
    """(source language, target language or None); the source defaults to English, except that a
    translation into English must name it."""
    language = text(form, "language")
    accepted = ASR_LANGUAGES if variant == "ar" else NAR_LANGUAGES
    if language and language not in accepted:
        raise invalid(f"language {language!r} is not supported by this model; use one of {', '.join(accepted)}",
                      "language")  # fmt: skip
    if task == "transcribe":
        return language or "en", None
    if variant != "ar":
        raise invalid("granite-speech-4.1-2b-nar only transcribes: translate with granite-speech-4.1-2b", "model")
    target = text(form, "to_language") or "en"
    if target not in TRANSLATION_TARGETS:
        raise invalid(f"to_language must be one of {', '.join(TRANSLATION_TARGETS)}", "to_language")
    if target == "en" and language in ("", "en"):
        raise invalid(
            "translations into English need the spoken language: language one of "
            f"{', '.join(lang for lang in ASR_LANGUAGES if lang != 'en')} (English speech: use transcriptions)",
            "language",
        )
    return language or "en", target


def keywords(form: FormData, task: str, variant: str) -> tuple[str, ...]:
    """The prompt, split on commas, and keywords[] fields."""
    try:
        found = parse_keywords(text(form, "prompt")) + parse_keywords(texts(form, "keywords[]", "keywords"))
    except InvalidRequestError as exc:
        raise invalid(str(exc), "keywords") from exc
    if found and (task != "transcribe" or variant != "ar"):
        raise invalid("prompt (keywords) only biases transcriptions of granite-speech-4.1-2b", "prompt")
    return found


def granularities(form: FormData, task: str, response_format: str) -> tuple[str, ...]:
    asked = texts(form, "timestamp_granularities[]", "timestamp_granularities")
    if any(g not in GRANULARITIES for g in asked):
        raise invalid(f"timestamp_granularities must be {' and/or '.join(GRANULARITIES)}", "timestamp_granularities")
    if asked and response_format != "verbose_json":
        raise invalid("timestamp_granularities need response_format verbose_json", "timestamp_granularities")
    if "word" in asked and task != "transcribe":
        raise invalid("word timestamps are only available for transcriptions", "timestamp_granularities")
    return tuple(dict.fromkeys(asked)) or ("segment",)
