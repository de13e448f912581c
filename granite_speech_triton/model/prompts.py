"""Request options and the instruction text of Granite Speech 4.1 2B (model card prompts).

One place validates task, languages, keywords and max_new_tokens, and builds the chat prompt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from .errors import RequestError

TASKS = ("transcribe", "translate")
ASR_LANGUAGES = ("en", "fr", "de", "es", "pt", "ja")
NAR_LANGUAGES = ("en", "fr", "de", "es", "pt")
# English -> these; every ASR language -> English.
TRANSLATION_TARGETS = ("en", "fr", "de", "es", "pt", "ja", "it", "zh")
LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "ja": "Japanese",
    "it": "Italian",
    "zh": "Chinese",
}
AUDIO_PLACEHOLDER = "<|audio|>"
ASR_INSTRUCTION = "can you transcribe the speech into a written format?"
PUNCTUATED_ASR_INSTRUCTION = "transcribe the speech with proper punctuation and capitalization."
KEYWORD_ASR_INSTRUCTION = "transcribe the speech to text. Keywords: {keywords}"
TRANSLATE_INSTRUCTION = "translate the speech to {language}."
PUNCTUATED_TRANSLATE_INSTRUCTION = "translate the speech to {language} with proper punctuation and capitalization."
DEFAULT_MAX_NEW_TOKENS = 200  # model card
MAX_KEYWORDS = 100
MAX_TIMEOUT_MS = 3_600_000  # one hour
DECODE_MODES = ("greedy", "beam", "cascade", "speculative")  # model/engine.py explains each
DRAFT_MODES = ("cascade", "speculative")  # they start from the encoder's CTC draft: a transcript
MAX_BEAMS = 4
DEFAULT_NUM_BEAMS = 2  # IBM's published cascade falls back to 2 beams
DEFAULT_CONFIDENCE = 0.4  # IBM's published cascade threshold


@dataclass(frozen=True)
class SpeechRequest:
    """What the caller asked for; `validate` raises RequestError naming the bad field.

    `silent` is not the caller's: the first pipeline step sets it when every audio sample is zero,
    and the steps that generate text answer such a request with an empty transcript at once.
    """

    task: str = "transcribe"
    language: str = "en"
    target_language: str = ""
    keywords: tuple[str, ...] = field(default_factory=tuple)
    punctuate: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    timeout_ms: int = 0  # 0: no deadline
    deadline: float = 0.0  # time.time() after which the decoder drops the request (set on arrival)
    silent: bool = False
    decode_mode: str = "greedy"
    num_beams: int = DEFAULT_NUM_BEAMS  # beam mode, and the cascade's fallback
    confidence: float = DEFAULT_CONFIDENCE  # cascade: the least probability of every draft token
    entropy_gate: float = 0.0  # cascade: a draft with CTC entropy at most this is taken unverified
    timestamps: bool = False  # the aligner step adds the words of the transcript with their times

    def started(self, now: float) -> SpeechRequest:
        """This request with its deadline fixed from `timeout_ms`, counted from `now`."""
        return replace(self, deadline=now + self.timeout_ms / 1000) if self.timeout_ms else self

    def validate(self, max_new_tokens_limit: int, languages: tuple[str, ...] = ASR_LANGUAGES) -> None:
        if self.task not in TASKS:
            raise RequestError(f"unknown TASK {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.language not in languages:
            raise RequestError(f"unsupported LANGUAGE {self.language!r}; expected one of {', '.join(languages)}")
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise RequestError(f"MAX_NEW_TOKENS must be in 1..{max_new_tokens_limit}, got {self.max_new_tokens}")
        if not 0 <= self.timeout_ms <= MAX_TIMEOUT_MS:
            raise RequestError(f"TIMEOUT_MS must be in 0..{MAX_TIMEOUT_MS} (0: none), got {self.timeout_ms}")
        if len(self.keywords) > MAX_KEYWORDS:
            raise RequestError(f"at most {MAX_KEYWORDS} KEYWORDS, got {len(self.keywords)}")
        if self.task == "translate":
            self._validate_translation()
        elif self.target_language:
            raise RequestError("TARGET_LANGUAGE is only valid with TASK 'translate'")
        self._validate_decoding()

    def _validate_decoding(self) -> None:
        if self.decode_mode not in DECODE_MODES:
            raise RequestError(f"unknown DECODE_MODE {self.decode_mode!r}; expected one of {', '.join(DECODE_MODES)}")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise RequestError(f"NUM_BEAMS must be in 1..{MAX_BEAMS}, got {self.num_beams}")
        if not 0.0 <= self.confidence <= 1.0:  # NaN fails too
            raise RequestError(f"CONFIDENCE must be in 0..1, got {self.confidence}")
        if not 0.0 <= self.entropy_gate < float("inf"):
            raise RequestError(f"ENTROPY_GATE must be a finite number >= 0, got {self.entropy_gate}")
        if self.decode_mode in DRAFT_MODES and self.task == "translate":
            raise RequestError(
                f"DECODE_MODE {self.decode_mode} needs TASK 'transcribe': its draft is a transcript, not a translation"
            )

    def _validate_translation(self) -> None:
        target = self.target_language
        if target not in TRANSLATION_TARGETS:
            raise RequestError(
                f"unsupported TARGET_LANGUAGE {target!r}; expected one of {', '.join(TRANSLATION_TARGETS)}"
            )
        if target == self.language:
            raise RequestError(f"TARGET_LANGUAGE equals LANGUAGE ({target!r}); use TASK 'transcribe'")
        if "en" not in (self.language, target):
            raise RequestError(f"translation {self.language}->{target} unsupported: one side must be English")
        if self.keywords:
            raise RequestError("KEYWORDS are only valid with TASK 'transcribe'")
        if self.timestamps:
            raise RequestError(
                "TIMESTAMPS are only valid with TASK 'transcribe': a translation is not aligned with the audio"
            )

    def to_json(self) -> str:
        """Canonical JSON, as passed between pipeline steps."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpeechRequest:
        try:
            values = json.loads(text)
            values["keywords"] = tuple(values.get("keywords", ()))
            return cls(**values)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"OPTIONS is not a valid options object: {exc}") from exc

    def instruction(self) -> str:
        """The model-card instruction for this request."""
        if self.task == "translate":
            template = PUNCTUATED_TRANSLATE_INSTRUCTION if self.punctuate else TRANSLATE_INSTRUCTION
            return template.format(language=LANGUAGE_NAMES[self.target_language])
        if self.keywords:
            return KEYWORD_ASR_INSTRUCTION.format(keywords=", ".join(self.keywords))
        return PUNCTUATED_ASR_INSTRUCTION if self.punctuate else ASR_INSTRUCTION


def parse_keywords(text: str) -> tuple[str, ...]:
    """'kw1, kw2,kw3' -> ('kw1', 'kw2', 'kw3'); empty entries dropped."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def check_plain_text(tokenizer, instruction: str) -> None:
    """RequestError if the request's text would be read as one of the tokenizer's special or added
    tokens (`<|audio|>`, `<|end_of_text|>`, role markers...): request text is never a control token.

    The instruction is fixed model-card text around the caller's KEYWORDS, so only they can
    bring one in; tokenizing the instruction alone finds any, whatever the tokenizer's list.
    """
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    found = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in added})
    if found:
        raise RequestError(f"KEYWORDS may not contain the model's special tokens, found: {', '.join(found)}")


def build_prompt_ids(tokenizer, request: SpeechRequest, num_audio_tokens: int) -> list[int]:
    """Token ids of the chat prompt with the audio placeholder expanded to `num_audio_tokens`.

    The checkpoint's own chat template renders the user turn, so the prompt is exactly the one
    the model was trained with (`USER: <|audio|>{instruction}\\n ASSISTANT:` for 4.1-2b).
    RequestError if the request's text holds a special token (`check_plain_text`).
    """
    check_plain_text(tokenizer, request.instruction())
    chat = [{"role": "user", "content": AUDIO_PLACEHOLDER + request.instruction()}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = text.replace(AUDIO_PLACEHOLDER, AUDIO_PLACEHOLDER * num_audio_tokens)
    return tokenizer(text)["input_ids"]
