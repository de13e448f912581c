"""The transformers reference, shared by the tests (one instance per checkpoint)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from granite_speech_triton.reference import TransformersReference

# The model card's instructions, written out here independently of prompts.py.
CARD_INSTRUCTIONS = {
    "asr": "can you transcribe the speech into a written format?",
    "asr_punct": "transcribe the speech with proper punctuation and capitalization.",
    "translate_fr": "translate the speech to French.",
    "translate_en_punct": "translate the speech to English with proper punctuation and capitalization.",
}


@lru_cache(maxsize=2)
def reference_for(checkpoint: Path) -> TransformersReference:
    return TransformersReference(checkpoint)


def load_reference(checkpoint: Path):
    """(transformers model, tokenizer) of the cached reference."""
    reference = reference_for(checkpoint)
    return reference.model, reference.tokenizer


def reference_generate(checkpoint: Path, audio: np.ndarray, instruction: str, max_new_tokens: int) -> list[int]:
    """New token ids of greedy `generate` for one audio."""
    return reference_for(checkpoint).generate(audio, instruction, max_new_tokens)
