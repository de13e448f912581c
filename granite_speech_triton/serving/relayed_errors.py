"""Which Triton error code an error relayed over BLS should carry (pure; no Triton import).

Triton 2.51 hands a BLS caller every error as INTERNAL, whatever code the called model or Triton
itself set. Two kinds of error must keep their code on the way back to the client:
- the decoding engine's own errors, which name their code at the start of the message
  ("[CANCELLED] ..."; see `bls.tagged_error`);
- Triton's queue-policy rejections at the called model (its `max_queue_size` or queue timeout),
  which are UNAVAILABLE: the client retries those as overload, and must not see INTERNAL.
"""

from __future__ import annotations

import re

CODE_TAG = re.compile(r"^\[(INVALID_ARG|CANCELLED|UNAVAILABLE|INTERNAL)\] ")
# Triton's messages when a model's queue policy rejects a request. The decoding engine's own queue
# opens its rejections with the same words, so that clients recognise every overload alike.
QUEUE_FULL = "Exceeds maximum queue size"
QUEUE_TIMEOUT = "Request timeout expired"
QUEUE_REJECTIONS = (QUEUE_FULL, QUEUE_TIMEOUT)


def relayed_code(message: str) -> tuple[str, str | None]:
    """(message without its code tag, the code's name) for a relayed error message.

    The name is None when the message carries no code of its own: keep the code Triton gave.
    """
    match = CODE_TAG.match(message)
    if match:
        return message[match.end() :], match.group(1)
    if any(rejection in message for rejection in QUEUE_REJECTIONS):
        return message, "UNAVAILABLE"
    return message, None
