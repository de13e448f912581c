"""OpenAI-compatible speech API in front of Granite Speech served on Triton.

granite-speech-api --set triton_url=127.0.0.1:8001      # serves http://127.0.0.1:8080/v1/audio/...
"""

from .app import create_app
from .settings import ApiSettings

__all__ = ["ApiSettings", "create_app"]
