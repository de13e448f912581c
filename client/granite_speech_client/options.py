"""Request options and their client-side validation.

The lists below are a deliberate copy of `granite_speech_triton/model/prompts.py` (the server
package): the client must not import the server package (it needs torch). Keep them in step;
the server validates again and its message is passed through if they ever drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequestError

VARIANTS = ("ar", "nar")
TASKS = ("transcribe", "translate")
ASR_LANGUAGES = ("en", "fr", "de", "es", "pt", "ja")  # AR model
NAR_LANGUAGES = ("en", "fr", "de", "es", "pt")  # NAR model
TRANSLATION_TARGETS = ("en", "fr", "de", "es", "pt", "ja", "it", "zh")  # one side must be English
MAX_KEYWORDS = 100
MAX_TIMEOUT_MS = 3_600_000  # the server's bound on TIMEOUT_MS
DECODE_MODES = ("greedy", "beam", "cascade", "speculative")
DRAFT_MODES = ("cascade", "speculative")  # they need a transcript draft: transcription only
MAX_BEAMS = 4
ENSEMBLES = {"ar": "granite_speech", "nar": "granite_speech_nar"}
FEATURE_EXTRACTORS = {"ar": "ar_feature_extractor", "nar": "nar_feature_extractor"}


@dataclass(frozen=True)
class Decoding:
    """How the AR model decodes (the server's README compares the modes).

    greedy: exact vs transformers; beam: `num_beams` (1..4) beam search; cascade: IBM's published
    setup, the CTC draft if every token's probability is at least `confidence`, else beam search
    (`num_beams`); speculative: exactly greedy's output, the CTC draft verified in one pass.
    None leaves a number at the server's default (2 beams, confidence 0.4, entropy gate 0: off).
    """

    mode: str = "greedy"
    num_beams: int | None = None
    confidence: float | None = None
    entropy_gate: float | None = None

    def validate(self, options: RequestOptions) -> None:
        if self.mode not in DECODE_MODES:
            raise InvalidRequestError(f"unknown decode mode {self.mode!r}; expected one of {', '.join(DECODE_MODES)}")
        if self.mode != "greedy" and options.variant == "nar":
            raise InvalidRequestError("decode modes other than greedy are only supported by variant 'ar'")
        if self.mode in DRAFT_MODES and options.task == "translate":
            raise InvalidRequestError(f"decode mode {self.mode} drafts a transcript: it cannot translate")
        if self.num_beams is not None and not 1 <= self.num_beams <= MAX_BEAMS:
            raise InvalidRequestError(f"num_beams must be in 1..{MAX_BEAMS}, got {self.num_beams}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise InvalidRequestError(f"confidence must be in 0..1, got {self.confidence}")
        if self.entropy_gate is not None and not 0.0 <= self.entropy_gate < float("inf"):
            raise InvalidRequestError(f"entropy_gate must be a finite number >= 0, got {self.entropy_gate}")


def as_decoding(decoding: Decoding | str | None) -> Decoding:
    """None -> greedy; a mode name -> that mode with the server's defaults."""
    if decoding is None:
        return Decoding()
    return Decoding(decoding) if isinstance(decoding, str) else decoding


@dataclass(frozen=True)
class RequestOptions:
    """What one request asks for; `validate` raises InvalidRequestError naming the bad option."""

    variant: str = "ar"
    task: str = "transcribe"
    language: str = "en"
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    punctuate: bool = False
    max_new_tokens: int | None = None
    decoding: Decoding = Decoding()
    timestamps: bool = False  # transcription only: the words with their start and end times

    def validate(self) -> RequestOptions:
        if self.variant not in VARIANTS:
            raise InvalidRequestError(f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.task not in TASKS:
            raise InvalidRequestError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        languages = ASR_LANGUAGES if self.variant == "ar" else NAR_LANGUAGES
        if self.language not in languages:
            raise InvalidRequestError(
                f"unsupported language {self.language!r} for variant {self.variant}; "
                f"expected one of {', '.join(languages)}"
            )
        if self.variant == "nar":
            self._validate_nar()
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if len(self.keywords) > MAX_KEYWORDS:
            raise InvalidRequestError(f"at most {MAX_KEYWORDS} keywords, got {len(self.keywords)}")
        if self.task == "translate":
            self._validate_translation()
        self.decoding.validate(self)
        return self

    def _validate_nar(self) -> None:
        ar_only = {
            "task 'translate'": self.task == "translate",
            "keywords": bool(self.keywords),
            "punctuate": self.punctuate,
            "max_new_tokens": self.max_new_tokens is not None,
        }
        used = [name for name, is_set in ar_only.items() if is_set]
        if used:
            raise InvalidRequestError(
                f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} only supported by variant 'ar' "
                "(the NAR model transcribes only)"
            )

    def _validate_translation(self) -> None:
        target = self.target_language
        if target not in TRANSLATION_TARGETS:
            raise InvalidRequestError(
                f"unsupported target language {target!r}; expected one of {', '.join(TRANSLATION_TARGETS)}"
            )
        if target == self.language:
            raise InvalidRequestError(f"target language equals the source language ({target!r}); use transcribe")
        if "en" not in (self.language, target):
            raise InvalidRequestError(f"translation {self.language}->{target} unsupported: one side must be English")
        if self.keywords:
            raise InvalidRequestError("keywords are only valid when transcribing")
        if self.timestamps:
            raise InvalidRequestError("timestamps are only valid when transcribing: a translation is not aligned")


def parse_keywords(keywords: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'kw1, kw2' or ['kw1', 'kw2'] -> ('kw1', 'kw2'); empty entries dropped, commas not allowed inside one."""
    if keywords is None:
        return ()
    items = keywords.split(",") if isinstance(keywords, str) else list(keywords)
    cleaned = tuple(k.strip() for k in items if k.strip())
    if any("," in k for k in cleaned):
        raise InvalidRequestError("a keyword may not contain a comma (the server splits KEYWORDS on commas)")
    return cleaned
