"""Locust users that send audio to the Granite Speech ensembles through the project's client.

Run from the repository root (see README.md, or `python -m loadtest.run`):

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 30s --host 127.0.0.1:8000 \
        --audio-dir DIR --variant ar --report-dir loadtest/results

Over HTTP the client uses tritonclient.http (geventhttpclient), which cooperates with Locust's
gevent workers; for gRPC, gRPC's gevent integration is switched on below before any channel.
One Locust request is one audio file; its response time is the client's measured latency.

The users share the files out (user i of N sends files i, i+N, i+2N, ...), so which files are sent
never depends on how fast the server answers: with --passes K every user sends its share K times
and the run ends when all have, so every file is sent exactly K times.

`--variant mix` alternates the AR and NAR ensembles request by request; `--bad-every N` makes
every Nth request of a user a bad one (loadtest/bad_requests.py), reported as `invalid_requests`:
a success when the server answered it INVALID_ARG with its own message, a failure otherwise.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before tritonclient.grpc opens a channel

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from granite_speech_client import SAMPLE_RATE, GraniteSpeechClient, GraniteSpeechError, load_audio  # noqa: E402
from granite_speech_client.options import ENSEMBLES  # noqa: E402
from granite_speech_client.transport import ConnectionSettings, Transport, normalize_url  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from loadtest import bad_requests  # noqa: E402
from loadtest.report import LoadReport  # noqa: E402

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
VARIANTS = {"ar": ("ar",), "nar": ("nar",), "mix": ("ar", "nar")}
INVALID = "invalid_requests"  # the name bad requests are reported under
REPORT = LoadReport()


@dataclass(frozen=True)
class Clip:
    name: str
    samples: np.ndarray  # float32 [samples] at 16 kHz


_clips: list[Clip] = []


def clips(audio_dir: str) -> list[Clip]:
    """Every audio file of `audio_dir`, decoded once per process to 16 kHz mono."""
    if not _clips:
        folder = Path(audio_dir)
        if not audio_dir or not folder.is_dir():
            raise SystemExit(f"--audio-dir must be a folder of audio files, got {audio_dir!r}")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        if not paths:
            raise SystemExit(f"no {'/'.join(AUDIO_SUFFIXES)} files in {audio_dir}")
        _clips.extend(Clip(p.name, load_audio(p)) for p in paths)
    return _clips


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    group = parser.add_argument_group("granite speech")
    group.add_argument("--audio-dir", default="", help="folder of wav/flac/ogg files (required)")
    group.add_argument("--variant", choices=tuple(VARIANTS), default="ar", help="ensemble to load (mix: both)")
    group.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Triton protocol")
    group.add_argument("--max-new-tokens", type=int, default=0, help="AR decode limit (0: server default)")
    group.add_argument("--request-timeout", type=float, default=300.0, help="per-request timeout, s")
    group.add_argument("--passes", type=int, default=0, help="each user sends its files this often (0: until -t)")
    group.add_argument("--report-dir", default="loadtest/results", help="where report.csv/html go")
    group.add_argument("--bad-every", type=int, default=0, help="every Nth request of a user is bad (0: none)")


@events.init.add_listener
def on_init(environment, **_kwargs) -> None:
    """Decode the audio before any user starts (and fail early on a bad --audio-dir)."""
    if environment.parsed_options is not None:
        clips(environment.parsed_options.audio_dir)


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    REPORT.start()
    GraniteSpeechUser.reset()


@events.request.add_listener
def on_request(name, response_time, exception, context, **_kwargs) -> None:
    REPORT.on_request(name, response_time, exception, context or {})


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs) -> None:
    REPORT.stop()
    REPORT.write(Path(environment.parsed_options.report_dir))


def share(files: list[Clip], user: int, users: int) -> list[Clip]:
    """The files user `user` of `users` sends: every users-th one, starting at its own index."""
    return files[user::users]


class GraniteSpeechUser(User):
    """Sends its share of the files one after another (closed loop), --passes times or until the run ends."""

    wait_time = constant(0)
    _count = itertools.count()  # users started
    _finished = itertools.count(1)  # users done with their passes

    @classmethod
    def reset(cls) -> None:
        cls._count, cls._finished = itertools.count(), itertools.count(1)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.variants = VARIANTS[options.variant]
        self.protocol = options.protocol
        self.max_new_tokens = options.max_new_tokens or None
        self.client = GraniteSpeechClient(self.host, options.protocol, timeout_s=options.request_timeout, retries=0)
        users = max(options.num_users or 1, 1)
        own = share(clips(options.audio_dir), next(self._count) % users, users)
        passes = options.passes
        self.clips = iter(own * passes) if passes else itertools.cycle(own)
        self.sent = 0
        self.bad_every = options.bad_every
        self.bad = itertools.cycle([b for b in bad_requests.catalog() if b.variant in self.variants])
        url = normalize_url(self.host, self.protocol)
        self.transport = Transport(ConnectionSettings(url, self.protocol, options.request_timeout, retries=0))

    def finish(self) -> None:
        """This user sent everything it had to: stop it, and end the run once every user has.

        Locust rewrites its CSV every CSV_STATS_INTERVAL_SEC, not at the end: the run ends after
        its next write (timers fire in deadline order), so that the CSV holds the last request too.
        """
        if next(self._finished) >= max(self.environment.parsed_options.num_users or 1, 1):
            gevent.spawn_later(CSV_STATS_INTERVAL_SEC + 1, self.environment.runner.quit)
        raise StopUser()

    def on_stop(self) -> None:
        self.client.close()
        self.transport.close()

    @task
    def transcribe(self) -> None:
        self.sent += 1
        if self.bad_every and self.sent % self.bad_every == 0:
            self.send_bad(next(self.bad))
            return
        clip = next(self.clips, None)
        if clip is None:
            self.finish()
        variant = self.variants[self.sent % len(self.variants)]
        new_tokens = self.max_new_tokens if variant == "ar" else None
        name = ENSEMBLES[variant]
        started = time.perf_counter()
        label = clip.name if len(self.variants) == 1 else f"{name}/{clip.name}"  # texts.json's key
        context = {"file": label, "audio_seconds": clip.samples.shape[0] / SAMPLE_RATE}
        try:
            result = self.client.transcribe(
                clip.samples, sample_rate=SAMPLE_RATE, variant=variant, max_new_tokens=new_tokens
            )
        except GraniteSpeechError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1000
            self.fire(name, elapsed_ms, 0, context, exc)
            return
        context["text"] = result.text
        self.fire(name, result.latency_s * 1000, len(result.text.encode()), context, None)

    def send_bad(self, bad: bad_requests.BadRequest) -> None:
        started = time.perf_counter()
        try:
            bad_requests.check(self.transport, bad)
            error = None
        except AssertionError as exc:
            error = exc
        self.fire(INVALID, (time.perf_counter() - started) * 1000, 0, {"bad": bad.name}, error)

    def fire(self, name: str, response_time_ms: float, length: int, context: dict, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=response_time_ms,
            response_length=length,
            response=None,
            context=context,
            exception=exc,
        )
