"""The API's settings: one dataclass, set by `--set key=value` or environment variables GSA_<KEY>."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

ENV_PREFIX = "GSA_"
PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class ApiSettings:
    """Every knob of the API service."""

    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC (or HTTP, see protocol) address
    protocol: str = "grpc"  # grpc | http, to Triton
    host: str = "127.0.0.1"  # where the API listens (0.0.0.0: every interface)
    port: int = 8080
    max_upload_mb: float = 200.0  # larger request bodies are refused with 413
    max_audio_s: float = 4 * 3600.0  # longer audio (from the file's header) is refused with 400
    tokens_per_second: float = 8.0  # AR budget of new tokens per second of audio (at least the card's 200)
    request_timeout_s: float = 600.0  # per request to Triton (a long file is several requests)
    max_pieces_in_flight: int = 4  # requests to Triton at a time for one long file
    # SIGTERM: no new connections; requests in flight get this long to finish, then are cancelled.
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        positive = ("port", "max_upload_mb", "max_audio_s", "tokens_per_second", "request_timeout_s")
        for name in (*positive, "max_pieces_in_flight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be 0 (no drain) or positive, got {self.drain_timeout_s}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> ApiSettings:
        """Build from key=value strings; unknown keys are an error."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        converters = {"int": int, "float": float, "str": str}
        return cls(**{k: converters[str(known[k])](v) for k, v in values.items()})

    @classmethod
    def from_environment(cls, overrides: dict[str, str]) -> ApiSettings:
        """GSA_<KEY> environment variables, then `overrides` on top."""
        names = {f.name for f in fields(cls)}
        values = {k[len(ENV_PREFIX) :].lower(): v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        return cls.from_strings({k: v for k, v in values.items() if k in names} | overrides)
