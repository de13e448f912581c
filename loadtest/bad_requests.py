"""Bad requests for the load test's mix (`--bad-every N`): each must get INVALID_ARG naming its problem.

They are sent as raw tensors, past the client's own checks, so that the server sees them. A bad
request answered any other way (served, another error, another message) is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from granite_speech_client import SAMPLE_RATE, GraniteSpeechError, ServerRejectedError
from granite_speech_client.options import ENSEMBLES
from granite_speech_client.transport import Transport

INVALID_STATUSES = ("StatusCode.INVALID_ARGUMENT", "400")
TONE_SECONDS = 1.0
TONE_HZ = 300.0


@dataclass(frozen=True)
class BadRequest:
    name: str
    variant: str  # the ensemble it is sent to
    inputs: dict[str, np.ndarray]
    expected: str  # part of the server's message


def tone() -> np.ndarray:
    """[1, samples]: one second of a quiet tone (valid audio)."""
    t = np.arange(int(TONE_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.1 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)[None]


def option(value: object, dtype: type = np.object_) -> np.ndarray:
    """A [1, 1] option tensor."""
    return np.array([[value]], dtype=dtype)


def catalog() -> list[BadRequest]:
    audio = tone()
    nan = audio.copy()
    nan[0, 100] = np.nan
    requests = []
    for variant in ("ar", "nar"):
        requests += [
            BadRequest("nan_audio", variant, {"AUDIO": nan}, "NaN or infinite"),
            BadRequest("integer_pcm", variant, {"AUDIO": audio * 32768}, "integer PCM"),
            BadRequest("too_short", variant, {"AUDIO": audio[:, :100]}, "too short"),
            BadRequest("sample_rate", variant, {"AUDIO": audio, "SAMPLE_RATE": option(8000, np.int32)}, "16000 Hz"),
            BadRequest("language", variant, {"AUDIO": audio, "LANGUAGE": option(b"xx")}, "unsupported LANGUAGE"),
            BadRequest("not_utf8", variant, {"AUDIO": audio, "LANGUAGE": option(b"e\xe9n")}, "not valid UTF-8"),
        ]
    requests += [
        BadRequest("max_new_tokens", "ar", {"AUDIO": audio, "MAX_NEW_TOKENS": option(0, np.int32)}, "MAX_NEW_TOKENS"),
        BadRequest("special_token", "ar", {"AUDIO": audio, "KEYWORDS": option(b"granite,<|audio|>")}, "special tokens"),
    ]
    return requests


def check(transport: Transport, bad: BadRequest) -> None:
    """Send `bad`; return if it got INVALID_ARG with its own message, raise AssertionError otherwise."""
    try:
        transport.infer(ENSEMBLES[bad.variant], bad.inputs, ("TEXT", "TOKEN_IDS"))
    except ServerRejectedError as exc:
        if exc.status not in INVALID_STATUSES or bad.expected not in exc.server_message:
            raise AssertionError(f"{bad.name}: {exc.status} {exc.server_message!r}") from exc
        return
    except GraniteSpeechError as exc:
        raise AssertionError(f"{bad.name}: {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{bad.name} was served ({transport.settings.url})")
