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
ENSEMBLES = {"ar": "granite_speech", "nar": "granite_speech_nar"}
FEATURE_EXTRACTORS = {"ar": "ar_feature_extractor", "nar": "nar_feature_extractor"}


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


def parse_keywords(keywords: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'kw1, kw2' or ['kw1', 'kw2'] -> ('kw1', 'kw2'); empty entries dropped, commas not allowed inside one."""
    if keywords is None:
        return ()
    items = keywords.split(",") if isinstance(keywords, str) else list(keywords)
    cleaned = tuple(k.strip() for k in items if k.strip())
    if any("," in k for k in cleaned):
        raise InvalidRequestError("a keyword may not contain a comma (the server splits KEYWORDS on commas)")
    return cleaned
