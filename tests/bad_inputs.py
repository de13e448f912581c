"""Bad requests shared by the AR and NAR server tests: (audio, options, expected message part).

Each message part names the request's own problem, so a test can tell that every bad request got
its own error and not a batch-mate's. Digital silence is not here: it is a valid request with an empty transcript.
"""

import numpy as np
from audio_samples import synthetic

GOOD = synthetic(1.3, 7)
BAD_REQUESTS = [
    (np.zeros(0, np.float32), {}, "AUDIO is empty"),
    (np.where(np.arange(16_000) == 5, np.nan, GOOD[:16_000]).astype(np.float32), {}, "NaN or infinite"),
    (np.where(np.arange(16_000) == 9, np.inf, GOOD[:16_000]).astype(np.float32), {}, "NaN or infinite"),
    (np.stack([GOOD, GOOD]), {}, "one item per request"),
    (GOOD.astype(np.float64), {}, "expects 'FP32'"),
    (GOOD * 32768, {}, "integer PCM"),
    (synthetic(41.0, 8), {}, "limit is 40.0 s"),
    (GOOD, {"SAMPLE_RATE": ("INT32", 8000)}, "resample to 16000 Hz"),
    (GOOD, {"TASK": ("BYTES", "summarize")}, "unknown TASK 'summarize'"),
    (GOOD, {"LANGUAGE": ("BYTES", "xx")}, "unsupported LANGUAGE 'xx'"),
    (GOOD, {"TASK": ("BYTES", "translate"), "TARGET_LANGUAGE": ("BYTES", "ko")}, "unsupported TARGET_LANGUAGE 'ko'"),
    (GOOD, {"TASK": ("BYTES", "translate")}, "unsupported TARGET_LANGUAGE ''"),
    (GOOD, {"MAX_NEW_TOKENS": ("INT32", 0)}, "MAX_NEW_TOKENS must be in 1..256, got 0"),
    (GOOD, {"MAX_NEW_TOKENS": ("INT32", 100_000)}, "MAX_NEW_TOKENS must be in 1..256, got 100000"),
]

# Content that once escaped as INTERNAL and failed batch-mates too: bytes that are not UTF-8 in a
# BYTES option, and request text holding the tokenizer's special tokens (AR keywords).
NOT_UTF8 = [
    (GOOD, {"LANGUAGE": ("BYTES", b"e\xe9n")}, "LANGUAGE is not valid UTF-8"),
]
AR_ONLY_BAD = [
    (GOOD, {"KEYWORDS": ("BYTES", b"caf\xe9")}, "KEYWORDS is not valid UTF-8"),
    (GOOD, {"TASK": ("BYTES", b"\xfftranscribe")}, "TASK is not valid UTF-8"),
    (GOOD, {"TASK": ("BYTES", "translate"), "TARGET_LANGUAGE": ("BYTES", b"\xc3")}, "TARGET_LANGUAGE is not valid"),
    (GOOD, {"KEYWORDS": ("BYTES", "Granite, <|audio|>")}, "special tokens, found: <|audio|>"),
    (GOOD, {"KEYWORDS": ("BYTES", "stop<|end_of_text|>")}, "special tokens, found: <|end_of_text|>"),
]
