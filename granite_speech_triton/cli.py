"""`granite-speech-triton`: render repositories, serve, run the demo, make tiny checkpoints.

    granite-speech-triton render --out build/repository --set ar_checkpoint=DIR ...
    granite-speech-triton serve  --set ar_checkpoint=DIR [--variants ar,nar] [--http-port 8000 ...] [--log-to-stdout]
    granite-speech-triton demo   --set ar_checkpoint=DIR --audio samples/hello.wav [--random-weights]
    granite-speech-triton make-checkpoint build/tiny-ar [--nar] [--size tiny|reduced|real]
    granite-speech-triton export --checkpoint DIR --variant ar|nar --out build/libtorch [--device cuda --dtype bfloat16]
    granite-speech-triton bench  --tiny | --device cuda --dtype bfloat16 [--concurrency 1,8,32]

Every `--set key=value` is a DeploySettings field (see serving/repository.py); unknown keys
are rejected. Environment variables GST_<KEY> (e.g. GST_DEVICE=cuda) set defaults.
serve, demo and bench check their ports before anything loads; a busy port is one line naming it.
serve restarts tritonserver when one of its stages dies and drains requests in flight on SIGTERM
(serving/supervisor.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from .serving import server
from .serving.repository import VARIANTS, DeploySettings, render

ENV_PREFIX = "GST_"


def settings_from(pairs: list[str]) -> DeploySettings:
    """DeploySettings from GST_* environment variables, overridden by --set key=value pairs."""
    names = {f.name for f in fields(DeploySettings)}
    values = {n: os.environ[ENV_PREFIX + n.upper()] for n in names if ENV_PREFIX + n.upper() in os.environ}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        values[key] = value
    try:
        return DeploySettings.from_strings(values)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def parse_variants(text: str) -> tuple[str, ...]:
    variants = tuple(v.strip() for v in text.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"variants must be a comma-separated subset of {','.join(VARIANTS)}")
    return variants


def add_port_arguments(parser: argparse.ArgumentParser, defaults: tuple[int, int, int]) -> None:
    """--http-port, --grpc-port, --metrics-port (the Makefile's HTTP_PORT, GRPC_PORT, METRICS_PORT)."""
    for name, default in zip(("http", "grpc", "metrics"), defaults, strict=True):
        parser.add_argument(f"--{name}-port", type=int, default=default, metavar="PORT")


def port_map(args: argparse.Namespace) -> dict[str, int]:
    return {"HTTP": args.http_port, "gRPC": args.grpc_port, "metrics": args.metrics_port}


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a DeploySettings field")
    parser.add_argument("--variants", type=parse_variants, default=("ar",), help="ar, nar or ar,nar (default ar)")
    parser.add_argument("--out", type=Path, default=Path("build/repository"), help="rendered repositories")


def cmd_render(args: argparse.Namespace) -> int:
    for folder in render(args.out, settings_from(args.set), args.variants):
        print(folder)
    return 0


def server_options(args: argparse.Namespace, repositories: list[Path]) -> server.ServerOptions:
    return server.ServerOptions(
        repositories=repositories,
        build_dir=Path("build"),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        tritonserver=args.tritonserver,
        backend_directory=args.backend_directory,
        backend_config=args.backend_config,
    )


def resolved(settings: DeploySettings, variants: tuple[str, ...]) -> DeploySettings:
    """Settings whose checkpoints are local directories: hub ids are downloaded once, here,
    instead of by every model instance, and an unreachable hub fails before the server starts."""
    from .model.errors import CheckpointError
    from .model.weights import resolve_checkpoint

    paths = {}
    try:
        if "ar" in variants:
            paths["ar_checkpoint"] = str(resolve_checkpoint(settings.ar_checkpoint))
        if "nar" in variants:
            paths["nar_checkpoint"] = str(resolve_checkpoint(settings.nar_checkpoint, settings.nar_revision or None))
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}\n(no network? `make demo-tiny` runs on tiny random checkpoints)") from exc
    return dataclasses.replace(settings, **paths)


def prepared(args: argparse.Namespace, settings: DeploySettings | None = None) -> server.ServerOptions:
    """Ports checked (before anything is downloaded or loaded), then the repositories rendered."""
    server.check_ports(args.address, port_map(args))
    settings = settings or settings_from(args.set)
    repositories = render(args.out, resolved(settings, args.variants), args.variants)
    return server_options(args, repositories)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/Ctrl-C (drained), restarting tritonserver if a stage dies (serving/supervisor.py)."""
    from .serving.supervisor import Supervisor

    settings = settings_from(args.set)
    supervisor = Supervisor(
        prepared(args, settings),
        args.out / "server.log",
        args.variants,
        settings.drain_timeout_s,
        echo_log=args.log_to_stdout,
    )
    return supervisor.run()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(prepared(args), args.audio, args.variants, args.out / "server.log", args.random_weights)


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from . import tiny

    maker = tiny.make_nar_checkpoint if args.nar else tiny.make_ar_checkpoint
    print(maker(args.out, tiny.SIZES[args.size]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-speech-triton", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render_p = sub.add_parser("render", help="fill the Triton templates into a servable folder")
    add_deploy_arguments(render_p)
    render_p.set_defaults(func=cmd_render)
    for name, func, help_text in (
        ("serve", cmd_serve, "render, then run tritonserver in the foreground"),
        ("demo", cmd_demo, "render, start tritonserver, transcribe an audio file, stop"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_deploy_arguments(p)
        add_port_arguments(p, (8000, 8001, 8002))
        p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
        p.add_argument(
            "--backend-config", action="append", default=[], metavar="BACKEND,KEY=VALUE", help="tritonserver option"
        )
        p.add_argument("--tritonserver", type=Path, default=None, help="server binary (default: nvidia-pytriton's)")
        p.add_argument("--backend-directory", type=Path, default=None, help="Triton backends folder")
        p.set_defaults(func=func)
    sub.choices["serve"].add_argument(
        "--log-to-stdout", action="store_true", help="tritonserver's log on stdout too (containers: docker logs)"
    )
    demo_p = sub.choices["demo"]
    demo_p.add_argument("--audio", type=Path, default=Path("samples/granite_speech_demo.wav"))
    demo_p.add_argument("--random-weights", action="store_true", help="the checkpoints are tiny random ones: say so")
    tiny_p = sub.add_parser(
        "make-checkpoint",
        aliases=["make-tiny-checkpoint"],
        help="write a random-weight checkpoint in the real layout (meaningless output)",
    )
    tiny_p.add_argument("out", type=Path)
    tiny_p.add_argument("--nar", action="store_true", help="the NAR layout instead of the AR one")
    tiny_p.add_argument(
        "--size", choices=("tiny", "reduced", "real"), default="tiny", help="real: the 2b dimensions, ~4.5 GB bf16"
    )
    tiny_p.set_defaults(func=cmd_make_checkpoint)
    # Listed for --help only: `main` hands `export ...` and `bench ...` to their own modules' main
    # (export's parser needs torch imported; bench imports this module, never the other way round).
    sub.add_parser("export", help="TorchScript of the encoder, projectors, NAR head for Triton's PyTorch backend")
    sub.add_parser("bench", help="benchmark: in-process reference vs Triton at several concurrencies")
    return parser


def dispatch(argv: list[str]) -> int:
    if argv[:1] == ["export"]:
        from .export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The command line; a taken port or a server that fails to start is one line on stderr, no traceback."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except (server.PortError, server.ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
