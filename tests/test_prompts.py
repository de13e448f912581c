"""Request options: validation messages and the model card's instructions."""

import re

import pytest

from granite_speech_triton.model.decoder import load_tokenizer
from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.prompts import NAR_LANGUAGES, SpeechRequest, build_prompt_ids, parse_keywords

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


def test_silent_flag_round_trips_and_defaults_off():
    assert SpeechRequest.from_json("{}").silent is False
    silent = SpeechRequest(task="translate", target_language="fr", silent=True)
    assert SpeechRequest.from_json(silent.to_json()) == silent


@pytest.mark.parametrize(
    ("keywords", "found"),
    [
        (("<|audio|>",), "<|audio|>"),
        (("Granite", "stop<|end_of_text|>now"), "<|end_of_text|>"),
        (("<|pad|><|audio|>",), "<|audio|>, <|pad|>"),
    ],
)
def test_request_text_never_becomes_a_special_token(tiny_ar_checkpoint, keywords, found):
    tokenizer = load_tokenizer(tiny_ar_checkpoint)
    with pytest.raises(
        RequestError, match=re.escape(f"KEYWORDS may not contain the model's special tokens, found: {found}")
    ):
        build_prompt_ids(tokenizer, SpeechRequest(keywords=keywords), 3)


def test_text_near_special_tokens_is_plain_text(tiny_ar_checkpoint):
    """Look-alikes are ordinary text: the prompt holds exactly its audio placeholders as special tokens."""
    tokenizer = load_tokenizer(tiny_ar_checkpoint)
    audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
    for keyword in ("< |audio|>", "<|audio", "|end_of_text|>", "Granite"):
        ids = build_prompt_ids(tokenizer, SpeechRequest(keywords=(keyword,)), 3)
        assert ids.count(audio_id) == 3
        assert set(ids) & set(tokenizer.all_special_ids) == {audio_id}, keyword
