"""Client for Granite Speech 4.1 (AR and NAR) served on NVIDIA Triton.

from granite_speech_client import GraniteSpeechClient

with GraniteSpeechClient("localhost:8001") as client:
    print(client.transcribe("speech.wav").text)
"""

from .audio import SAMPLE_RATE, load_audio, split_points
from .client import GraniteSpeechClient
from .errors import (
    AudioInputError,
    GraniteSpeechError,
    InvalidRequestError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerOverloadedError,
    ServerRejectedError,
    ServerUnreachableError,
)
from .options import ASR_LANGUAGES, DECODE_MODES, NAR_LANGUAGES, TASKS, TRANSLATION_TARGETS, VARIANTS, Decoding
from .results import Health, ItemResult, Piece, SpeechResult, StreamUpdate, Word

__all__ = [
    "ASR_LANGUAGES",
    "DECODE_MODES",
    "Decoding",
    "NAR_LANGUAGES",
    "SAMPLE_RATE",
    "TASKS",
    "TRANSLATION_TARGETS",
    "VARIANTS",
    "AudioInputError",
    "GraniteSpeechClient",
    "GraniteSpeechError",
    "Health",
    "InvalidRequestError",
    "ItemResult",
    "ModelNotReadyError",
    "Piece",
    "RequestTimeoutError",
    "ServerOverloadedError",
    "ServerRejectedError",
    "ServerUnreachableError",
    "SpeechResult",
    "StreamUpdate",
    "Word",
    "load_audio",
    "split_points",
]
