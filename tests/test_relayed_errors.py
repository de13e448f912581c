"""The code an error keeps when it comes back over BLS (Triton 2.51 makes every such error INTERNAL)."""

import pytest

from granite_speech_triton.serving.relayed_errors import relayed_code

BLS_PREFIX = "Model ar_llm_engine - Error when running inference: [request id: <id_unknown>] "


@pytest.mark.parametrize("code", ["INVALID_ARG", "CANCELLED", "UNAVAILABLE", "INTERNAL"])
def test_the_engine_s_tag_gives_the_code_and_is_dropped(code):
    assert relayed_code(f"[{code}] request cancelled by the client") == ("request cancelled by the client", code)


@pytest.mark.parametrize("rejection", ["Exceeds maximum queue size", "Request timeout expired"])
def test_a_queue_rejection_at_the_called_model_stays_unavailable(rejection):
    # What the Python backend reports when Triton's queue policy at the engine rejects a BLS request.
    message = BLS_PREFIX + rejection
    assert relayed_code(message) == (message, "UNAVAILABLE")


@pytest.mark.parametrize("message", ["internal error: RuntimeError: boom", "bad [UNAVAILABLE] tag mid-message"])
def test_other_errors_keep_triton_s_code(message):
    assert relayed_code(message) == (message, None)
