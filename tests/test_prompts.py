"""Request options: validation messages and the model card's instructions."""

import pytest

from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.prompts import NAR_LANGUAGES, SpeechRequest, parse_keywords

LIMIT = 256


@pytest.mark.parametrize(
    ("request_", "instruction"),
    [
        (SpeechRequest(), "can you transcribe the speech into a written format?"),
        (SpeechRequest(language="ja"), "can you transcribe the speech into a written format?"),
        (SpeechRequest(punctuate=True), "transcribe the speech with proper punctuation and capitalization."),
        (SpeechRequest(keywords=("IBM", "Triton")), "transcribe the speech to text. Keywords: IBM, Triton"),
        (SpeechRequest(task="translate", target_language="de"), "translate the speech to German."),
        (
            SpeechRequest(task="translate", language="fr", target_language="en", punctuate=True),
            "translate the speech to English with proper punctuation and capitalization.",
        ),
    ],
)
def test_instructions_follow_the_model_card(request_: SpeechRequest, instruction: str):
    request_.validate(LIMIT)
    assert request_.instruction() == instruction


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (SpeechRequest(task="summarize"), "unknown TASK 'summarize'"),
        (SpeechRequest(language="ko"), "unsupported LANGUAGE 'ko'"),
        (SpeechRequest(max_new_tokens=0), "MAX_NEW_TOKENS must be in 1..256"),
        (SpeechRequest(max_new_tokens=257), "MAX_NEW_TOKENS must be in 1..256"),
        (SpeechRequest(task="translate"), "unsupported TARGET_LANGUAGE ''"),
        (SpeechRequest(task="translate", target_language="en"), "equals LANGUAGE"),
        (SpeechRequest(task="translate", language="fr", target_language="de"), "one side must be English"),
        (SpeechRequest(task="translate", target_language="fr", keywords=("x",)), "KEYWORDS are only valid"),
        (SpeechRequest(target_language="fr"), "only valid with TASK 'translate'"),
        (SpeechRequest(keywords=tuple(str(i) for i in range(101))), "at most 100 KEYWORDS"),
    ],
)
def test_invalid_options_are_named(request_: SpeechRequest, message: str):
    with pytest.raises(RequestError, match=message):
        request_.validate(LIMIT)


def test_nar_languages_exclude_japanese():
    with pytest.raises(RequestError, match="'ja'"):
        SpeechRequest(language="ja").validate(LIMIT, NAR_LANGUAGES)


def test_keywords_parse_and_options_round_trip_through_json():
    request = SpeechRequest(keywords=parse_keywords(" IBM, ,Triton ,"), punctuate=True, max_new_tokens=9)
    assert request.keywords == ("IBM", "Triton")
    assert SpeechRequest.from_json(request.to_json()) == request
    with pytest.raises(RequestError, match="OPTIONS"):
        SpeechRequest.from_json('{"task": "transcribe", "colour": "red"}')
