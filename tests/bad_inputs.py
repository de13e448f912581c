"""Bad requests shared by the AR and NAR server tests: (audio, options, expected message part)."""

import numpy as np
from audio_samples import synthetic

GOOD = synthetic(1.3, 7)
BAD_REQUESTS = [
    (np.zeros(0, np.float32), {}, "AUDIO is empty"),
    (np.zeros(16_000, np.float32), {}, "silent"),
    (np.where(np.arange(16_000) == 5, np.nan, GOOD[:16_000]).astype(np.float32), {}, "NaN or infinite"),
    (np.where(np.arange(16_000) == 9, np.inf, GOOD[:16_000]).astype(np.float32), {}, "NaN or infinite"),
    (np.stack([GOOD, GOOD]), {}, "one item per request"),
    (GOOD.astype(np.float64), {}, "expects 'FP32'"),
    (GOOD * 32768, {}, "integer PCM"),
    (synthetic(41.0, 8), {}, "limit is 40.0 s"),
    (GOOD, {"SAMPLE_RATE": ("INT32", 8000)}, "resample to 16000 Hz"),
    (GOOD, {"TASK": ("BYTES", "summarize")}, "unknown TASK 'summarize'"),
    (GOOD, {"LANGUAGE": ("BYTES", "xx")}, "unsupported LANGUAGE 'xx'"),
    (GOOD, {"TASK": ("BYTES", "translate"), "TARGET_LANGUAGE": ("BYTES", "ko")}, "unsupported TARGET_LANGUAGE"),
    (GOOD, {"TASK": ("BYTES", "translate")}, "TARGET_LANGUAGE"),
    (GOOD, {"MAX_NEW_TOKENS": ("INT32", 0)}, "MAX_NEW_TOKENS must be in 1..256"),
    (GOOD, {"MAX_NEW_TOKENS": ("INT32", 100_000)}, "MAX_NEW_TOKENS must be in 1..256"),
]
