"""granite-speech: transcribe or translate audio files with Granite Speech served on Triton.

    granite-speech transcribe a.wav b.flac [--variant ar|nar] [--language en] [--json]
    granite-speech translate a.wav --to fr [--language en] [--punctuate]
    granite-speech transcribe a.wav --stream       (AR: prints the text as it is generated)
    granite-speech transcribe a.wav --decode-mode cascade|beam|speculative [--num-beams 2]
    granite-speech health [--deep]         (--deep: a tiny request through every ready pipeline)

Exit codes:
  0  every file succeeded
  1  partial failure (some files failed, or files failed for different reasons)
  2  usage error or invalid option (language, task, keywords...)
  3  server unreachable
  4  model (ensemble) not ready or not deployed
  5  bad input file (missing, unreadable, unsupported format)
  6  server rejected the request (its message is printed)
  7  request timed out
  8  server overloaded (UNAVAILABLE: a queue stayed full through the retries)
When every file fails for the same reason, the exit code is that reason's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from .client import PIPELINES, GraniteSpeechClient
from .errors import GraniteSpeechError, InvalidRequestError, ServerOverloadedError
from .options import (
    ASR_LANGUAGES,
    DECODE_MODES,
    ENSEMBLES,
    TRANSLATION_TARGETS,
    VARIANTS,
    Decoding,
    RequestOptions,
    parse_keywords,
)
from .results import ItemResult, PipelineCheck
from .streaming import STREAMING_MODEL

EXIT_OK, EXIT_PARTIAL = 0, 1
BAR_WIDTH = 30  # characters


class Progress:
    """A one-line progress bar on stderr: [#####-----] 5/10 files, 1 failed, 3.2 s."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.enabled, self.stream = total, enabled, stream
        self.done = self.failed = 0
        self.started = time.monotonic()

    def update(self, item: ItemResult) -> None:
        self.done += 1
        self.failed += not item.ok
        self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        filled = BAR_WIDTH * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = time.monotonic() - self.started
        line = f"[{bar}] {self.done}/{self.total} files, {self.failed} failed, {elapsed:.1f} s"
        self.stream.write("\r" + line)
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class OrderedPrinter:
    """Prints results in input order as soon as every earlier one has arrived."""

    def __init__(self, as_json: bool, total: int, progress: Progress) -> None:
        self.as_json, self.total, self.progress = as_json, total, progress
        self.pending: dict[int, ItemResult] = {}
        self.next_index = 0

    def __call__(self, item: ItemResult) -> None:
        self.pending[item.index] = item
        while self.next_index in self.pending:
            self.emit(self.pending.pop(self.next_index))
            self.next_index += 1
        self.progress.update(item)

    def emit(self, item: ItemResult) -> None:
        self.progress.clear()
        if self.as_json:
            print(json.dumps(item.to_dict(), ensure_ascii=False), flush=True)
        elif item.result is not None:
            print(item.result.text if self.total == 1 else f"{item.source}: {item.result.text}", flush=True)
        if item.error is not None:
            message = str(item.error)
            where = "" if message.startswith(item.source) else f"{item.source}: "
            print(f"error: {where}{message}", file=sys.stderr, flush=True)


def summary_exit_code(items: list[ItemResult]) -> int:
    failed = [item.error for item in items if item.error is not None]
    if not failed:
        return EXIT_OK
    codes = {error.exit_code for error in failed}
    return codes.pop() if len(failed) == len(items) and len(codes) == 1 else EXIT_PARTIAL


def make_client(args: argparse.Namespace) -> GraniteSpeechClient:
    return GraniteSpeechClient(args.server, args.protocol, timeout_s=args.timeout, retries=args.retries)


def run_files(args: argparse.Namespace, options: RequestOptions, run_many: Callable[..., list[ItemResult]]) -> int:
    """Validate, check the server once, then process every file with a progress bar."""
    options.validate()
    args.client.check_ready(options.variant)
    show_bar = args.progress if args.progress is not None else len(args.files) > 1 and sys.stderr.isatty()
    progress = Progress(len(args.files), show_bar)
    progress.draw()
    try:
        items = run_many(
            args.files, max_in_flight=args.max_in_flight, on_result=OrderedPrinter(args.json, len(args.files), progress)
        )
    finally:
        progress.finish()
    return summary_exit_code(items)


def run_streams(args: argparse.Namespace, options: RequestOptions, open_stream: Callable[..., object]) -> int:
    """Each file in turn, its text printed as it grows (JSON: one object per update)."""
    options.validate()
    if options.variant != "ar":
        raise InvalidRequestError("--stream needs variant 'ar' (the NAR model answers in one pass)")
    args.client.check_ready(options.variant)
    for path in args.files:
        if len(args.files) > 1 and not args.json:
            print(f"{path}: ", end="", flush=True)
        printed = ""
        for update in open_stream(path):
            if args.json:
                print(json.dumps({"file": path, **update.to_dict()}, ensure_ascii=False), flush=True)
            elif update.text.startswith(printed):
                print(update.text[len(printed) :], end="", flush=True)
                printed = update.text
            else:  # a rare rewrite of the text so far (a piece boundary): start the line again
                print(f"\n{update.text}", end="", flush=True)
                printed = update.text
        if not args.json:
            print(flush=True)
    return EXIT_OK


def decoding(args: argparse.Namespace) -> Decoding:
    return Decoding(args.decode_mode, args.num_beams, args.confidence, args.entropy_gate)


def cmd_transcribe(args: argparse.Namespace) -> int:
    keywords = parse_keywords(args.keywords)
    options = RequestOptions(
        args.variant, "transcribe", args.language, None, keywords, args.punctuate, args.max_new_tokens, decoding(args)
    )
    asked = {"keywords": keywords, **common_options(args, options)}
    if args.stream:
        return run_streams(args, options, lambda path: args.client.transcribe_stream(path, **asked))
    return run_files(
        args, options, lambda files, **kw: args.client.transcribe_many(files, variant=args.variant, **asked, **kw)
    )


def cmd_translate(args: argparse.Namespace) -> int:
    options = RequestOptions(
        "ar", "translate", args.language, args.to, (), args.punctuate, args.max_new_tokens, decoding(args)
    )
    asked = {"target_language": args.to, **common_options(args, options)}
    if args.stream:
        return run_streams(args, options, lambda path: args.client.translate_stream(path, **asked))
    return run_files(args, options, lambda files, **kw: args.client.translate_many(files, **asked, **kw))


def common_options(args: argparse.Namespace, options: RequestOptions) -> dict:
    """The keyword arguments every client call of the CLI takes from its command line."""
    return {
        "language": args.language,
        "punctuate": args.punctuate,
        "max_new_tokens": args.max_new_tokens,
        "decoding": options.decoding,
    }


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server is ready and the asked variant (default: any ensemble) is ready;
    with --deep, also when a tiny real request through every ready pipeline is answered."""
    health = args.client.health()
    wanted = [ENSEMBLES[args.variant]] if args.variant else list(ENSEMBLES.values())
    ok = health.live and health.ready and any(health.ensembles[name] for name in wanted)
    checks = deep_checks(args.client) if args.deep and health.live else {}
    if args.deep:  # every ready pipeline, and the asked variant's, must answer
        required = wanted if args.variant else []
        ok = ok and all(check.ok for name, check in checks.items() if check.ready or name in required)
    if args.json:
        pipelines = {"pipelines": {name: check.to_dict() for name, check in checks.items()}} if args.deep else {}
        print(json.dumps({"server": args.client.settings.url, **health.to_dict(), **pipelines}))
    else:
        yes_no = {True: "yes", False: "no"}
        print(f"server {args.client.settings.url}: live {yes_no[health.live]}, ready {yes_no[health.ready]}")
        for name, variant in (PIPELINES if args.deep else {v: k for k, v in ENSEMBLES.items()}).items():
            state = checks[name].describe() if args.deep else ("ready" if health.ensembles[name] else "not ready")
            print(f"{name} ({variant}{', streaming' if name == STREAMING_MODEL else ''}): {state}")
    return EXIT_OK if ok else 4


def deep_checks(client: GraniteSpeechClient) -> dict[str, PipelineCheck]:
    """Each pipeline's readiness, and for a ready one, a tiny request through it (see `probe`)."""
    checks = {}
    for name in PIPELINES:
        if not client.is_ready(name):
            checks[name] = PipelineCheck(ready=False)
            continue
        try:
            checks[name] = PipelineCheck(ready=True, seconds=client.probe(name))
        except ServerOverloadedError:
            checks[name] = PipelineCheck(ready=True, busy=True)
        except GraniteSpeechError as exc:
            checks[name] = PipelineCheck(ready=True, error=str(exc))
    return checks


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--server", default=None, help="host:port (default localhost:8001 grpc, localhost:8000 http)")
    group.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    group.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per-request timeout (default 300)")
    group.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries after connection failures or overload, backoff doubling (default 2)",
    )


def add_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, ...)")
    parser.add_argument("--language", choices=ASR_LANGUAGES, default="en", help="spoken language (default en)")
    parser.add_argument("--punctuate", action="store_true", help="punctuated, truecased output (AR only)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="AR decode limit")
    parser.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated (AR)")
    group = parser.add_argument_group("decoding (AR)")
    group.add_argument("--decode-mode", choices=DECODE_MODES, default="greedy", help="default greedy")
    group.add_argument("--num-beams", type=int, default=None, metavar="N", help="beam and cascade: 1..4 (default 2)")
    group.add_argument("--confidence", type=float, default=None, metavar="P", help="cascade: default 0.4")
    group.add_argument("--entropy-gate", type=float, default=None, metavar="H", help="cascade: default 0 (off)")
    parser.add_argument("--max-in-flight", type=int, default=8, metavar="N", help="concurrent requests (default 8)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: many files, tty)",
    )
    add_connection_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granite-speech",
        description=__doc__.split("\n")[0],
        epilog=__doc__[__doc__.index("Exit codes:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    transcribe = sub.add_parser(
        "transcribe", help="speech to text", epilog=parser.epilog, formatter_class=parser.formatter_class
    )
    add_file_arguments(transcribe)
    transcribe.add_argument("--variant", choices=VARIANTS, default="ar", help="ar (default) or nar")
    transcribe.add_argument("--keywords", default=None, help="comma-separated words to bias towards (AR only)")
    transcribe.set_defaults(func=cmd_transcribe)
    translate = sub.add_parser(
        "translate",
        help="speech to text in another language (AR)",
        epilog=parser.epilog,
        formatter_class=parser.formatter_class,
    )
    add_file_arguments(translate)
    translate.add_argument("--to", required=True, choices=TRANSLATION_TARGETS, help="target language")
    translate.set_defaults(func=cmd_translate)
    health = sub.add_parser("health", help="server liveness/readiness and each ensemble's readiness")
    health.add_argument("--variant", choices=VARIANTS, default=None, help="exit 4 unless this variant is ready")
    health.add_argument(
        "--deep",
        action="store_true",
        help="also send a tiny request through every ready pipeline (AR, NAR, streaming); exit 4 if one fails",
    )
    health.add_argument("--json", action="store_true", help="print one JSON object")
    add_connection_arguments(health)
    health.set_defaults(func=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with make_client(args) as args.client:
            return args.func(args)
    except GraniteSpeechError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
